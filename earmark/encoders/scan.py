"""Selective scan (the Mamba recurrence) on a CPU: the compiled numba kernel where numba is
installed, else plain PyTorch fast enough to train with; mamba-ssm's CUDA kernel on a GPU.

The recurrence, per batch item, channel ``e`` and state ``n``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = C_t . h_t + D * u_t

Shapes: ``u, delta``: (batch, L, E); ``A``: (E, N); ``B, C``: (batch, L, N); ``D``: (E,) or None.
Grouped: the same with a leading G on every tensor - G independent scans with their own A and D
and a ``reverse`` flag each, run as one (the two directions of a bidirectional block: one loop over
time instead of two, which halves the per-step dispatch overhead).

Implementations (``impl``):

* ``numba`` - the compiled kernel in :mod:`earmark.encoders.scan_numba` (forward and backward of
  every group in one call, one pass over memory; numba is imported only when this is used).
* ``reference`` - :func:`selective_scan_reference`, a plain loop over time (``unbind``, autograd
  through every step). Slow but obviously right: the test oracle.
* ``sequential`` - :func:`selective_scan_sequential`, the recurrence one step at a time over
  (G x batch, N, E) slices; decays, inputs and outputs are computed a block of steps at a time in
  block-sized buffers that stay in cache.
* ``chunked`` - :func:`selective_scan_chunked`, a two-level chunked scan (below).
* ``cuda`` - :func:`selective_scan_mamba_ssm`, mamba-ssm's fused CUDA kernel (optional; never
  required: only when that package is installed and the tensors are on a CUDA device).
* ``auto`` (default) - ``cuda`` where it can run; else ``numba`` for CPU tensors when numba
  imports (``EARMARK_SCAN=torch`` or ``numba`` overrides this, see :func:`resolve_impl`); else
  sequential, unless one step's state has < 2048 elements and the sequence is >= 16 steps: then
  per-op overhead dominates and the chunked scan's fewer, larger ops win (e.g. the ``fast``
  preset at batch 1). The PyTorch scans stay: the oracle the kernel is tested against, and the
  fallback without numba or off the CPU.

All fast paths share one autograd function (:class:`_Scan`) with a hand-written backward. The
chunked scan saves only the inputs and recomputes all states; the sequential scan (and the numba
kernel, every 32 steps) also keeps the state entering each block (1/k of the states), and its
backward walks the blocks from the end, recomputing one block's states at a time and running the
adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` through it - no (L, batch, N, E)
tensor is ever allocated. :func:`scan_forward` and :func:`scan_backward` expose the two halves to
callers that fuse the scan into a larger autograd function (the Mamba mixer's branch that
recomputes conv and projections in backward). ``reverse=True`` scans from the last step to the
first without flipping any state-sized tensor.

CPU facts the PyTorch scans are built on (AVX-512, torch 2.13): ``torch.exp2`` is an order of
magnitude cheaper per element than ``torch.exp``, so decays are ``exp2(delta * A / ln 2)``; a
PyTorch op has a fixed dispatch cost however small, so a step of a batch-1 scan is
dispatch-bound; creating a view costs about as much, so the per-step views are made once per call
(``benchmarks/scan.py`` and ``benchmarks/encoders.py`` measure all of it). Tried and not used: the
two directions on two Python threads (faster for the scan alone at large steps, slower inside the
encoder: a GIL hand-off per step and two OpenMP teams on the same cores); a ``torch.compile``'d
block of steps (faster than this loop, but seconds of C++ compilation per shape and a compiler
needed at run time - the numba kernel compiles once and caches to disk).

Why the chunked scan is not the textbook closed form ``h_t = exp(S_t) (h_0 + sum_s exp(-S_s) x_s)``
with ``S = cumsum(delta * A)``: on a CPU in eager PyTorch that form costs about twice the memory
passes of a recurrence (exp, divide, cumsum along a strided axis, which is itself slow) and
``exp(-S)`` overflows float32 once the decay summed within a chunk passes ~88, which needs a
guard. Here the time axis is cut into ``nc`` chunks of length ``Lc`` and

1. the within-chunk recurrence (zero initial state) runs for all chunks at once: ``Lc`` steps,
   each a single ``addcmul`` over (nc, batch, N, E);
2. a short sequential pass over the ``nc`` chunk boundaries carries the true state from chunk
   to chunk (using each chunk's total decay, a product of the per-step decays);
3. one more vectorized pass adds ``(running decay product) * (carried state)`` to every step.

Only products of decays in (0, 1] appear - nothing can overflow, nothing is clamped, and a decay
that underflows to 0 is exactly what the sequential loop computes too. There are ``~2 Lc + nc``
small Python-level steps instead of ``L``.

Computation runs in float64 when any input is float64, otherwise float32 (half and bfloat16
inputs are upcast; the output has ``u``'s dtype).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SCAN_IMPLS = ("auto", "numba", "sequential", "chunked", "reference", "cuda")
SCAN_ENV = "EARMARK_SCAN"  # "torch" or "numba": what ``auto`` runs on CPU tensors

Reverse = bool | Sequence[bool]


def selective_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *, reverse: Reverse = False
) -> Tensor:
    """Sequential loop over time; the oracle the fast scan is tested against."""
    if u.ndim == 4 or reverse:
        return per_group(selective_scan_reference, u, delta, A, B, C, D, reverse)
    dtype = _compute_dtype(u, delta, A, B, C)
    u32, d32, A32, B32, C32 = (t.to(dtype) for t in (u, delta, A, B, C))
    decay = torch.exp(d32[..., None] * A32)  # (batch, L, E, N)
    x = (d32 * u32)[..., None] * B32[:, :, None, :]
    h = u32.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(1), x.unbind(1), C32.unbind(1), strict=True):
        h = a_t * h + x_t
        ys.append((h * c_t[:, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.to(dtype) * u32
    return y.to(u.dtype)


def per_group(scan, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, reverse: Reverse):
    """Run ``scan(u, delta, A, B, C, D)``, written for one ungrouped forward scan, on grouped and/or
    reversed inputs: one call per group, reversed ones on time-flipped inputs (output flipped back)."""
    if u.ndim == 4:
        flags = _reverse_flags(reverse, u.shape[0])
        ds = D.unbind(0) if D is not None else (None,) * u.shape[0]
        parts = zip(u, delta, A, B, C, ds, flags, strict=True)
        return torch.stack([per_group(scan, *p) for p in parts])
    if reverse:
        return scan(u.flip(1), delta.flip(1), A, B.flip(1), C.flip(1), D).flip(1)
    return scan(u, delta, A, B, C, D)


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    chunk: int = 0,
    reverse: Reverse = False,
) -> Tensor:
    """Two-level chunked scan with a recomputing analytic backward; ``chunk=0`` picks ~sqrt(L)."""
    _check_shapes(u, delta, A, B, C, D)
    return _apply(u, delta, A, B, C, D, plan_scan(u, A, "chunked", chunk=chunk, reverse=reverse))


def selective_scan_sequential(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    block: int = 0,
    reverse: Reverse = False,
) -> Tensor:
    """Step-by-step scan; its analytic backward recomputes the states from those saved at block starts.

    ``block``: time steps whose decays/inputs/outputs are computed together (0: :func:`block_steps`).
    """
    _check_shapes(u, delta, A, B, C, D)
    return _apply(u, delta, A, B, C, D, plan_scan(u, A, "sequential", block=block, reverse=reverse))


def block_steps(rows: int, channels: int, state: int, budget: int = 1 << 19) -> int:
    """Time steps per block of the sequential scan (``rows`` = groups x batch): enough to amortize
    per-op overhead, few enough that the block buffers (``budget`` elements each) stay in cache."""
    return max(1, budget // max(1, rows * channels * state))


def choose_impl(rows: int, channels: int, state: int, length: int) -> str:
    """``auto``'s choice. The sequential scan, unless one step's state (rows x E x N) is so small
    that the per-step dispatch outweighs its arithmetic and the sequence is long enough
    for the chunked scan's extra passes to pay off."""
    return "chunked" if rows * channels * state < 2048 and length >= 16 else "sequential"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    chunk: int = 0,
    impl: str = "auto",
    reverse: Reverse = False,
) -> Tensor:
    """Run the scan with ``impl`` in SCAN_IMPLS (``auto``: see :func:`choose_impl`).

    Ungrouped: u, delta (batch, L, E), A (E, N), B, C (batch, L, N), D (E,). Grouped: the same with
    a leading G axis on every tensor (G independent scans with their own A and D, run in one pass:
    the two directions of a bidirectional block), and ``reverse`` one flag per group.
    ``reverse=True`` scans from the last step to the first: the same as flipping the time axis of
    u, delta, B, C and of the result, without the copies.
    """
    impl = resolve_impl(u, A, impl)
    if impl == "cuda":
        return selective_scan_mamba_ssm(u, delta, A, B, C, D, reverse=reverse)
    if impl == "numba":
        _check_shapes(u, delta, A, B, C, D)
        return _apply(u, delta, A, B, C, D, plan_scan(u, A, "numba", reverse=reverse))
    if impl == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, chunk=chunk, reverse=reverse)
    if impl == "sequential":
        return selective_scan_sequential(u, delta, A, B, C, D, reverse=reverse)
    if impl == "reference":
        _check_shapes(u, delta, A, B, C, D)
        return selective_scan_reference(u, delta, A, B, C, D, reverse=reverse)
    raise ValueError(f"unknown selective scan impl {impl!r}; known: {', '.join(SCAN_IMPLS)}")


