"""Mamba encoder vs the SDPA AST at one size, timed alternately in one process.

    python benchmarks/encoder_ratio.py [--tokens 256 --threads 1 --rounds 8 --width 192 --depth 24]

benchmarks/encoders.py times each (arch, size, mode) in its own fresh process, so on a machine
shared with other jobs the two sides of a ratio are measured minutes apart under different load.
Here both models are built in one process and each round runs the Mamba encoder and then the AST
once, inference (no grad) and a training step (forward + backward of the embedding's sum, as
encoders.py), so load hits both alike. Prints the minimum and the median of each and the ratio
Mamba / AST of the minima (the issue's targets: <= 1.2 inference, <= 1.5 training at 257 tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from earmark.encoders import EncoderConfig, build_encoder
from earmark.runtime import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="patch tokens (8 frequency bands); +1 class token")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=24)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    base = EncoderConfig(embed_dim=args.width, depth=args.depth, max_frames=1024)
    torch.manual_seed(0)
    models = {arch: build_encoder(dataclasses.replace(base, arch=arch)) for arch in ("mamba", "ast")}
    bands = base.n_mels // base.patch
    x = torch.randn(1, base.n_mels, max(1, args.tokens // bands) * base.patch)

    def infer(m: torch.nn.Module) -> None:
        with torch.no_grad():
            m(x)

    def train(m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=False)
        m(x).sum().backward()

    load = os.getloadavg()
    tokens = models["mamba"].token_grid(x.shape[-1])
    print(
        f"width {args.width}, depth {args.depth}, batch 1, {tokens[0] * tokens[1] + 1} tokens, {args.threads} "
        f"thread(s), {args.rounds} alternating rounds; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    for mode, fn in (("infer", infer), ("train", train)):
        for m in models.values():
            m.train(mode == "train")
            fn(m)
            fn(m)
        times: dict[str, list[float]] = {arch: [] for arch in models}
        for _ in range(args.rounds):
            for arch, m in models.items():
                t0 = time.perf_counter()
                fn(m)
                times[arch].append(time.perf_counter() - t0)
        mamba, ast = min(times["mamba"]), min(times["ast"])
        med = {arch: statistics.median(t) for arch, t in times.items()}
        print(
            f"  {mode}: mamba {mamba * 1e3:7.1f} ms (median {med['mamba'] * 1e3:7.1f}), "
            f"ast {ast * 1e3:7.1f} ms (median {med['ast'] * 1e3:7.1f}), mamba / ast {mamba / ast:.2f}",
            flush=True,
        )
    load = os.getloadavg()
    print(f"  load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
