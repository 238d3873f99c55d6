"""Scale: what Ray adds to embedding on this machine, and how merging grows with classes and feature width.

1. Embedding throughput (clips/s) of ``--clips`` synthetic 1 s tones with the ``fast`` encoder
   (untrained weights: the time does not depend on them), each run into a fresh embedding cache:
   the single-process path (``--engine local``, torch threads = ``--threads``), then Ray with 1 and 2
   actors of 1 CPU each on a local instance. ``ray.init`` is timed apart; a Ray run's time includes
   starting its actors (each loads torch and the encoder) and the driver writing the cache; the
   time until the first batch reaches the driver separates that start-up from the steady rate.
2. Merge time: two learners of C classes each (disjoint labels, ``--per-class`` samples per class of
   width d) merged with ``IncrementalLearner.merge``, which adds the statistics and solves once; for
   ncm, lda and analytic (analytic without expansion, ``buffer_size=0``, so its ridge width is d).

    python benchmarks/scale.py                 # both parts
    python benchmarks/scale.py --part merge --classes 10,100 --widths 128,512

Record ``uptime`` next to the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from earmark.audio import AudioConfig  # noqa: E402
from earmark.encoders.config import resolve_config  # noqa: E402
from earmark.encoders.embedder import AudioEmbedder  # noqa: E402
from earmark.learners import make_learner  # noqa: E402
from tests.audio_fixtures import write_class  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*r) for r in rows)])


def bench_embed(args: argparse.Namespace) -> None:
    from earmark.distributed.ray_engine import embed_local, embed_with_ray, ray_session

    tmp = Path(tempfile.mkdtemp(prefix="earmark-scale-"))
    try:
        per = max(1, args.clips // 8)
        paths = [p for k in range(8) for p in write_class(tmp / "audio", f"tone{k}", 150 * 1.4**k, per, seed=k)]
        torch.manual_seed(0)
        embedder = AudioEmbedder(resolve_config("fast"), AudioConfig(clip_seconds=1.0))
        torch.set_num_threads(args.threads)
        embed_local(embedder, paths[:4], tmp / "warm", progress=False)  # warm-up (allocator, kernels)
        rows = []
        local = embed_local(embedder, paths, tmp / "local", batch_size=args.batch_size, progress=False)
        base = local.computed / local.seconds
        rows.append([f"local, {args.threads} thread(s)", f"{local.seconds:.2f}", "-", f"{base:.0f}", f"{base:.0f}",
                     "1.00x"])
        t = time.perf_counter()
        with ray_session(None, 2) as ray:
            init = time.perf_counter() - t
            ray.data.DataContext.get_current().enable_progress_bars = False
            for workers in (1, 2):
                r = embed_with_ray(embedder, paths, tmp / f"ray{workers}", num_workers=workers,
                                   batch_size=args.batch_size, progress=False)
                steady = (r.computed - r.first_rows) / max(r.seconds - r.first_rows_seconds, 1e-9)
                rows.append([f"ray, {workers} actor(s) x 1 CPU", f"{r.seconds:.2f}", f"{r.first_rows_seconds:.2f}",
                             f"{r.computed / r.seconds:.0f}", f"{steady:.0f}", f"{steady / base:.2f}x"])
        print(f"\nembedding {len(paths)} clips of 1 s, fast encoder (untrained), batch {args.batch_size}; ray.init "
              f"(local, 2 CPUs) {init:.1f} s, not included. 'to 1st batch': start-up (actors load torch and the "
              "encoder); 'steady': clips/s after the first batch arrived")
        print(table(["engine", "seconds", "to 1st batch", "clips/s overall", "steady clips/s", "steady vs local"],
                    rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fitted(name: str, classes: int, width: int, per_class: int, offset: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(classes * per_class, width, generator=g, dtype=torch.float64)
    y = torch.arange(offset, offset + classes).repeat_interleave(per_class)
    params = {"buffer_size": 0} if name == "analytic" else {}
    return make_learner(name, **params).partial_fit(X, y)


def bench_merge(args: argparse.Namespace) -> None:
    rows = []
    for name in args.learners.split(","):
        for width in [int(w) for w in args.widths.split(",")]:
            for classes in [int(c) for c in args.classes.split(",")]:
                half = classes // 2
                t = time.perf_counter()
                a = fitted(name, half, width, args.per_class, 0, 1)
                b = fitted(name, classes - half, width, args.per_class, half, 2)
                build = time.perf_counter() - t
                t = time.perf_counter()
                a.merge(b)
                merge = time.perf_counter() - t
                rows.append([name, str(width), str(classes), f"{build:.2f}", f"{merge * 1000:.1f}",
                             f"{a.nbytes() / 2**20:.1f}"])
                print(f"  {name} d={width} classes={classes}: merge {merge * 1000:.1f} ms", file=sys.stderr)
    print(f"\nmerge of two learners of C/2 disjoint classes each, {args.per_class} samples per class; threads "
          f"{torch.get_num_threads()}")
    print(table(["learner", "width d", "classes C", "fit both (s)", "merge (ms)", "state (MiB)"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["embed", "merge", "all"], default="all")
    ap.add_argument("--clips", type=int, default=3200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the local path (Ray actors: 1 each)")
    ap.add_argument("--learners", default="ncm,lda,analytic")
    ap.add_argument("--classes", default="10,100,1000", help="classes in the merged learner (half from each side)")
    ap.add_argument("--widths", default="128,512,2048")
    ap.add_argument("--per-class", type=int, default=2)
    args = ap.parse_args()
    print(f"uptime: {uptime()}; {os.cpu_count()} CPU(s), torch {torch.__version__}")
    if args.part in ("embed", "all"):
        bench_embed(args)
    if args.part in ("merge", "all"):
        torch.set_num_threads(args.threads)
        bench_merge(args)
    print(f"uptime: {uptime()}")


if __name__ == "__main__":
    main()
