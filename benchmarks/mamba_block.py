"""Where one bidirectional Mamba block's CPU time goes (the numba kernel path), stage by stage.

    python benchmarks/mamba_block.py [--tokens 257 --batch 1 --width 192 --threads 1 --rounds 30]

Inference (no grad): the block's forward cut into the stages it runs - RMSNorm, in_proj, the
scan's front (depthwise conv + SiLU, x_proj, dt_proj, the stacked per-direction parameters), the
kernel call (softplus, scan, D skip, direction sum and SiLU(z) gate), out_proj and the residual -
each timed on its own, and the whole block; "rest" is the whole minus the stages (Python glue,
dispatch, allocations). Training (forward + backward of the block, as the encoder's recomputing
branch runs it): the whole, the kernel's forward (keeping chunk states) and backward alone, the
front's forward + backward through autograd, the two projections' forward + backward; "rest" as
above (the front runs twice: without grad in the forward, again with grad in backward).
Every round runs every measurement once (so machine load hits them alike); the minimum
over rounds is reported, in microseconds and as a share of the whole. ``--clock cpu`` (one
thread) times the process's CPU time instead of wall time: on a shared machine the wall clock
also counts the time other processes ran (numba's idle workers sleep, so they add nothing).
"""

from __future__ import annotations

import argparse
import inspect
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from earmark.encoders import EncoderConfig
from earmark.encoders import mamba as M
from earmark.encoders.scan import numba_kernel
from earmark.runtime import keep_freed_memory

CLOCK = time.perf_counter


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Minimum seconds of each callable over ``rounds`` interleaved rounds (after one warm-up)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            best[name] = min(best[name], CLOCK() - t0)
    return best


