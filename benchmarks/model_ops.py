"""What a user waits for: learn a new sound from 10 wav files, forget a label, predict one clip.

For ncm, lda and analytic on the `fast` encoder (untrained weights: the time does not depend on them),
with a base model of 20 labels x 8 clips of synthetic 2 s tones. Each operation is timed end to end
through the public ``Model`` API (decode, embed, update, save), median of ``--repeats`` runs, on a copy of
the saved base model each time. Prints a table and the targets of issue 13 (learn < 1 s; forget < 50 ms
plus the save; one-clip predict < 20 ms).

    python benchmarks/model_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from earmark.audio import AudioConfig  # noqa: E402
from earmark.encoders.config import resolve_config  # noqa: E402
from earmark.encoders.embedder import AudioEmbedder  # noqa: E402
from earmark.model import Model  # noqa: E402
from tests.audio_fixtures import write_class  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--learners", default="ncm,lda,analytic")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="earmark-model-ops-"))
    try:
        base_files = {f"tone{k}": write_class(tmp / "base", f"tone{k}", 110 * 1.25**k, 8, seconds=2.0)
                      for k in range(20)}
        new_files = write_class(tmp / "new", "newsound", 3000.0, 11, seed=9, seconds=2.0)
        torch.manual_seed(0)
        embedder = AudioEmbedder(resolve_config("fast"), AudioConfig(clip_seconds=2.0))
        rows = []
        for name in args.learners.split(","):
            model = Model.from_embedder(embedder, name, {"gamma": 1000.0} if name == "analytic" else None)
            for label, files in base_files.items():
                model.learn(files, label)
            base_dir = model.save(tmp / f"base-{name}")
            model.predict([new_files[10]])  # warm up
            learn, forget, forget_save, predict = [], [], [], []
            for r in range(args.repeats):
                work = tmp / f"work-{name}-{r}"
                shutil.copytree(base_dir, work)
                m = Model.load(work)
                learn.append(timed(lambda m=m: (m.learn(new_files[:10], "newsound"), m.save())))
                forget.append(timed(lambda m=m: m.forget(label="tone3")))
                forget_save.append(timed(lambda m=m: m.save()))
                predict.append(timed(lambda m=m: m.predict([new_files[10]], top_k=3)))
            info = Model.load(tmp / f"work-{name}-0").info()
            rows.append((name, statistics.median(learn), statistics.median(forget), statistics.median(forget_save),
                         statistics.median(predict), info["learner"]["state_bytes"],
                         (info["calibration"] or {}).get("bytes", 0)))
        print(f"threads {args.threads}, median of {args.repeats}, load {os.getloadavg()[0]:.1f}; "
              "base model 20 labels x 8 clips (2 s), fast encoder")
        print("| learner | learn 10 files + save (s) | forget a label (ms) | + save (ms) | predict 1 clip (ms) | "
              "learner bytes | calibration bytes |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, le, fo, fs, pr, nb, cb in rows:
            print(f"| {name} | {le:.3f} | {1000 * fo:.1f} | {1000 * fs:.1f} | {1000 * pr:.1f} | {nb:,} | {cb:,} |")
        print("targets: learn < 1 s; forget < 50 ms (plus the save); predict one 2 s clip < 20 ms")
        for name, le, fo, _, pr, _, _ in rows:
            verdict = [("learn", le < 1.0), ("forget", fo < 0.05), ("predict", pr < 0.02)]
            print(f"  {name}: " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in verdict))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
