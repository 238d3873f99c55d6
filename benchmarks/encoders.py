"""Mamba encoder (own selective scan) vs the Audio Spectrogram Transformer at equal width and depth, on CPU.

The AST runs twice: with PyTorch's scaled_dot_product_attention ("ast") and with the attention
matrix materialised, softmax(QK^T / sqrt(d)) V as SSAST computes it ("astx", the memory baseline).
The Mamba scan is ``--scan-impl`` (auto: the numba kernel when numba imports).

    python benchmarks/encoders.py [--width 192 --depth 24] [--max-tokens 16384] [--threads 1]
    python benchmarks/encoders.py --quick          # small model, up to 2k tokens, fast presets only
    python benchmarks/encoders.py --sections breakdown,scan --processes 2   # some sections only

Sections:
  1. float32 matmul FLOP/s of this machine (the roofline the encoders are compared with).
  2. Scaling with the number of tokens (128, 256, ... up to --max-tokens; batch 1, 8 frequency bands,
     so tokens = 8 x time patches + the class token): forward time without grad and one training
     step (forward + backward of a sum of the embedding), peak memory, achieved FLOP/s as a fraction
     of the matmul FLOP/s, and the ratios AST / Mamba. Training rows also show Mamba with
     ``recompute=False`` ("keep": autograd keeps every activation of the conv/projection front,
     instead of recomputing it in backward) - the time/memory trade of the default. If ``mambapy``
     is importable, the same Mamba with mambapy's ``pscan`` swapped in for our scan (keeping
     activations, so compared with "keep" when training). A size is skipped for an arch/mode once
     a smaller one took longer than --skip-after seconds (or failed, e.g. out of memory).
  3. Where the Mamba encoder's time goes at the sizes the targets name (257 and 4097 tokens, 32
     one-second clips): the encoder with its scan swapped for a free stand-in, the scan's share,
     the matmul floor, and what each target (vs the AST's time and memory, 100x real time) would
     ask of the scan.
  4. Optional: mambapy's parallel scan vs our scan alone (only if ``mambapy`` is importable).
  5. Clips per second and real-time factor (compute time / audio duration, lower is better) for
     embedding 1 s, 10 s and 60 s clips with presets (forward, no grad).

Method. Time: minimum over repeats after a warm-up, repeats stop once --time-cap seconds are spent
(and with --processes N, the minimum over N fresh processes for measurements under 20 s; the
scan-alone section is run whole in each process, the minimum taken per cell).
Peak memory: each (arch, tokens, mode) runs in a fresh subprocess; ``resource.getrusage`` maxrss
(the process's peak resident set) is read after building the model and input and again after the
runs, and the delta is reported: the extra peak RSS of activations, attention buffers, autograd
state and gradients (not the weights, not torch itself). tracemalloc does not see torch's
allocations, and torch keeps no CPU allocator statistics, hence RSS. Memory that the allocator
reuses does not grow RSS, so this is the high-water mark of the run, as the OS sees it.
FLOPs are analytic (2 per multiply-add): all matmuls, convs and attention (QK^T and AV); for Mamba
also ~9 elementwise FLOPs per (token, channel, state) and direction for the scan; a training step
is counted as 3 x forward. Other elementwise work (norms, activations, softmax) is not counted.
Other processes on the machine inflate the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from earmark.audio.features import FeatureConfig
from earmark.encoders import EncoderConfig, build_encoder, resolve_config
from earmark.runtime import keep_freed_memory

HERE = __file__


def best_s(fn: Callable[[], object], repeats: int, time_cap: float) -> tuple[float, int]:
    """(minimum seconds over up to ``repeats`` timed runs after a warm-up, runs done); the warm-up
    counts as the only run when it alone exceeds ``time_cap``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > time_cap:
        return first, 1
    times, spent = [], first
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if spent > time_cap:
            break
    return min(times), len(times)