def report(title: str, best: dict[str, float], whole: str, stages: list[str]) -> None:
    total = best[whole]
    print(f"\n{title}: {total * 1e6:.0f} us")
    for name in stages:
        print(f"  {name:<34s} {best[name] * 1e6:8.0f} us  {100 * best[name] / total:5.1f}%")
    rest = total - sum(best[n] for n in stages)
    print(f"  {'rest (glue, dispatch, allocation)':<34s} {rest * 1e6:8.0f} us  {100 * rest / total:5.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=257)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the process's CPU time (1 thread only: excludes time the OS gave other processes)",
    )
    args = p.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu sums the CPU time of all threads: use it with --threads 1")
        CLOCK = time.process_time
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    K = numba_kernel()
    if K is None:
        raise SystemExit("numba is not installed: this breakdown is of the kernel path")
    cfg = EncoderConfig(embed_dim=args.width, d_state=args.state, depth=24)
    torch.manual_seed(0)
    blk = M.MambaBlock(cfg)
    mix = blk.mixer
    dirs = mix.directions()
    branch = M._Branch(tuple(d.reverse for d in dirs), cfg.rank, cfg.d_state)
    params = [q for d in dirs for q in d.params()]
    per = [params[i : i + 7] for i in range(0, len(params), 7)]
    # the conv + silu kernel in the front, where this version has it (as the fused branch runs it)
    fk = {"kernel": True} if "kernel" in inspect.signature(M._front).parameters else {}
    h = torch.randn(args.batch, args.tokens, args.width)
    r, n = cfg.rank, cfg.d_state
    load = os.getloadavg()
    print(
        f"one Mamba block: batch {args.batch}, {args.tokens} tokens, width {args.width} (E {cfg.inner_dim}, "
        f"N {n}), {args.threads} thread(s), min of {args.rounds} rounds, {args.clock} clock; "
        f"load average {load[0]:.2f} {load[1]:.2f}"
    )

    with torch.no_grad():
        hn = blk.norm(h)
        x, z = mix.in_proj(hn).chunk(2, dim=-1)
        front = M._front(branch, x, params, softplus=False, **fk)
        u = front[0]
        rows = u.view(u.shape[0], -1, u.shape[-1])
        w_x = torch.stack([q[2] for q in per]).transpose(1, 2)
        dbc = torch.bmm(rows, w_x)
        dt = dbc[..., :r]
        w_dt = torch.stack([q[3] for q in per]).transpose(1, 2)
        bias = torch.stack([q[4] for q in per])[:, None]
        # the direction sum inside the kernel, where this version has it
        summed = {"sum_groups": True} if "sum_groups" in inspect.signature(K.forward).parameters else {}
        ys = K.forward(*front, branch.reverse, z=z, scale=0.5, softplus=True)[0]
        y = ys.sum(0)
        out = mix.out_proj(y)
        conv_silu = getattr(M, "_conv_silu", None)

        def conv_and_silu() -> torch.Tensor:
            if conv_silu is not None:
                return conv_silu(x, [q[0] for q in per], [q[1] for q in per], branch.reverse)
            return F.silu(M._conv(x, [q[0] for q in per], [q[1] for q in per], branch.reverse))

        def stacked() -> tuple:
            return (-torch.exp(torch.stack([q[5] for q in per]).float()), torch.stack([q[6] for q in per]).float())

        tiny = [t[:, :, :1, :8].contiguous() for t in (u, front[1])]
        small = (tiny[0], tiny[1], front[2][:, :8].contiguous(), front[3][:, :, :1].contiguous())
        fns = {
            "block": lambda: blk(h),
            "rmsnorm": lambda: blk.norm(h),
            "in_proj": lambda: mix.in_proj(hn),
            "conv + silu": conv_and_silu,
            "x_proj (bmm)": lambda: torch.bmm(rows, w_x),
            "dt_proj (baddbmm)": lambda: torch.baddbmm(bias, dt, w_dt),
            "stacked A, D": stacked,
            "kernel (scan + gate, wrapper)": lambda: K.forward(
                *front, branch.reverse, z=z, scale=0.5, softplus=True, **summed
            ),
            "sum of directions": lambda: None if summed else ys.sum(0),
            "out_proj": lambda: mix.out_proj(y),
            "residual add": lambda: h + out,
            "kernel call, L=1 E=8 (overhead)": lambda: K.forward(
                *small, small[3], front[5][:, :8].contiguous(), branch.reverse
            ),
        }
        best = timed(fns, args.rounds)
    stages = [k for k in fns if k not in ("block", "kernel call, L=1 E=8 (overhead)")]
    report("inference, whole block", best, "block", stages)
    print(f"  (of the kernel: a call at L=1, E=8 costs {best['kernel call, L=1 E=8 (overhead)'] * 1e6:.0f} us)")

    # training: forward + backward of the block as the recomputing branch runs it
    gy = torch.randn_like(h)
    blk.train()
    leaf = h.clone().requires_grad_()

    def block_step() -> None:
        blk.zero_grad(set_to_none=True)
        leaf.grad = None
        blk(leaf).backward(gy)

    detached = [t.detach() for t in front]
    y_k, states = K.forward(*detached, branch.reverse, z=z, scale=0.5, softplus=True, keep_states=True)
    gys = torch.randn(ys.shape[1:])

    def kernel_forward() -> None:
        K.forward(*detached, branch.reverse, z=z, scale=0.5, softplus=True, keep_states=True, **summed)

    def kernel_backward() -> None:
        K.backward(
            *detached, branch.reverse, states, gys.expand(len(dirs), *gys.shape), z=z, scale=0.5, softplus=True
        )

    xg = x.detach().clone().requires_grad_()
    g_front = [torch.randn_like(t) for t in front]

    def front_fwd_bwd() -> None:
        outs = M._front(branch, xg, params, softplus=False, **fk)
        pairs = [(o, g) for o, g in zip(outs, g_front, strict=True) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])

    hg = hn.detach().clone().requires_grad_()
    yg = y.detach().clone().requires_grad_()
    g_in = torch.randn(*hn.shape[:-1], 2 * cfg.inner_dim)

    def projections() -> None:
        mix.in_proj(hg).backward(g_in)
        mix.out_proj(yg).backward(gy)

    def norm_fwd_bwd() -> None:
        blk.norm(leaf).backward(gy)

    def front_no_grad() -> None:
        with torch.no_grad():
            M._front(branch, x, params, softplus=False, **fk)

    del y_k
    fns = {
        "block": block_step,
        "front forward (no grad)": front_no_grad,
        "kernel forward (keep states)": kernel_forward,
        "kernel backward": kernel_backward,
        "front fwd + bwd (autograd)": front_fwd_bwd,
        "in_proj + out_proj fwd + bwd": projections,
        "rmsnorm fwd + bwd": norm_fwd_bwd,
    }
    best = timed(fns, args.rounds)
    report("training (forward + backward), whole block", best, "block", [k for k in fns if k != "block"])
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
