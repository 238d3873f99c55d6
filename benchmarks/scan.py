"""CPU timings of the selective scan implementations and of whole encoders (minimum of N runs).

    python benchmarks/scan.py scan [--batch 8 --length 257 --channels 384 --state 16 --chunks 0,8,16]
    python benchmarks/scan.py encoder [--configs fast,tiny --batch 32 --frames 200]
    python benchmarks/scan.py encoder --configs embed_dim=96,depth=4,d_state=8 ...
    python benchmarks/scan.py compile [--processes 2]

``scan``: forward (no grad) and forward+backward of every implementation on random inputs, and
the numba kernel's speed-up over the PyTorch sequential scan (the kernel only where numba imports).
``encoder``: one training step (forward + backward + AdamW) at ``--batch`` and embedding
throughput (forward only, no grad) for presets or ``field=value`` variants of EncoderConfig.
``compile``: the numba kernel's first-call cost in fresh processes sharing an empty cache
directory: the first process compiles forward and backward, the next ones load them from disk.
Other processes on the machine inflate the numbers; the minimum over repeats is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from earmark.encoders import EncoderConfig, build_encoder, resolve_config
from earmark.encoders.scan import (
    block_steps,
    choose_impl,
    chunk_length,
    numba_kernel,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
    selective_scan_sequential,
)
from earmark.runtime import keep_freed_memory


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def bench_scan(args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    b, L, E, N = args.batch, args.length, args.channels, args.state
    u = torch.randn(b, L, E, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, L, E, generator=g) - 3)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    B, C = torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
    D = torch.ones(E)
    params = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D)]
    gy = torch.randn(b, L, E, generator=g)

    def report(name: str, fn: Callable[..., torch.Tensor]) -> tuple[float, float]:
        with torch.no_grad():
            f = best_ms(lambda: fn(*params), args.repeats)
        fb = best_ms(lambda: fn(*params).backward(gy), args.repeats)
        print(f"  {name:<24s} fwd {f:7.2f}   fwd+bwd {fb:7.2f}", flush=True)
        return f, fb

    print(f"batch {b}, L {L}, E {E}, N {N}, threads {torch.get_num_threads()}  (ms, min of {args.repeats})")
    if not args.skip_reference:
        report("reference loop", selective_scan_reference)
    seq = report(f"sequential (block {block_steps(b, E, N)})", selective_scan_sequential)
    for chunk in (int(c) for c in args.chunks.split(",") if c):
        report(f"chunked Lc={chunk_length(L, chunk)}", lambda *xs, c=chunk: selective_scan_chunked(*xs, chunk=c))
    if numba_kernel() is None:
        print("  numba kernel: numba is not installed")
    else:
        kernel = report("numba kernel", lambda *xs: selective_scan(*xs, impl="numba"))
        print(f"  numba vs sequential: {seq[0] / kernel[0]:.1f}x forward, {seq[1] / kernel[1]:.1f}x fwd+bwd")
    print(f"  auto's torch choice: {choose_impl(b, E, N, L)}")


FIRST_CALL = """
import time
t0 = time.perf_counter()
import torch
from earmark.encoders import scan_numba as K
t_import = time.perf_counter() - t0
u = torch.randn(2, 1, 33, 64)
bc = (torch.randn(2, 1, 33, 4), torch.randn(2, 1, 33, 4))
args = (u, torch.rand_like(u), -torch.rand(2, 64, 4), *bc, torch.ones(2, 64))
times = {}
for threads in (2, 1):  # the parallel build, then the serial one (one thread)
    t0 = time.perf_counter()
    y, states = K.forward(*args, (False, True), z=u[0], softplus=True, keep_states=True, threads=threads)
    times[f"forward{threads}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    K.backward(*args, (False, True), states, y.expand(2, *y.shape[1:]), z=u[0], softplus=True, threads=threads)
    times[f"backward{threads}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    w, b = torch.randn(2, 4, 64), torch.randn(2, 64)
    gu = K.conv_silu(u[0], w, b, (False, True), threads=threads)
    K.conv_silu_backward(u[0], w, b, (False, True), gu, threads=threads)
    times[f"conv{threads}"] = time.perf_counter() - t0
print(f"import torch + numba + kernel module {t_import:.2f} s; first call (float32), 2 threads / 1 thread: "
      f"forward {times['forward2']:.2f} / {times['forward1']:.2f} s, backward {times['backward2']:.2f} / "
      f"{times['backward1']:.2f} s, conv + silu forward and backward {times['conv2']:.2f} / {times['conv1']:.2f} s")
"""


def bench_compile(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for i in range(max(2, args.processes)):
            out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True)
            label = "empty cache (compiles)" if i == 0 else "cached (loads)"
            print(f"  process {i + 1}, {label}: {(out.stdout or out.stderr).strip().splitlines()[-1]}", flush=True)


def parse_config(spec: str) -> tuple[str, EncoderConfig]:
    if "=" not in spec:
        return spec, resolve_config(spec)
    casts: dict[str, Callable[[str], object]] = {
        "int": int,
        "float": float,
        "str": str,
        "bool": lambda v: v.lower() in ("1", "true", "yes"),
    }
    fields = {f.name: casts[str(f.type)] for f in dataclasses.fields(EncoderConfig)}
    changes: dict[str, object] = {}
    for item in spec.split(","):
        key, value = item.split("=")
        changes[key] = fields[key](value)
    return spec, EncoderConfig(**changes)


def bench_encoder(args: argparse.Namespace) -> None:
    print(f"batch {args.batch} x {args.frames} frames, threads {torch.get_num_threads()}, min of {args.repeats}")
    for spec in args.configs.split(";"):
        name, cfg = parse_config(spec)
        torch.manual_seed(0)
        model = build_encoder(cfg)
        params = sum(p.numel() for p in model.parameters())
        head = torch.nn.Linear(model.embed_dim, 50)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
        x = torch.randn(args.batch, cfg.n_mels, args.frames)
        y = torch.randint(0, 50, (args.batch,))

        def step(model: torch.nn.Module = model, head: torch.nn.Module = head, opt=opt, x=x, y=y) -> None:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(head(model(x)), y)
            loss.backward()
            opt.step()

        model.train()
        train_ms = best_ms(step, args.repeats)
        model.eval()
        xe = torch.randn(args.embed_batch, cfg.n_mels, args.frames)
        with torch.no_grad():
            embed_ms = best_ms(lambda model=model, xe=xe: model(xe), args.repeats)
        tokens = model.token_grid(args.frames)
        print(
            f"  {name:<40s} {params / 1e6:6.2f}M params, {tokens[0] * tokens[1] + 1} tokens: "
            f"train step {train_ms:7.1f} ms, embed {args.embed_batch * 1e3 / embed_ms:7.1f} clips/s"
        )


def main() -> None:
    keep_freed_memory()  # as the CLI runs
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scan")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--length", type=int, default=257)
    s.add_argument("--channels", type=int, default=384)
    s.add_argument("--state", type=int, default=16)
    s.add_argument("--chunks", default="0,8,16", help="chunk lengths to try (0 = ~sqrt(L); '' = none)")
    s.add_argument("--skip-reference", action="store_true", help="leave out the (slow) reference loop")
    c = sub.add_parser("compile")
    c.add_argument("--processes", type=int, default=2)
    e = sub.add_parser("encoder")
    e.add_argument("--configs", default="fast;tiny", help="';'-separated presets or field=value,... specs")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--embed-batch", type=int, default=64)
    e.add_argument("--frames", type=int, default=200)
    for q in (s, e):
        q.add_argument("--repeats", type=int, default=5)
        q.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.what == "compile":
        bench_compile(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    (bench_scan if args.what == "scan" else bench_encoder)(args)


if __name__ == "__main__":
    main()
