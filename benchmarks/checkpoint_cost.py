"""What a base-training checkpoint costs per epoch on the demo configuration.

Usage: python benchmarks/checkpoint_cost.py [--classes 60] [--clips 32] [--repeats 1]

The ``fast`` encoder on 60 classes x 32 clips of 2 s log-mel (random values of the demo's shape: the
cost does not depend on them), one epoch without a checkpoint, one with (``checkpoint_every=1``:
the data fingerprint at the start plus one atomic save), the save alone and the fingerprint alone. Prints seconds and
the checkpoint's size; put ``uptime`` next to the figures, the machine may be shared.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