def uses_own_scan(u: Tensor, impl: str) -> bool:
    """Whether :func:`selective_scan` with ``impl`` runs one of this module's fast scans (the ones
    :func:`scan_forward` / :func:`scan_backward` expose: numba, sequential, chunked)."""
    return impl in ("numba", "sequential", "chunked") or (impl == "auto" and not _wants_kernel(u))


def resolve_impl(u: Tensor, A: Tensor, impl: str = "auto") -> str:
    """What ``impl`` runs for these inputs. ``auto``: mamba-ssm's kernel for CUDA tensors when
    installed; the numba kernel for CPU tensors when numba imports; else :func:`choose_impl`.
    The environment variable ``EARMARK_SCAN`` = ``torch`` or ``numba`` overrides ``auto``'s choice
    on CPU tensors (``numba`` when numba is missing is an error, not a silent fallback)."""
    if impl != "auto":
        return impl
    if _wants_kernel(u):
        return "cuda"
    forced = os.environ.get(SCAN_ENV, "").strip().lower()
    if forced not in ("", "torch", "numba"):
        raise ValueError(f"{SCAN_ENV} must be 'torch' or 'numba', got {forced!r}")
    if forced == "numba" or (not forced and u.device.type == "cpu" and numba_kernel() is not None):
        return "numba"
    return choose_impl(_rows(u), A.shape[-2], A.shape[-1], u.shape[-2])


