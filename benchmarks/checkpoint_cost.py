"""What a base-training checkpoint costs per epoch on the demo configuration (and, with ``--backbone``,
what a backbone learner's session checkpoint costs).

Usage: python benchmarks/checkpoint_cost.py [--classes 60] [--clips 32] [--repeats 1]
       python benchmarks/checkpoint_cost.py --backbone [--memory 200] [--new 25]

The ``fast`` encoder on 60 classes x 32 clips of 2 s log-mel (random values of the demo's shape: the
cost does not depend on them), one epoch without a checkpoint, one with (``checkpoint_every=1``:
the data fingerprint at the start plus one atomic save), the save alone and the fingerprint alone. Prints seconds and
the checkpoint's size; put ``uptime`` next to the figures, the machine may be shared.

``--backbone``: a replay session of the demo (the ``fast`` encoder, ``--new`` clips of the new classes
plus ``--memory`` exemplars, 2 s log-mel, random values), one epoch of encoder training without and
with a checkpoint (``checkpoint_every=1``: the session fingerprint plus one atomic save), the save
alone, the fingerprint alone, and the harness's save of the whole learner at the session end.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch

from earmark.audio.features import FeatureConfig
from earmark.encoders.config import resolve_config
from earmark.encoders.mamba import build_encoder
from earmark.training import supervised
from earmark.training.supervised import TrainConfig, train_supervised


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=60)
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--backbone", action="store_true", help="a backbone learner's session instead of base training")
    ap.add_argument("--memory", type=int, default=200, help="--backbone: exemplars in the replay memory")
    ap.add_argument("--new", type=int, default=25, help="--backbone: clips of the session's new classes")
    args = ap.parse_args()
    if args.backbone:
        backbone_session(args.memory, args.new, args.repeats)
        return
    n = args.classes * args.clips
    cfg = resolve_config("fast")
    frames = FeatureConfig().num_frames(32000)
    feats = torch.randn(n, cfg.n_mels, frames, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % args.classes
    train = TrainConfig(epochs=1)
    saves: list[float] = []
    real_save = supervised.save_training_checkpoint

    def timed_save(*a, **k):
        t = time.perf_counter()
        real_save(*a, **k)
        saves.append(time.perf_counter() - t)

    supervised.save_training_checkpoint = timed_save
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for label, path in (("without checkpoint", None), ("with checkpoint", Path(tmp) / "p.safetensors")):
                if path is not None and path.exists():
                    path.unlink()
                torch.manual_seed(0)
                enc = build_encoder(cfg)
                t = time.perf_counter()
                train_supervised(enc, feats, labels, args.classes, train, progress=False, checkpoint_path=path)
                rows.append((label, time.perf_counter() - t))
        size = (Path(tmp) / "p.safetensors").stat().st_size
    t = time.perf_counter()
    supervised.data_digest(feats, labels)
    digest = time.perf_counter() - t
    load = os.getloadavg()
    print(f"fast encoder, {args.classes} classes x {args.clips} clips ({n} clips, {frames} frames), one epoch, "
          f"{train.threads} threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for label, s in rows:
        print(f"  {label:<20} {s:8.2f} s")
    print(f"  checkpoint save alone {min(saves):6.3f} s (best of {len(saves)}), file {size / 2**20:.1f} MiB")
    print(f"  data fingerprint      {digest:6.3f} s (once per training call, to refuse another training's file)")


def timed(owner: object, name: str, into: list[float]):
    """Replace ``owner.name`` by a wrapper that appends each call's seconds to ``into``; returns the original."""
    real = getattr(owner, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        into.append(time.perf_counter() - t)
        return out

    setattr(owner, name, wrapper)
    return real


def backbone_session(memory: int, new: int, repeats: int) -> None:
    from earmark.experiments.evaluate import save_sessions
    from earmark.learners import backbone, make_learner
    from earmark.learners.backbone import BackboneLearner

    cfg = resolve_config("fast")
    frames = FeatureConfig().num_frames(32000)
    g = torch.Generator().manual_seed(0)
    per_class = 5
    X0 = torch.randn(memory, cfg.n_mels, frames, generator=g)  # base session: the memory is filled from it
    y0 = torch.arange(memory) // per_class
    X1 = torch.randn(new, cfg.n_mels, frames, generator=g)
    y1 = memory // per_class + torch.arange(new) // per_class
    torch.manual_seed(0)
    base = make_learner("replay", encoder="fast", epochs=1, base_epochs=0, head_epochs=1, memory_clips=memory)
    base.partial_fit(X0, y0)  # no encoder training: the memory holds `memory` exemplars
    trains: list[float] = []
    saves: list[float] = []
    prints: list[float] = []
    rows = []
    timed(BackboneLearner, "_train", trains)
    timed(BackboneLearner, "_train_fingerprint", prints)
    timed(backbone, "save_training_checkpoint", saves)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for label, folder in (("without checkpoint", None), ("with checkpoint", Path(tmp))):
                learner = copy.deepcopy(base)
                learner.checkpoint_dir = folder
                (Path(tmp) / "train.safetensors").unlink(missing_ok=True)
                learner.partial_fit(X1, y1)
                rows.append((label, trains[-1]))
        size = (Path(tmp) / "train.safetensors").stat().st_size
        t = time.perf_counter()
        save_sessions(Path(tmp) / "sessions.safetensors", learner, {}, 2, _matrix(), [0.0, 0.0])
        session_end = time.perf_counter() - t
        end_size = (Path(tmp) / "sessions.safetensors").stat().st_size
    load = os.getloadavg()
    print(f"replay session, fast encoder, {new} new clips + {memory} exemplars ({frames} frames), one epoch "
          f"({-(-(new + memory) // learner.config.batch_size)} steps), {torch.get_num_threads()} threads; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for label, s in rows:
        print(f"  {label:<20} {s:8.2f} s (encoder training of the session)")
    print(f"  checkpoint save alone {min(saves):6.3f} s (best of {len(saves)}), file {size / 2**20:.1f} MiB")
    print(f"  session fingerprint   {min(prints):6.3f} s (once per session's training)")
    print(f"  session-end save      {session_end:6.3f} s (the whole learner, by the harness), file "
          f"{end_size / 2**20:.1f} MiB")


def _matrix():
    from earmark.metrics import AccuracyMatrix

    return AccuracyMatrix.empty(2)


if __name__ == "__main__":
    main()
