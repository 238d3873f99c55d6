"""Time the selective scan implementations on a CPU: forward and forward+backward, minimum of N runs.

Usage: python benchmarks/scan.py [--batch 8 --length 257 --channels 384 --state 16 --chunks 0,8,16,32]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from earmark.encoders.scan import (
    choose_impl,
    chunk_length,
    selective_scan_chunked,
    selective_scan_reference,
    selective_scan_sequential,
)


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=257)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--chunks", default="0,8,16,32", help="chunk lengths to try (0 = ~sqrt(L))")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, L, E, N = args.batch, args.length, args.channels, args.state
    u = torch.randn(b, L, E, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(b, L, E, generator=g) - 3)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    B, C = torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
    D = torch.ones(E)
    params = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D)]
    gy = torch.randn(b, L, E, generator=g)

    def fwd_bwd(fn: Callable[..., torch.Tensor]) -> None:
        fn(*params).backward(gy)

    print(f"batch {b}, L {L}, E {E}, N {N}, threads {torch.get_num_threads()}  (ms, min of {args.repeats})")
    with torch.no_grad():
        f = best_ms(lambda: selective_scan_reference(*params), args.repeats)
    fb = best_ms(lambda: fwd_bwd(selective_scan_reference), args.repeats)
    print(f"  reference loop       fwd {f:7.1f}   fwd+bwd {fb:7.1f}")
    with torch.no_grad():
        f = best_ms(lambda: selective_scan_sequential(*params), args.repeats)
    fb = best_ms(lambda: fwd_bwd(selective_scan_sequential), args.repeats)
    print(f"  sequential           fwd {f:7.1f}   fwd+bwd {fb:7.1f}")
    for chunk in (int(c) for c in args.chunks.split(",")):

        def run(*xs: torch.Tensor, chunk: int = chunk) -> torch.Tensor:
            return selective_scan_chunked(*xs, chunk=chunk)

        with torch.no_grad():
            f = best_ms(lambda run=run: run(*params), args.repeats)
        fb = best_ms(lambda run=run: fwd_bwd(run), args.repeats)
        print(f"  chunked Lc={chunk_length(L, chunk):<3d} ({chunk:>2d})  fwd {f:7.1f}   fwd+bwd {fb:7.1f}")
    print(f"  auto picks: {choose_impl(b, E, N)}")


if __name__ == "__main__":
    main()