def _import_numba_kernel():
    """The kernel module; raises ImportError when numba is not installed."""
    from earmark.encoders import scan_numba

    return scan_numba


@functools.cache
def numba_kernel():
    """:mod:`earmark.encoders.scan_numba`, or None when numba is not importable (looked up once)."""
    try:
        return _import_numba_kernel()
    except ImportError:
        return None


def require_numba(u: Tensor):
    kernel = numba_kernel()
    if kernel is None:
        raise RuntimeError(
            f"selective scan impl 'numba' needs the numba package (pip install numba); "
            f"{SCAN_ENV}=torch or another impl runs without it"
        )
    if u.device.type != "cpu":
        raise RuntimeError(f"selective scan impl 'numba' runs on CPU tensors, got {u.device}")
    return kernel


def selective_scan_mamba_ssm(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *, reverse: Reverse = False
) -> Tensor:
    """The scan through mamba-ssm's fused CUDA kernel (``selective_scan_fn``, with its own
    recomputing backward), for CUDA tensors when that package is installed; ``auto`` picks it then.
    Same arguments and result as :func:`selective_scan`: this converts to the kernel's layout
    ((batch, E, L) and (batch, N, L)), flips reversed groups and runs the groups one by one."""
    kernel = _mamba_ssm_kernel()
    if kernel is None:
        raise RuntimeError(
            "selective scan impl 'cuda' needs the mamba-ssm package (pip install mamba-ssm) and CUDA tensors; "
            "impl='auto' uses it only when both are there"
        )
    _check_shapes(u, delta, A, B, C, D)

    def one(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> Tensor:
        dt = u.dtype  # the kernel wants delta and a time-varying B, C in the input's dtype; A, D in float32
        y = kernel(
            u.transpose(1, 2),
            delta.to(dt).transpose(1, 2),
            A.float(),
            B.to(dt).transpose(1, 2),
            C.to(dt).transpose(1, 2),
            None if D is None else D.float(),
        )
        return y.transpose(1, 2).to(u.dtype)

    return per_group(one, u, delta, A, B, C, D, reverse)


@functools.cache
def _mamba_ssm_kernel():
    """mamba-ssm's ``selective_scan_fn``, or None when the package is not installed (looked up
    once: a failed import searches the whole path again every time)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def _wants_kernel(u: Tensor) -> bool:
    return u.is_cuda and _mamba_ssm_kernel() is not None


def chunk_length(length: int, chunk: int = 0) -> int:
    """The within-chunk length used for a sequence: ``chunk`` if given, else ~sqrt(L) (balances the
    ``Lc`` within-chunk steps against the ``L / Lc`` boundary steps)."""
    if chunk <= 0:
        chunk = math.isqrt(max(length, 1) - 1) + 1
    return max(1, min(chunk, length))


# --------------------------------------------------------------------------------------------------
# implementation


def _rows(u: Tensor) -> int:
    """Independent scans run side by side: groups x batch."""
    return u.shape[-3] * (u.shape[0] if u.ndim == 4 else 1)


def _skip(u: Tensor, A: Tensor, D: Tensor | None) -> Tensor:
    return D if D is not None else torch.zeros(A.shape[:-1], dtype=A.dtype, device=u.device)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reverse_flags(reverse: Reverse, groups: int) -> tuple[bool, ...]:
    flags = (bool(reverse),) * groups if isinstance(reverse, bool) else tuple(bool(r) for r in reverse)
    if len(flags) != groups:
        raise ValueError(f"reverse needs one flag per group ({groups}); got {len(flags)}")
    return flags


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> None:
    """Shapes, ungrouped ((batch, L, E) with A (E, N)) or grouped (a leading G on every tensor)."""
    if u.ndim not in (3, 4) or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (batch, L, E) or (G, batch, L, E); got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    lead = tuple(u.shape[:-3])
    *_, bsz, length, e = u.shape
    if A.ndim != len(lead) + 2 or tuple(A.shape[:-1]) != (*lead, e):
        raise ValueError(f"A must be {(*lead, e)} + (N,); got {tuple(A.shape)}")
    n = A.shape[-1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (*lead, bsz, length, n):
            raise ValueError(f"{name} must be (batch, L, N) = {(*lead, bsz, length, n)}; got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (*lead, e):
        raise ValueError(f"D must be {(*lead, e)}; got {tuple(D.shape)}")


@dataclass(frozen=True)
class ScanPlan:
    """How a grouped fast scan runs: ``impl`` numba (the compiled kernel, states saved every
    ``block`` steps), else ``chunk > 0`` chunked with that chunk length, ``chunk == 0`` sequential
    in blocks of ``block`` steps; ``reverse`` one flag per group."""

    chunk: int
    block: int
    reverse: tuple[bool, ...]
    impl: str = "torch"


def plan_scan(
    u: Tensor, A: Tensor, impl: str = "auto", *, chunk: int = 0, block: int = 0, reverse: Reverse = False
) -> ScanPlan:
    """The :class:`ScanPlan` for grouped (or ungrouped) inputs and a fast ``impl`` (auto, numba,
    sequential or chunked); ``chunk`` / ``block`` 0 pick :func:`chunk_length` / :func:`block_steps`
    (numba: the kernel's state interval)."""
    groups = u.shape[0] if u.ndim == 4 else 1
    flags = _reverse_flags(reverse, groups)
    length, e, n = u.shape[-2], A.shape[-2], A.shape[-1]
    if impl == "auto":
        impl = resolve_impl(u, A)
    if impl == "numba":
        kernel = require_numba(u)
        return ScanPlan(0, block if block > 0 else kernel.CHUNK, flags, "numba")
    if impl == "chunked":
        return ScanPlan(chunk_length(length, chunk), 0, flags)
    if impl == "sequential":
        k = block if block > 0 else block_steps(_rows(u), e, n)
        return ScanPlan(0, max(1, min(k, length)), flags)
    raise ValueError(f"no fast selective scan impl {impl!r}; known: auto, numba, sequential, chunked")


def _apply(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, plan: ScanPlan) -> Tensor:
    """Add the group axis if absent, run :class:`_Scan`, drop the axis again (shapes checked)."""
    # inside forward, ctx.needs_input_grad is True even under no_grad: decide here
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D))
    if u.ndim == 4:
        return _Scan.apply(u, delta, A, B, C, _skip(u, A, D), plan, grad)
    grouped = (t[None] for t in (u, delta, A, B, C, _skip(u, A, D)))
    return _Scan.apply(*grouped, plan, grad)[0]


