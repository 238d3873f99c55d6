"""Time and saved-activation cost of the Mamba mixer's ``recompute`` setting, back to back in one process.

    python benchmarks/recompute.py [--tokens 257,1025,4097] [--rounds 4] [--threads 2]

One training step (forward + backward of a sum of the embedding) of the ``tiny`` encoder at batch 1,
with ``recompute=True`` (conv and projections recomputed in backward) and ``recompute=False``
(autograd keeps them), alternating, same weights. It prints the best time of each, their ratio,
the bytes autograd keeps for backward (counted with saved-tensor hooks; also for the AST of the
same width and depth) and the largest gradient difference between the two. Alternating in one
process cancels most of the machine's drift, which the fresh-process runs of
``benchmarks/encoders.py`` cannot.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from earmark.encoders import ENCODER_CONFIGS, build_encoder
from earmark.runtime import keep_freed_memory


def saved_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="257,1025,4097")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    base = dataclasses.replace(ENCODER_CONFIGS.get("tiny"), max_frames=8192)
    torch.manual_seed(0)
    models = {r: build_encoder(dataclasses.replace(base, recompute=r)).train() for r in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    ast = build_encoder(dataclasses.replace(base, arch="ast")).train()
    times = f"{'recompute s':>11} {'keep s':>8} {'ratio':>6}"
    print(f"{'tokens':>7} | {times} | {'kept MiB':>9} {'(keep)':>9} {'(AST)':>9} | grad diff")
    for tokens in (int(t) for t in args.tokens.split(",")):
        bands = base.n_mels // base.patch
        x = torch.randn(1, base.n_mels, (tokens - 1) // bands * base.patch)

        def step(m: torch.nn.Module, x: torch.Tensor = x) -> None:
            m.zero_grad(set_to_none=False)
            m(x).sum().backward()

        for m in models.values():
            step(m)
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.rounds):
            for r, m in models.items():
                t = time.perf_counter()
                step(m)
                best[r] = min(best[r], time.perf_counter() - t)
        pairs = zip(models[True].parameters(), models[False].parameters(), strict=True)
        diff = max((a.grad - b.grad).abs().max().item() for a, b in pairs)
        kept = {r: saved_mib(m, x) for r, m in models.items()}
        print(
            f"{tokens:>7} | {best[True]:11.3f} {best[False]:8.3f} {best[True] / best[False]:6.2f} | "
            f"{kept[True]:9.1f} {kept[False]:9.1f} {saved_mib(ast, x):9.1f} | {diff:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