def matmul_flops(n: int, time_cap: float) -> float:
    """Measured float32 matmul FLOP/s (n x n @ n x n)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    s, _ = best_s(lambda: a @ b, 10, time_cap)
    return 2 * n**3 / s


def forward_flops(cfg: EncoderConfig, tokens: int, batch: int = 1, scan: bool = True) -> float:
    """Analytic forward FLOPs (see the module docstring) for ``tokens`` tokens incl. the class token;
    ``scan=False`` leaves out the scan's elementwise FLOPs (what is left is matmuls and convs)."""
    d, n = cfg.embed_dim, tokens
    flops = 2 * (n - 1) * cfg.patch**2 * d  # patch embedding
    if cfg.arch == "ast":
        per_layer = 2 * n * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * n * n * d  # qkv, proj, mlp; QK^T, AV
    else:
        e, r, s, dirs = cfg.inner_dim, cfg.rank, cfg.d_state, 2 if cfg.bidirectional else 1
        per_dir = 2 * n * e * (r + 2 * s) + 2 * n * r * e + 2 * n * e * cfg.d_conv + (9 * n * e * s if scan else 0)
        per_layer = 2 * n * d * 2 * e + 2 * n * e * d + dirs * per_dir
    return batch * (flops + cfg.depth * per_layer)


def grid_frames(tokens: int, cfg: EncoderConfig) -> int:
    """Frames giving ``tokens`` patch tokens (a multiple of the number of frequency bands)."""
    bands = cfg.n_mels // cfg.patch
    return max(1, tokens // bands) * cfg.patch


def pscan_selective_scan(u, delta, A, B, C, D=None, *, reverse=False, **_ignored):
    """The selective scan through mambapy's parallel scan (its Mamba's ``selective_scan``), our signature
    (grouped inputs - both directions of a block - run as one pscan per group, as mambapy would)."""
    from mambapy.pscan import pscan  # type: ignore[import-not-found]

    from earmark.encoders.scan import per_group

    def one(u, delta, A, B, C, D):
        da = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, E, N)
        bx = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
        hs = pscan(da, bx)
        y = (hs @ C.unsqueeze(-1)).squeeze(3)
        return y + D * u if D is not None else y

    return per_group(one, u, delta, A, B, C, D, reverse)


def free_scan(u, delta, A, B, C, D=None, **_ignored):
    """A stand-in for the selective scan that costs almost nothing: O(batch x L x E) elementwise
    work instead of O(batch x L x E x N), every input still in the autograd graph. The encoder
    with it shows what everything but the scan costs (its output is meaningless)."""
    y = u + delta + (B + C).sum(-1, keepdim=True) + A.sum(-1)[..., None, None, :]
    return y if D is None else y + D[..., None, None, :]


# spec["scan"] -> what replaces the encoder's selective_scan in a measurement ("own": nothing)
SCAN_SWAPS = {"mambapy": pscan_selective_scan, "none": free_scan}


def has_mambapy() -> bool:
    return importlib.util.find_spec("mambapy") is not None


# ----------------------------------------------------------------------------- one measurement (child)