def _time_major(t: Tensor, dtype: torch.dtype, reverse: tuple[bool, ...]) -> Tensor:
    """(G, batch, L, ...) -> contiguous (L, G, batch, ...) in the compute dtype, the time axis of
    each reversed group flipped (so every group scans forward in storage order)."""
    out = t.new_empty((t.shape[2], *t.shape[:2], *t.shape[3:]), dtype=dtype)
    for g, rev in enumerate(reverse):
        src = t[g].transpose(0, 1)
        out[:, g] = src.flip(0) if rev else src
    return out


def _group_major(t: Tensor, reverse: tuple[bool, ...]) -> Tensor:
    """Inverse of :func:`_time_major`: (L, G, batch, ...) -> (G, batch, L, ...) (a view if nothing
    is reversed)."""
    t = t.transpose(0, 1)  # (G, L, batch, ...)
    if any(reverse):
        t = torch.stack([tg.flip(0) if rev else tg for tg, rev in zip(t.unbind(0), reverse, strict=True)])
    return t.transpose(1, 2)


# Layout: tensors are time-major, (L, G, batch, ...) with G the groups (scan directions); states are
# (L, G * batch, N, E) - channels innermost, so the broadcast products (delta_t x A, B_t x delta_t u_t)
# run over long contiguous rows (with E innermost, an (E, 1) x (1, N) outer product is ~3x slower on
# a CPU). A is passed transposed and in base 2: A2 = A.T / ln 2 (G, N, E), so a decay is
# exp2(delta A2) - torch.exp2 is ~10x faster than torch.exp on this machine's CPU (AVX-512).


