"""Peak memory of window-by-window prediction on long recordings: it must stay flat with file length.

Writes 16 kHz 16-bit recordings of the given lengths (in blocks), runs `Model.predict_stream` on each in a
fresh subprocess with a freshly initialized `fast` embedder and an NCM head (memory, not accuracy,
is measured), and prints the peak resident memory (ru_maxrss) per length.

Usage: python benchmarks/long_file.py [--minutes 10,60,180] [--dir /tmp/earmark-long]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

CHILD = r"""
import json, resource, sys, time, torch
from earmark.encoders.embedder import AudioEmbedder
from earmark.learners import make_learner
from earmark.model import Model
torch.manual_seed(0)
emb = AudioEmbedder("fast").eval()
model = Model(emb, make_learner("ncm").partial_fit(torch.randn(4, emb.embed_dim), [0, 1, 2, 3]))
model._names = {i: f"class{i}" for i in range(4)}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); n = 0
for _ in model.predict_stream(sys.argv[1], sys.argv[1], window=2.0, hop=1.0, top_k=1, batch_size=64):
    n += 1
print(json.dumps({"windows": n, "seconds": time.perf_counter() - t, "rss_before_mib": base / 1024,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_recording(path: Path, minutes: float, rate: int = 16000) -> None:
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", rate, 1, subtype="PCM_16") as fh:
        left = int(minutes * 60 * rate)
        while left:
            n = min(left, 60 * rate)
            fh.write((0.1 * rng.standard_normal(n)).astype(np.float32))
            left -= n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", default="10,60,180")
    ap.add_argument("--dir", default="/tmp/earmark-long")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'length':>8} {'file MiB':>9} {'windows':>8} {'seconds':>8} {'x real time':>11} {'peak RSS MiB':>13}")
    for minutes in [float(m) for m in args.minutes.split(",")]:
        path = out / f"rec-{minutes:g}min.wav"
        if not path.exists():
            write_recording(path, minutes)
        res = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{minutes:>6g} m {path.stat().st_size / 2**20:>9.0f} {r['windows']:>8} {r['seconds']:>8.1f} "
              f"{minutes * 60 / r['seconds']:>11.0f} {r['peak_rss_mib']:>13.0f}")


if __name__ == "__main__":
    main()