def measure(spec: dict) -> dict:
    """Run in a fresh process: time + peak RSS delta of one (config, tokens, mode)."""
    torch.set_num_threads(spec["threads"])
    keep_freed_memory()  # as the earmark CLI runs (see earmark/runtime.py), for every arch alike
    if spec.get("mem_limit_gb"):  # fail (-> skipped) instead of pushing a shared machine into swap/OOM
        limit = int(spec["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    swap = SCAN_SWAPS.get(spec.get("scan", "own"))
    if swap is not None:
        import earmark.encoders.mamba as mamba_module

        if spec["config"].get("recompute", True):  # the fused branch would bypass the swap
            raise ValueError(f"the {spec['scan']} scan swap needs recompute=False")
        os.environ["EARMARK_SCAN"] = "torch"  # so is the numba kernel's fused branch (inference)
        mamba_module.selective_scan = swap
    cfg = EncoderConfig(**spec["config"])
    torch.manual_seed(0)
    model = build_encoder(cfg)
    frames = spec.get("frames") or grid_frames(spec["tokens"], cfg)
    x = torch.randn(spec.get("batch", 1), cfg.n_mels, frames)
    if spec["mode"] == "train":
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=False)  # grads stay allocated between steps, as in training
            model(x).sum().backward()

        fn = step
    else:
        model.eval()

        def fn() -> None:
            with torch.no_grad():
                model(x)

    warm_scan_kernel(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seconds, runs = best_s(fn, spec["repeats"], spec["time_cap"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "runs": runs, "peak_mib": (after - before) / 1024}


def warm_scan_kernel(cfg: EncoderConfig) -> None:
    """Load (or compile) the numba kernel and start its threads before memory is measured: its code
    and thread stacks are a one-time cost of the process, like torch's own, not activation memory."""
    from earmark.encoders.scan import numba_kernel, resolve_impl

    if cfg.arch != "mamba" or resolve_impl(torch.zeros(1, 1, 1), torch.zeros(1, 1), cfg.scan_impl) != "numba":
        return
    kernel = numba_kernel()
    u = torch.randn(2, 1, 4, 8)
    args = (u, torch.rand_like(u), -torch.rand(2, 8, 2), torch.randn(2, 1, 4, 2), torch.randn(2, 1, 4, 2))
    y, states = kernel.forward(*args, torch.ones(2, 8), (False, True), z=u[0], keep_states=True)
    kernel.backward(*args, torch.ones(2, 8), (False, True), states, y, z=u[0])


def run_child(spec: dict, timeout: float, flag: str = "--_measure"):
    """``measure`` (or, with flag ``--_scan``, ``scan_times``) in a subprocess; None when it fails
    (out of memory, timeout)."""
    try:
        out = subprocess.run(
            [sys.executable, HERE, flag, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of_processes(spec: dict, args: argparse.Namespace) -> dict | None:
    """``run_child`` in up to --processes fresh processes: the fastest time and the smallest peak.
    On this shared machine a whole process is now and then ~2x slow (runs cluster in time), so one
    process per measurement can be an outlier. A measurement over 20 s runs once."""
    best: dict | None = None
    for _ in range(max(1, args.processes)):
        r = run_child(spec, timeout=args.skip_after * 4 + 60)
        if r is None:
            return best
        if best is None:
            best = r
        else:
            best = dict(min(best, r, key=lambda x: x["seconds"]), peak_mib=min(best["peak_mib"], r["peak_mib"]))
        if r["seconds"] > 20:
            break
    return best


# ----------------------------------------------------------------------------- sections (parent)


def compared_configs(args: argparse.Namespace) -> dict[str, EncoderConfig]:
    """The encoders every section compares at --width / --depth: the Mamba (own scan), the AST, and
    the same Mamba keeping every activation (recompute=False) instead of recomputing the
    conv/projection front in backward (the default, as mamba-ssm's fused kernel does)."""
    base = EncoderConfig(embed_dim=args.width, depth=args.depth, max_frames=1024)
    mamba = dataclasses.replace(base, arch="mamba", scan_impl=args.scan_impl)
    return {
        "mamba": mamba,
        "ast": dataclasses.replace(base, arch="ast"),
        "keep": dataclasses.replace(mamba, recompute=False),
    }


def explicit_ast(args: argparse.Namespace) -> EncoderConfig:
    """The AST with the attention matrix materialised, softmax(QK^T / sqrt(d)) V as SSAST computes it."""
    return dataclasses.replace(compared_configs(args)["ast"], attention="explicit")


def measure_spec(args: argparse.Namespace, cfg: EncoderConfig, mode: str, scan: str = "own", **size) -> dict:
    """What :func:`measure` runs: ``size`` is tokens (batch 1) or batch and frames."""
    return {
        "scan": scan,
        "config": cfg.to_dict(),
        "mode": mode,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "time_cap": args.time_cap,
        "mem_limit_gb": args.mem_limit_gb,
        **size,
    }


def token_scaling(args: argparse.Namespace, peak: float) -> None:
    cfgs = compared_configs(args)  # "keep": training rows only
    cfgs["astx"] = explicit_ast(args)
    if has_mambapy():
        # the same encoder, its scan replaced by mambapy's pscan (the swap reaches only the plain
        # autograd path, so it keeps activations too; compared with "keep" when training)
        cfgs["pscan"] = cfgs["keep"]
    params = {k: sum(p.numel() for p in build_encoder(c).parameters()) / 1e6 for k, c in cfgs.items()}
    print(
        f"\n== token scaling: width {args.width}, depth {args.depth}, batch 1; "
        f"mamba {params['mamba']:.2f}M params (scan {args.scan_impl}), ast {params['ast']:.2f}M params "
        "(ast: scaled_dot_product_attention; astx: the same AST, attention matrix materialised as SSAST)"
    )
    print("   time = min over runs (s); mem = peak RSS delta (MiB); %mm = achieved FLOP/s / matmul FLOP/s")
    sizes = []
    t = 128
    while t <= args.max_tokens:
        sizes.append(t)
        t *= 2
    stopped: set[tuple[str, str]] = set()
    header = (
        f"{'tokens':>7} {'mode':<6}| {'mamba s':>8} {'MiB':>7} {'%mm':>5} | {'ast s':>8} {'MiB':>7} {'%mm':>5} "
        f"| {'ast/mamba time':>14} {'mem':>6} | {'keep s':>8} {'MiB':>7} "
        f"| {'astx s':>8} {'MiB':>7} {'astx/mamba mem':>14}"
        + (f" | {'pscan s':>8} {'MiB':>7} {'pscan/own':>9}" if "pscan" in cfgs else "")
    )
    print(header)
    print("-" * len(header))
    for tokens in sizes:
        for mode in ("infer", "train"):
            row: dict[str, dict | None] = {}
            for arch, cfg in cfgs.items():
                if arch == "keep" and mode == "infer":  # recompute changes nothing without grad
                    continue
                if (arch, mode) in stopped:
                    row[arch] = None
                    continue
                spec = measure_spec(args, cfg, mode, "mambapy" if arch == "pscan" else "own", tokens=tokens)
                r = best_of_processes(spec, args)
                if r is None or r["seconds"] > args.skip_after:
                    stopped.add((arch, mode))
                if r is not None:
                    n = cfg.n_mels // cfg.patch * (grid_frames(tokens, cfg) // cfg.patch) + 1
                    fl = forward_flops(cfg, n) * (3 if mode == "train" else 1)
                    r["frac"] = fl / r["seconds"] / peak
                row[arch] = r

            def cells(r: dict | None) -> str:
                if r is None:
                    return f"{'skipped':>8} {'':>7} {'':>5}"
                return f"{r['seconds']:8.3f} {r['peak_mib']:7.1f} {100 * r['frac']:4.0f}%"

            m, a = row["mamba"], row["ast"]
            ratio = f"{a['seconds'] / m['seconds']:14.2f}" if m and a else f"{'-':>14}"
            mem = f"{a['peak_mib'] / m['peak_mib']:6.2f}" if m and a and m["peak_mib"] > 0 else f"{'-':>6}"
            line = f"{tokens + 1:>7} {mode:<6}| {cells(m)} | {cells(a)} | {ratio} {mem}"
            k = row.get("keep")
            line += f" | {k['seconds']:8.3f} {k['peak_mib']:7.1f}" if k else f" | {'-':>8} {'':>7}"
            x = row.get("astx")
            xmem = f"{x['peak_mib'] / m['peak_mib']:14.2f}" if x and m and m["peak_mib"] > 0 else f"{'-':>14}"
            line += f" | {x['seconds']:8.3f} {x['peak_mib']:7.1f} {xmem}" if x else f" | {'skipped':>8} {'':>7} {xmem}"
            if "pscan" in cfgs:
                p, own = row["pscan"], (m if mode == "infer" else k)
                vs = f"{p['seconds'] / own['seconds']:9.2f}" if own and p else f"{'-':>9}"
                line += f" | {p['seconds']:8.3f} {p['peak_mib']:7.1f} {vs}" if p else f" | {'skipped':>8} {'':>7} {vs}"
            print(line, flush=True)
        if all(
            (arch, mode) in stopped for arch in cfgs for mode in ("infer", "train") if (arch, mode) != ("keep", "infer")
        ):
            print(f"   (stopping: every measurement at {tokens + 1} tokens took > {args.skip_after:.0f} s or failed)")
            break
    if stopped:
        which = ", ".join("/".join(s) for s in sorted(stopped))
        print(f"   skipped after > {args.skip_after:.0f} s (or a failure): {which}")


def time_breakdown(args: argparse.Namespace, peak: float) -> None:
    """Where the Mamba encoder's time goes at the sizes the targets name, and what each target asks
    of the scan. The encoder is timed with its scan swapped for :func:`free_scan` ("no scan"), so
    keep - no scan is the scan's share in context (both keep activations when training: the swap
    reaches only the plain autograd path). "mm floor" is the encoder's matmul and conv FLOPs at this
    machine's matmul FLOP/s: no implementation of this design, scan or not, runs faster. Training
    memory without the scan is measured keeping activations too, so it overstates what a recomputing
    step needs (benchmarks/recompute.py counts those bytes)."""
    cfgs = compared_configs(args)
    base = cfgs["mamba"]
    feats = FeatureConfig()
    one_s = feats.num_frames(feats.sample_rate)
    bands = base.n_mels // base.patch
    cases = [  # label, size, {mode: (target name, the time target given the AST's time)} (issue 16)
        ("257 tokens", {"tokens": 256}, {"infer": ("<= 1.2 x ast", 1.2), "train": ("<= 1.5 x ast", 1.5)}),
        ("4097 tokens", {"tokens": 4096}, {"infer": ("<= ast / 3", 1 / 3), "train": ("<= ast", 1.0)}),
        # 100x real time: 32 one-second clips in 0.32 s
        ("1 s clips x 32", {"tokens": 0, "batch": 32, "frames": one_s}, {"infer": (">= 100x RT", None)}),
    ]
    memory_target = "4097 tokens"  # peak memory <= 1.5 x the (SDPA) AST's
    print(
        "\n== where the Mamba encoder's time goes: its scan swapped for a free stand-in (O(L x E) work, "
        "not O(L x E x N))\n   scan = keep - no scan; mm floor = matmul + conv FLOPs / matmul FLOP/s; "
        "time s, peak MiB; each target for the Mamba encoder and what it asks"
    )
    header = (
        f"{'case':<15} {'mode':<6}| {'ast s':>7} {'mamba s':>8} {'keep s':>7} {'no scan':>8} {'scan':>7} "
        f"{'mm floor':>8} | {'ast MiB':>8} {'mamba':>7} {'keep':>7} {'no scan':>8} | target"
    )
    print(header)
    print("-" * (len(header) + 40))
    for label, size, modes in cases:
        batch = size.get("batch", 1)
        frames = size.get("frames") or grid_frames(size["tokens"], base)
        tokens = bands * -(-frames // base.patch) + 1
        for mode in modes:
            row = {}
            for name, cfg in (*cfgs.items(), ("none", cfgs["keep"])):
                if name == "keep" and mode == "infer":  # recompute changes nothing without grad
                    continue
                spec = measure_spec(args, cfg, mode, "none" if name == "none" else "own", **size)
                row[name] = best_of_processes(spec, args)
            if any(v is None for v in row.values()):
                failed = ", ".join(k for k, v in row.items() if v is None)
                print(f"{label:<15} {mode:<6}| a measurement failed: {failed}")
                continue
            ast, mamba, none = row["ast"], row["mamba"], row["none"]
            keep = row.get("keep", mamba)
            scan = keep["seconds"] - none["seconds"]
            floor = forward_flops(base, tokens, batch, scan=False) * (3 if mode == "train" else 1) / peak
            target_name, factor = modes[mode]
            target = 0.32 if factor is None else factor * ast["seconds"]
            verdict = _verdict(mamba["seconds"], none["seconds"], scan, target, floor, "takes")
            if label == memory_target:
                mem_target = ast["peak_mib"] * 1.5
                scan_mib = keep["peak_mib"] - none["peak_mib"]
                mem = _verdict(mamba["peak_mib"], none["peak_mib"], scan_mib, mem_target, 0.0, "peaks at")
                verdict += f"; memory <= 1.5 x ast = {mem_target:.0f} MiB: {mem}"
            keep_s, keep_mib = (f"{keep['seconds']:7.3f}", f"{keep['peak_mib']:7.1f}") if "keep" in row else ("-", "-")
            print(
                f"{label:<15} {mode:<6}| {ast['seconds']:7.3f} {mamba['seconds']:8.3f} {keep_s:>7} "
                f"{none['seconds']:8.3f} {scan:7.3f} {floor:8.3f} | {ast['peak_mib']:8.1f} {mamba['peak_mib']:7.1f} "
                f"{keep_mib:>7} {none['peak_mib']:8.1f} | {target_name} = {target:.3f} s: {verdict}",
                flush=True,
            )


def _verdict(full: float, rest: float, scan: float, target: float, floor: float, verb: str) -> str:
    """What meeting ``target`` (an upper bound on cost) asks, from the full cost, the cost without
    the scan (``rest``), the scan's share and a hard ``floor`` for the rest."""
    if full <= target:
        return "met"
    if floor >= target:
        return f"out of reach: the matmul floor alone is {floor / target:.1f}x the target"
    if rest >= target:
        return f"out of reach of any scan: the rest alone {verb} {rest / target:.1f}x the target"
    return f"the scan would need to be {scan / (target - rest):.1f}x cheaper"


SCAN_SHAPES = [  # (G, batch, L, E / width, N): E is 2 x --width; G = 2 is a bidirectional pair
    (1, 8, 257, 2, 16),
    (1, 1, 256, 2, 16),
    (1, 1, 1024, 2, 16),
    (1, 1, 4096, 2, 16),
    (2, 1, 256, 2, 16),
    (2, 1, 4096, 2, 16),
]


def scan_times(spec: dict) -> list[list[float]]:
    """Run in a fresh process: [pscan s, own s] for each of SCAN_SHAPES x (forward, fwd+bwd)."""
    from earmark.encoders.scan import selective_scan

    torch.set_num_threads(spec["threads"])
    keep_freed_memory()
    out = []
    for groups, bsz, length, mult, s in SCAN_SHAPES:
        e = mult * spec["width"]
        g = torch.Generator().manual_seed(0)
        u = torch.randn(groups, bsz, length, e, generator=g)
        delta = torch.nn.functional.softplus(torch.randn(groups, bsz, length, e, generator=g) - 3)
        a = -torch.arange(1, s + 1, dtype=torch.float32).repeat(groups, e, 1)
        b, c = (torch.randn(groups, bsz, length, s, generator=g) for _ in range(2))
        d = torch.ones(groups, e)
        reverse = (False, True)[:groups]
        inputs = (u, delta, a, b, c, d)
        if groups == 1:
            inputs, reverse = tuple(t[0] for t in inputs), False
        own = lambda *t, r=reverse: selective_scan(*t, impl=spec["scan_impl"], reverse=r)  # noqa: E731
        ref = lambda *t, r=reverse: pscan_selective_scan(*t, reverse=r)  # noqa: E731
        for mode in ("forward", "fwd+bwd"):
            times = []
            for fn in (ref, own):
                if mode == "forward":

                    def run(fn=fn, inputs=inputs) -> None:
                        with torch.no_grad():
                            fn(*inputs)
                else:
                    leaves = [t.clone().requires_grad_(True) for t in inputs]

                    def run(fn=fn, leaves=leaves) -> None:
                        fn(*leaves).sum().backward()

                times.append(best_s(run, spec["repeats"], spec["time_cap"])[0])
            out.append(times)
    return out


def mambapy_scan(args: argparse.Namespace, peak: float) -> None:
    """The scan alone, forward and forward + backward: ours vs mambapy's pscan, each time the
    minimum over --processes fresh processes. G = 2 is a bidirectional block's pair (the second
    reversed): one grouped call of ours, two pscans."""
    print("\n== selective scan alone: own vs mambapy pscan (incl. exp(dA), B x, C . h and D u)")
    if not has_mambapy():
        print("   mambapy is not installed: skipped (pip install -e '.[bench]' to compare its parallel scan)")
        return
    spec = {
        "width": args.width,
        "scan_impl": args.scan_impl,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "time_cap": args.time_cap,
    }
    best: list[list[float]] | None = None
    for _ in range(max(1, args.processes)):
        r = run_child(spec, timeout=3600, flag="--_scan")
        if r is None:
            print("   the scan measurement failed")
            return
        if best is None:
            best = r
        else:  # per cell, the faster process
            best = [[min(x, y) for x, y in zip(p, q, strict=True)] for p, q in zip(best, r, strict=True)]
    header = f"{'shape (G, B, L, E, N)':<25} {'mode':<9}| {'pscan ms':>9} {'own ms':>9} {'pscan/own':>9}"
    print(header)
    print("-" * len(header))
    cells = iter(best)
    for groups, bsz, length, mult, s in SCAN_SHAPES:
        for mode in ("forward", "fwd+bwd"):
            ref, own = next(cells)
            shape = f"({groups}, {bsz}, {length}, {mult * args.width}, {s})"
            print(f"{shape:<25} {mode:<9}| {ref * 1e3:9.1f} {own * 1e3:9.1f} {ref / own:9.2f}", flush=True)


def clip_throughput(args: argparse.Namespace, peak: float) -> None:
    feats = FeatureConfig()
    print("\n== embedding throughput (forward, no grad); RTF = compute time / audio time")
    header = f"{'preset':<10} {'params':>7} {'batch':>5} | " + " | ".join(
        f"{f'{s:g} s clips/s':>13} {'RTF':>8}" for s in args.seconds
    )
    print(header)
    print("-" * len(header))
    for name in args.presets.split(","):
        cfg = resolve_config(name)
        torch.manual_seed(0)
        model = build_encoder(cfg).eval()
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        for batch in args.clip_batch:
            cells = []
            for seconds in args.seconds:
                frames = feats.num_frames(int(seconds * feats.sample_rate))
                x = torch.randn(batch, cfg.n_mels, frames)
                with torch.no_grad():
                    t, _ = best_s(lambda model=model, x=x: model(x), args.repeats, args.time_cap)
                cells.append(f"{batch / t:13.2f} {t / (batch * seconds):8.5f}")
            print(f"{name:<10} {n_params:6.2f}M {batch:>5} | " + " | ".join(cells), flush=True)


# --sections: name -> section(args, matmul FLOP/s), run in the order given
SECTIONS = {"scaling": token_scaling, "breakdown": time_breakdown, "scan": mambapy_scan, "clips": clip_throughput}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--_measure", "--_scan"):
        child = measure if sys.argv[1] == "--_measure" else scan_times
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--scan-impl", default="auto", help="Mamba scan: auto | sequential | chunked | reference")
    p.add_argument("--presets", default="tiny,ast-tiny,fast,ast-fast", help="presets for the clip throughput table")
    p.add_argument("--seconds", default="1,10,60", help="clip durations for the throughput table")
    p.add_argument("--clip-batch", default="1,32", help="batch sizes for the clip throughput table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-cap", type=float, default=20.0, help="stop repeating one measurement after this many s")
    p.add_argument("--skip-after", type=float, default=20.0, help="skip larger sizes once one run takes longer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-limit-gb", type=float, default=0.0, help="address-space limit per measurement (0: none)")
    p.add_argument("--processes", type=int, default=1, help="timings: best of this many fresh processes")
    p.add_argument("--sections", default=",".join(SECTIONS), help="which sections to run, in this order")
    p.add_argument("--quick", action="store_true", help="width 64, depth 4, up to 2k tokens, fast presets")
    args = p.parse_args()
    sections = args.sections.split(",")
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if args.quick:
        args.width, args.depth, args.max_tokens = 64, 4, 2048
        args.presets, args.clip_batch, args.repeats, args.time_cap, args.skip_after = "fast,ast-fast", "2", 2, 3.0, 5.0
    args.seconds = [float(s) for s in args.seconds.split(",")]
    args.clip_batch = [int(b) for b in args.clip_batch.split(",")]
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    n = 512 if args.quick else 1024
    peak = matmul_flops(n, args.time_cap)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"== float32 matmul {n}x{n}: {peak / 1e9:.1f} GFLOP/s (the %mm reference)")
    for name in sections:
        SECTIONS[name](args, peak)


if __name__ == "__main__":
    main()