def _states(deltaT: Tensor, duT: Tensor, A2: Tensor, BT: Tensor, lc: int) -> tuple[Tensor, Tensor]:
    """All hidden states h (Lp, R, N, E), R = G * batch, and the per-step decays, time-major.

    Lp = L rounded up to a multiple of ``lc``; the padded tail has decay 1 and input 0.
    """
    length, groups, bsz, e = deltaT.shape
    rows, n = groups * bsz, A2.shape[1]
    nc = -(-length // lc)
    lp = nc * lc
    a = deltaT.new_empty(lp, rows, n, e)
    h = deltaT.new_empty(lp, rows, n, e)
    seq = _Sequence(deltaT, duT, A2, BT)
    seq.terms_into(0, length, a[:length].view(length, groups, bsz, n, e), h[:length])
    a[length:].fill_(1.0)
    h[length:].zero_()
    av = a.view(nc, lc, rows, n, e)
    hv = h.view(nc, lc, rows, n, e)
    # 1. within-chunk recurrence from a zero state, all chunks at once; total decay per chunk
    prod = av[:, 0].clone() if nc > 1 else None
    for i in range(1, lc):
        hv[:, i].addcmul_(av[:, i], hv[:, i - 1])
        if prod is not None:
            prod.mul_(av[:, i])
    if prod is None:
        return h, a
    # 2. true state at the end of chunk c (entering chunk c + 1)
    carry = deltaT.new_empty(nc - 1, rows, n, e)
    carry[0] = hv[0, -1]
    for c in range(1, nc - 1):
        torch.addcmul(hv[c, -1], prod[c], carry[c - 1], out=carry[c])
    # 3. add the decayed carried state to every step of chunks 1..nc-1
    run = av[1:, 0].clone()
    hv[1:, 0].addcmul_(run, carry)
    for i in range(1, lc):
        run.mul_(av[1:, i])
        hv[1:, i].addcmul_(run, carry)
    return h, a


def _adjoint(a: Tensor, g: Tensor, lc: int) -> None:
    """In place: g_t <- g_t + a_{t+1} g_{t+1}, accumulated backwards in time (the adjoint scan)."""
    lp, rows, n, e = a.shape
    nc = lp // lc
    av = a.view(nc, lc, rows, n, e)
    gv = g.view(nc, lc, rows, n, e)
    # 1. within-chunk reverse recurrence; total decay of each chunk
    prod = av[:, lc - 1].clone() if nc > 1 else None
    for i in range(lc - 2, -1, -1):
        gv[:, i].addcmul_(av[:, i + 1], gv[:, i + 1])
        if prod is not None:
            prod.mul_(av[:, i])
    if prod is None:
        return
    # 2. carry[c]: what flows into the last step of chunk c from chunks c+1.. (= a_next g_next)
    carry = a.new_empty(nc - 1, rows, n, e)
    torch.mul(av[nc - 1, 0], gv[nc - 1, 0], out=carry[nc - 2])
    for c in range(nc - 3, -1, -1):
        torch.mul(av[c + 1, 0], gv[c + 1, 0], out=carry[c])
        carry[c].addcmul_(prod[c + 1], carry[c + 1])
    # 3. spread the carried adjoint through chunks 0..nc-2 with the running decay product
    gv[:-1, lc - 1].add_(carry)
    run = av[:-1, lc - 1].clone()
    for i in range(lc - 2, -1, -1):
        gv[:-1, i].addcmul_(run, carry)
        if i:
            run.mul_(av[:-1, i])


def _readout(CT: Tensor, h: Tensor, out: Tensor | None = None) -> Tensor:
    """y_t = C_t . h_t for every row: CT (m, R, N), h (m, R, N, E) -> (m, R, E)."""
    m, rows, n, e = h.shape
    flat = m * rows
    res = torch.bmm(CT.reshape(flat, 1, n), h.view(flat, n, e), out=None if out is None else out.view(flat, 1, e))
    return res.view(m, rows, e)


def _dot_channels(x: Tensor, v: Tensor, out: Tensor | None = None, buf: Tensor | None = None) -> Tensor:
    """sum_e x[..., n, e] v[..., e] for x (m, R, N, E), v (m, R, E) -> (m, R, N). As mul + sum: a
    batched matrix-vector ``bmm`` is ~5x slower on a CPU. ``buf`` (x's shape) saves an allocation."""
    m, rows, n, e = x.shape
    return torch.sum(torch.mul(x, v.reshape(m, rows, 1, e), out=buf), -1, out=out)


def _chunked(deltaT: Tensor, duT: Tensor, A2: Tensor, BT: Tensor, CT: Tensor, lc: int) -> Tensor:
    length, groups, bsz, e = deltaT.shape
    h, _ = _states(deltaT, duT, A2, BT, lc)
    return _readout(CT, h[:length]).view(length, groups, bsz, e)


def _decay_grads(
    ds: Tensor, deltaT: Tensor, A2: Tensor, need_A: bool, need_delta: bool, buf: Tensor | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """From ds = dL/d(delta_t A) (m, R, N, E): (dL/dA.T per group (G, N, E), sum_n ds A (m, G, batch, E)).

    Overwrites ds; ``buf`` (ds's shape), if given, saves an allocation."""
    m, groups, bsz, e = deltaT.shape
    n = A2.shape[1]
    dsv = ds.view(m, groups, bsz, n, e)
    out = None if buf is None else buf.view(dsv.shape)
    g_A = torch.mul(dsv, deltaT[:, :, :, None, :], out=out).sum((0, 2)) if need_A else None
    g_dl = dsv.mul_(A2[:, None]).sum(-2).mul_(math.log(2.0)) if need_delta else None
    return g_A, g_dl


def _chunked_grads(
    deltaT: Tensor, duT: Tensor, A2: Tensor, BT: Tensor, CT: Tensor, gyT: Tensor, lc: int, need: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """Backward of the chunked scan. Returns (dL/d(delta u), sum_n dL/d(delta A) A, dL/dA.T, dL/dB,
    dL/dC), time-major, None where not needed."""
    need_du, need_delta, need_A, need_B, need_C = need
    length, groups, bsz, e = deltaT.shape
    rows, n = groups * bsz, A2.shape[1]
    flat = length * rows
    h, a = _states(deltaT, duT, A2, BT, lc)
    g_C = _dot_channels(h[:length], gyT).view(length, groups, bsz, n) if need_C else None
    g_du = g_dl = g_A = g_B = None
    if need_du or need_delta or need_A or need_B:
        g = torch.empty_like(h)  # adjoint states g_t = C_t dy_t + a_{t+1} g_{t+1}
        torch.mul(CT.view(length, rows, n, 1), gyT.view(length, rows, 1, e), out=g[:length])
        g[length:].zero_()
        _adjoint(a, g, lc)
        if need_B:
            g_B = _dot_channels(g[:length], duT).view(length, groups, bsz, n)
        if need_du:
            g_du = torch.bmm(BT.view(flat, 1, n), g[:length].view(flat, n, e)).view(length, groups, bsz, e)
        if need_delta or need_A:
            ds = a  # dL/d(delta_t A) = g_t a_t h_{t-1}, written over a (not needed any more)
            ds[1:].mul_(g[1:]).mul_(h[:-1])
            ds[0].zero_()
            g_A, g_dl = _decay_grads(ds[:length], deltaT, A2, need_A, need_delta)
    return g_du, g_dl, g_A, g_B, g_C


def _sequential(
    deltaT: Tensor, duT: Tensor, A2: Tensor, BT: Tensor, CT: Tensor, k: int, bounds: Tensor | None = None
) -> Tensor:
    """One step at a time; decays, inputs and outputs are computed ``k`` steps at a time into small
    reused buffers that stay in cache. Returns y (L, G, batch, E); with ``bounds`` given, also
    writes the state entering each block (zeros for the first) into it."""
    seq = _Sequence(deltaT, duT, A2, BT, CT)
    k = max(1, min(k, seq.length))
    a = _Block(seq, k)
    hb = (_Block(seq, k), _Block(seq, k))  # ping-pong: prev stays valid
    y = deltaT.new_empty(seq.length, seq.rows, seq.e)
    y_flat = y.view(-1, 1, seq.e)
    prev: Tensor | None = None  # the state before the current step
    for i, t0 in enumerate(range(0, seq.length, k)):
        t1 = min(t0 + k, seq.length)
        if bounds is not None:
            bounds[i].zero_() if prev is None else bounds[i].copy_(prev)
        h = hb[i % 2]
        seq.terms(t0, t1, a, h)
        _recur(a.steps[: t1 - t0], h.steps[: t1 - t0], prev)
        prev = h.steps[t1 - t0 - 1]
        seq.readout(t0, t1, h, y_flat)
    return y.view(seq.length, *deltaT.shape[1:])


class _Sequence:
    """The working inputs of a scan, viewed once for the block loops: a block then only slices
    them (at batch 1 a block's Python-level calls cost as much as its arithmetic)."""

    def __init__(self, deltaT: Tensor, duT: Tensor, A2: Tensor, BT: Tensor, CT: Tensor | None = None) -> None:
        self.length, self.groups, self.bsz, self.e = deltaT.shape
        self.rows, self.n = self.groups * self.bsz, A2.shape[1]
        self.delta = deltaT[:, :, :, None, :]  # (L, G, batch, 1, E) x A2 (G, 1, N, E)
        self.A2 = A2[:, None]
        self.B = BT.view(self.length, self.rows, self.n, 1)  # x (L, R, 1, E) delta u
        self.du = duT.view(self.length, self.rows, 1, self.e)
        self.C_flat = None if CT is None else CT.reshape(-1, 1, self.n)  # (L R, 1, N) for the readout

    def terms(self, t0: int, t1: int, a: _Block, x: _Block) -> None:
        """Steps t0..t1-1 into the first t1 - t0 steps of block buffers (see :meth:`terms_into`)."""
        self.terms_into(t0, t1, a.split(t1 - t0), x.first(t1 - t0))

    def terms_into(self, t0: int, t1: int, a: Tensor, x: Tensor) -> None:
        """Steps t0..t1-1: decays a <- exp2(delta_t A2), a viewed (m, G, batch, N, E), and inputs
        x <- B_t (delta_t u_t), (m, G * batch, N, E): h_t = a_t h_{t-1} + x_t."""
        torch.mul(self.delta[t0:t1], self.A2, out=a).exp2_()
        torch.mul(self.B[t0:t1], self.du[t0:t1], out=x)

    def readout(self, t0: int, t1: int, h: _Block, y_flat: Tensor) -> None:
        """y_t = C_t . h_t for steps t0..t1-1 into y_flat (L R, 1, E)."""
        rows = slice(t0 * self.rows, t1 * self.rows)
        torch.bmm(self.C_flat[rows], h.flat[: (t1 - t0) * self.rows], out=y_flat[rows])


class _Block:
    """A (k, rows, N, E) buffer plus its views (per step, flat, split by group), made once per
    scan: creating a view costs about as much as a step's arithmetic at batch 1, so the loops only
    reuse them."""

    def __init__(self, seq: _Sequence, k: int) -> None:
        self.k = k
        self.full = seq.delta.new_empty(k, seq.rows, seq.n, seq.e)
        self.steps = self.full.unbind(0)
        self.flat = self.full.view(k * seq.rows, seq.n, seq.e)
        self._split = self.full.view(k, seq.groups, seq.bsz, seq.n, seq.e)

    def first(self, m: int) -> Tensor:
        """The first m steps (k, rows, N, E)[:m] - the whole buffer without a new view when m = k."""
        return self.full if m == self.k else self.full[:m]

    def split(self, m: int) -> Tensor:
        """The first m steps viewed (m, G, batch, N, E)."""
        return self._split if m == self.k else self._split[:m]


def _recur(a: Sequence[Tensor], h: Sequence[Tensor], prev: Tensor | None) -> None:
    """In place over a block of steps: h_j <- h_j + a_j h_{j-1}, from ``prev`` (None: zero state)."""
    for a_j, h_j in zip(a, h, strict=True):  # one dispatch per step
        if prev is not None:
            h_j.addcmul_(a_j, prev)
        prev = h_j


def _sequential_grads(
    deltaT: Tensor,
    duT: Tensor,
    A2: Tensor,
    BT: Tensor,
    CT: Tensor,
    gyT: Tensor,
    k: int,
    bounds: Tensor,
    need: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Backward of :func:`_sequential`, from the state entering each block of ``k`` steps (saved
    by the forward). Block by block from the end, it recomputes that block's states and carries the
    adjoint ``a_t g_t`` back in time. Every buffer is one block (in cache); no (L, batch, N, E)
    tensor is ever allocated. Same outputs as :func:`_chunked_grads`."""
    need_du, need_delta, need_A, need_B, need_C = need
    length, groups, bsz, e = deltaT.shape
    rows, n = groups * bsz, A2.shape[1]
    seq = _Sequence(deltaT, duT, A2, BT, CT)
    a, g, h, tmp = (_Block(seq, k) for _ in range(4))
    carry = deltaT.new_zeros(rows, n, e)  # a_{t+1} g_{t+1}: the adjoint flowing into step t
    g_du = deltaT.new_empty(length, rows, 1, e) if need_du else None
    g_dl = deltaT.new_empty(length, groups, bsz, e) if need_delta else None
    g_A = deltaT.new_zeros(groups, n, e) if need_A else None
    g_B = deltaT.new_empty(length, rows, n) if need_B else None
    g_C = deltaT.new_empty(length, rows, n) if need_C else None
    for i, t0 in reversed(list(enumerate(range(0, length, k)))):
        m = min(k, length - t0)
        sl = slice(t0, t0 + m)
        a_, g_, h_, tmp_ = a.full[:m], g.full[:m], h.full[:m], tmp.full[:m]
        seq.terms(t0, t0 + m, a, h)
        _recur(a.steps[:m], h.steps[:m], bounds[i] if i else None)  # this block's states, recomputed
        if g_C is not None:  # dL/dC_t = h_t . dy_t
            _dot_channels(h_, gyT[sl], out=g_C[sl], buf=tmp_)
        torch.mul(CT[sl].view(m, rows, n, 1), gyT[sl].view(m, rows, 1, e), out=g_)
        for a_j, g_j in zip(reversed(a.steps[:m]), reversed(g.steps[:m]), strict=True):
            g_j.add_(carry)  # g_t = C_t dy_t + a_{t+1} g_{t+1}
            carry = a_j.mul_(g_j)  # a_t g_t, carried into step t - 1
        carry = carry.clone()  # a is overwritten by the next block
        if g_B is not None:  # dL/dB_t = g_t . (delta_t u_t)
            _dot_channels(g_, duT[sl], out=g_B[sl], buf=tmp_)
        if g_du is not None:
            flat = m * rows
            torch.bmm(BT[sl].view(flat, 1, n), g_.view(flat, n, e), out=g_du[sl].view(flat, 1, e))
        if need_A or need_delta:  # dL/d(delta_t A) = a_t g_t h_{t-1}, written over a
            a_[1:].mul_(h_[:-1])
            if i:
                a_[0].mul_(bounds[i])
            else:
                a_[0].zero_()
            part_A, part_dl = _decay_grads(a_, deltaT[sl], A2, need_A, need_delta, tmp_)
            if g_A is not None:
                g_A += part_A
            if g_dl is not None:
                g_dl[sl] = part_dl
    return (
        None if g_du is None else g_du.view(length, groups, bsz, e),
        g_dl,
        g_A,
        None if g_B is None else g_B.view(length, groups, bsz, n),
        None if g_C is None else g_C.view(length, groups, bsz, n),
    )


def scan_forward(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, plan: ScanPlan, keep_states: bool
) -> tuple[Tensor, Tensor | None]:
    """The forward half of the fast scans, for callers that fuse the scan into a larger autograd
    function: grouped inputs (see :class:`_Scan`), no autograd. Returns (y in the compute dtype,
    the block-start states for :func:`scan_backward` - sequential with ``keep_states`` only)."""
    dtype = _compute_dtype(u, delta, A, B, C, D)
    if plan.impl == "numba":
        args = (t.to(dtype) for t in (u, delta, A, B, C, D))
        return numba_kernel().forward(*args, plan.reverse, keep_states=keep_states, chunk=plan.block)
    deltaT, duT, A2, BT, CT = _working_inputs(u, delta, A, B, C, dtype, plan.reverse)
    bounds = None
    if plan.chunk == 0:
        length, groups, bsz, e = deltaT.shape
        if keep_states:  # 1/k of the states: saves a recompute in backward
            bounds = deltaT.new_empty(-(-length // plan.block), groups * bsz, A.shape[-1], e)
        yT = _sequential(deltaT, duT, A2, BT, CT, plan.block, bounds)
    else:
        yT = _chunked(deltaT, duT, A2, BT, CT, plan.chunk)
    del deltaT, duT  # two (L, G, batch, E) tensors fewer at the output's peak
    return _output(yT, D.to(dtype), u.to(dtype), plan.reverse), bounds


def _output(yT: Tensor, D: Tensor, u: Tensor, reverse: tuple[bool, ...]) -> Tensor:
    """y + D u, group-major (G, batch, L, E), from the scan's time-major yT (L, G, batch, E): one
    pass per group straight into the result (a reversed group's time axis flipped back first)."""
    y = torch.empty_like(u)
    for g, rev in enumerate(reverse):
        src = yT[:, g].transpose(0, 1)
        torch.addcmul(src.flip(1) if rev else src, D[g], u[g], out=y[g])
    return y


def scan_backward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    gy: Tensor,
    plan: ScanPlan,
    states: Tensor | None,
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """The backward half: dL/d(u, delta, A, B, C, D) (None where ``needs`` is False), from the
    inputs, dL/dy and the states :func:`scan_forward` kept (recomputed from the inputs either way)."""
    rev = plan.reverse
    dtype = _compute_dtype(u, delta, A, B, C, D)
    if plan.impl == "numba":
        args = [t.to(dtype) for t in (u, delta, A, B, C, D)]
        got = numba_kernel().backward(*args, rev, states, gy, chunk=plan.block)[:6]
        return [g.to(t.dtype) if need else None for g, t, need in zip(got, (u, delta, A, B, C, D), needs, strict=True)]
    need_u, need_delta, need_A, need_B, need_C, need_D = needs
    u_, d_, gy_ = u.to(dtype), delta.to(dtype), gy.to(dtype)
    grads: list[Tensor | None] = [None] * 6
    if need_D:
        grads[5] = (gy_ * u_).sum((1, 2)).to(D.dtype)
    need = (need_u or need_delta, need_delta, need_A, need_B, need_C)
    if not any(need):
        return grads
    args = (*_working_inputs(u, delta, A, B, C, dtype, rev), _time_major(gy_, dtype, rev))
    if plan.chunk == 0:
        g_du, g_dl, g_AT, g_B, g_C = _sequential_grads(*args, plan.block, states, need)
    else:
        g_du, g_dl, g_AT, g_B, g_C = _chunked_grads(*args, plan.chunk, need)
    if g_du is not None:
        g_du = _group_major(g_du, rev)
    if need_u:
        grads[0] = torch.addcmul(gy_ * D.to(dtype)[:, None, None], g_du, d_).to(u.dtype)
    if need_delta:
        grads[1] = torch.addcmul(_group_major(g_dl, rev), g_du, u_).to(delta.dtype)
    if need_A:
        grads[2] = g_AT.transpose(1, 2).to(A.dtype)
    if need_B:
        grads[3] = _group_major(g_B, rev).to(B.dtype)
    if need_C:
        grads[4] = _group_major(g_C, rev).to(C.dtype)
    return grads


class _Scan(torch.autograd.Function):
    """Saves only the inputs (and, sequential with grad, the block-start states); backward
    recomputes the states.

    Inputs are grouped: u, delta (G, batch, L, E), A (G, E, N), B, C (G, batch, L, N), D (G, E).
    """

    @staticmethod
    def forward(
        ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, plan: ScanPlan, grad: bool
    ) -> Tensor:
        y, states = scan_forward(u, delta, A, B, C, D, plan, keep_states=grad)
        ctx.save_for_backward(u, delta, A, B, C, D, states)
        ctx.plan = plan
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, states = ctx.saved_tensors
        grads = scan_backward(u, delta, A, B, C, D, gy, ctx.plan, states, ctx.needs_input_grad[:6])
        return (*grads, None, None)


def _working_inputs(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, dtype: torch.dtype, reverse: tuple[bool, ...]
) -> tuple[Tensor, ...]:
    """What both halves of the fast scans work on, in ``dtype``: (delta, delta * u, A2, B, C),
    time-major (see :func:`_time_major`), A2 in base 2 (see :func:`_base2`)."""
    deltaT = _time_major(delta, dtype, reverse)
    duT = _time_major(u, dtype, reverse).mul_(deltaT)
    return deltaT, duT, _base2(A, dtype), _time_major(B, dtype, reverse), _time_major(C, dtype, reverse)


def _base2(A: Tensor, dtype: torch.dtype) -> Tensor:
    """A (G, E, N) -> A.T / ln 2 (G, N, E), contiguous: exp(delta A) = exp2(delta A2)."""
    return (A.to(dtype) * (1.0 / math.log(2.0))).transpose(1, 2).contiguous()
