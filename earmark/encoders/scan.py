"""Selective scan (the Mamba recurrence) in plain PyTorch, fast enough to train on a CPU.

The recurrence, per batch item, channel ``e`` and state ``n``::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = C_t . h_t + D * u_t

Shapes: ``u, delta``: (batch, L, E); ``A``: (E, N); ``B, C``: (batch, L, N); ``D``: (E,) or None.

Implementations (``impl``):

* ``reference`` - :func:`selective_scan_reference`, a plain loop over time (``unbind``, autograd
  through every step). Slow but obviously right: the test oracle.
* ``chunked`` - :func:`selective_scan_chunked`, a two-level chunked scan (below).
* ``sequential`` - :func:`selective_scan_sequential`, the recurrence one step at a time over
  (batch, N, E) slices, with decays, inputs and outputs computed a block of steps at a time.
* ``auto`` (default) - sequential once a step's state (batch x E x N) has >= 8192 elements, where
  per-op overhead is small next to the arithmetic; chunked below that (small batches, inference).

Both fast paths share a hand-written backward (:class:`_Scan`): only the inputs are saved, the
states are recomputed, and the adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}``
runs backwards in time, followed by a few contractions. ``reverse=True`` scans from the last step
to the first (the backward branch of a bidirectional block) without flipping any tensor.

Measured on 2 CPU cores (batch 8, L 257, E 384, N 16; ms forward / forward+backward): reference
loop ~66-90 / 270-320, sequential ~20 / 77-108, chunked ~65 / 215-235 (``benchmarks/scan.py``).

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

import math

import torch
from torch import Tensor

SCAN_IMPLS = ("auto", "sequential", "chunked", "reference")


def selective_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, *, reverse: bool = False
) -> Tensor:
    """Sequential loop over time; the oracle the fast scan is tested against."""
    if reverse:
        y = selective_scan_reference(u.flip(1), delta.flip(1), A, B.flip(1), C.flip(1), D)
        return y.flip(1)
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


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    chunk: int = 0,
    reverse: bool = False,
) -> Tensor:
    """Two-level chunked scan with a recomputing analytic backward; ``chunk=0`` picks ~sqrt(L)."""
    _check_shapes(u, delta, A, B, C, D)
    return _Scan.apply(u, delta, A, B, C, _skip(u, A, D), chunk_length(u.shape[1], chunk), 0, reverse)


def selective_scan_sequential(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    block: int = 0,
    reverse: bool = False,
) -> Tensor:
    """Step-by-step scan with a recomputing analytic backward (fastest when batch * E * N is large).

    ``block``: time steps whose decays/inputs/outputs are computed together (0: :func:`block_steps`).
    """
    _check_shapes(u, delta, A, B, C, D)
    k = block if block > 0 else block_steps(u.shape[0], A.shape[0], A.shape[1])
    return _Scan.apply(u, delta, A, B, C, _skip(u, A, D), 0, k, reverse)


def block_steps(batch: int, channels: int, state: int, budget: int = 1 << 19) -> int:
    """Time steps per block of the sequential scan: enough to amortize per-op overhead, few enough
    that the block buffers (``budget`` elements each) stay in cache."""
    return max(1, budget // max(1, batch * channels * state))


def choose_impl(batch: int, channels: int, state: int, min_sequential: int = 1 << 13) -> str:
    """``auto``'s choice: the sequential scan once one time step's state (batch x E x N) is big enough
    that per-op overhead is small next to the arithmetic; the chunked scan below that."""
    return "sequential" if batch * channels * state >= min_sequential else "chunked"


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
    reverse: bool = False,
) -> Tensor:
    """Run the scan with ``impl`` in SCAN_IMPLS (``auto``: see :func:`choose_impl`).

    ``reverse=True`` scans from the last step to the first: the same as flipping the time axis of
    u, delta, B, C and of the result, without the copies.
    """
    if impl == "auto":
        impl = choose_impl(u.shape[0], A.shape[0], A.shape[1])
    if impl == "chunked":
        return selective_scan_chunked(u, delta, A, B, C, D, chunk=chunk, reverse=reverse)
    if impl == "sequential":
        return selective_scan_sequential(u, delta, A, B, C, D, reverse=reverse)
    if impl == "reference":
        _check_shapes(u, delta, A, B, C, D)
        return selective_scan_reference(u, delta, A, B, C, D, reverse=reverse)
    raise ValueError(f"unknown selective scan impl {impl!r}; known: {', '.join(SCAN_IMPLS)}")


def chunk_length(length: int, chunk: int = 0) -> int:
    """The within-chunk length used for a sequence: ``chunk`` if given, else ~sqrt(L) (balances the
    ``Lc`` within-chunk steps against the ``L / Lc`` boundary steps)."""
    if chunk <= 0:
        chunk = math.isqrt(max(length, 1) - 1) + 1
    return max(1, min(chunk, length))


# --------------------------------------------------------------------------------------------------
# implementation


def _skip(u: Tensor, A: Tensor, D: Tensor | None) -> Tensor:
    return D if D is not None else torch.zeros(A.shape[0], dtype=A.dtype, device=u.device)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> None:
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, L, E); got {tuple(u.shape)}, {tuple(delta.shape)}")
    bsz, length, e = u.shape
    if A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A must be (E={e}, N); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bsz, length, n):
            raise ValueError(f"{name} must be (batch, L, N) = {(bsz, length, n)}; got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (e,):
        raise ValueError(f"D must be (E={e},); got {tuple(D.shape)}")


def _time_major(t: Tensor, dtype: torch.dtype, reverse: bool = False) -> Tensor:
    """(batch, L, ...) -> contiguous (L, batch, ...) in the compute dtype, optionally time-reversed
    (the flip costs nothing extra: it is the same copy)."""
    t = t.to(dtype).transpose(0, 1)
    if not reverse:
        return t.contiguous()
    backwards = torch.arange(t.shape[0] - 1, -1, -1, device=t.device)
    return torch.index_select(t, 0, backwards)  # contiguous, unlike flip of a transposed view


def _batch_major(t: Tensor, reverse: bool) -> Tensor:
    """Inverse of :func:`_time_major` (a view unless reversed)."""
    return (t.flip(0) if reverse else t).transpose(0, 1)


# Layout: states are stored time-major as (L, batch, N, E) - channels innermost, so the broadcast
# products (delta_t x A, B_t x delta_t u_t) run over long contiguous rows (with E innermost, an
# (E, 1) x (1, N) outer product is ~3x slower on a CPU). A is passed transposed, AT = A.T (N, E).


def _states(deltaT: Tensor, duT: Tensor, AT: Tensor, BT: Tensor, lc: int) -> tuple[Tensor, Tensor]:
    """All hidden states h (Lp, batch, N, E) and the per-step decays a = exp(delta A), time-major.

    Lp = L rounded up to a multiple of ``lc``; the padded tail has decay 1 and input 0.
    """
    length, bsz, e = deltaT.shape
    n = AT.shape[0]
    nc = -(-length // lc)
    lp = nc * lc
    a = deltaT.new_empty(lp, bsz, n, e)
    torch.mul(deltaT[:, :, None, :], AT, out=a[:length])
    a[:length].exp_()
    a[length:].fill_(1.0)
    h = deltaT.new_empty(lp, bsz, n, e)
    torch.mul(BT[:, :, :, None], duT[:, :, None, :], out=h[:length])
    h[length:].zero_()
    av = a.view(nc, lc, bsz, n, e)
    hv = h.view(nc, lc, bsz, n, e)
    # 1. within-chunk recurrence from a zero state, all chunks at once; total decay per chunk
    prod = av[:, 0].clone() if nc > 1 else None
    for i in range(1, lc):
        hv[:, i].addcmul_(av[:, i], hv[:, i - 1])
        if prod is not None:
            prod.mul_(av[:, i])
    if prod is None:
        return h, a
    # 2. true state at the end of chunk c (entering chunk c + 1)
    carry = deltaT.new_empty(nc - 1, bsz, n, e)
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
    lp, bsz, n, e = a.shape
    nc = lp // lc
    av = a.view(nc, lc, bsz, n, e)
    gv = g.view(nc, lc, bsz, n, e)
    # 1. within-chunk reverse recurrence; total decay of each chunk
    prod = av[:, lc - 1].clone() if nc > 1 else None
    for i in range(lc - 2, -1, -1):
        gv[:, i].addcmul_(av[:, i + 1], gv[:, i + 1])
        if prod is not None:
            prod.mul_(av[:, i])
    if prod is None:
        return
    # 2. carry[c]: what flows into the last step of chunk c from chunks c+1.. (= a_next g_next)
    carry = a.new_empty(nc - 1, bsz, n, e)
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


def _chunked(deltaT: Tensor, duT: Tensor, AT: Tensor, BT: Tensor, CT: Tensor, lc: int) -> Tensor:
    length, bsz, e = deltaT.shape
    n = AT.shape[0]
    h, _ = _states(deltaT, duT, AT, BT, lc)
    rows = length * bsz
    return torch.bmm(CT.view(rows, 1, n), h[:length].view(rows, n, e)).view(length, bsz, e)


def _chunked_grads(
    deltaT: Tensor, duT: Tensor, AT: Tensor, BT: Tensor, CT: Tensor, gyT: Tensor, lc: int, need: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """Backward of the chunked scan. Returns (dL/d(delta u), sum_n dL/d(delta A) A, dL/dA.T, dL/dB,
    dL/dC), time-major, None where not needed."""
    need_du, need_delta, need_A, need_B, need_C = need
    length, bsz, e = deltaT.shape
    n = AT.shape[0]
    rows = length * bsz
    h, a = _states(deltaT, duT, AT, BT, lc)
    h_rows = h[:length].view(rows, n, e)
    g_C = torch.bmm(h_rows, gyT.view(rows, e, 1)).view(length, bsz, n) if need_C else None
    g_du = g_dl = g_A = g_B = None
    if need_du or need_delta or need_A or need_B:
        g = torch.empty_like(h)  # adjoint states g_t = C_t dy_t + a_{t+1} g_{t+1}
        torch.mul(CT[:, :, :, None], gyT[:, :, None, :], out=g[:length])
        g[length:].zero_()
        _adjoint(a, g, lc)
        g_rows = g[:length].view(rows, n, e)
        if need_B:
            g_B = torch.bmm(g_rows, duT.view(rows, e, 1)).view(length, bsz, n)
        if need_du:
            g_du = torch.bmm(BT.view(rows, 1, n), g_rows).view(length, bsz, e)
        if need_delta or need_A:
            ds = a  # dL/d(delta_t A) = g_t a_t h_{t-1}, written over a (not needed any more)
            ds[1:].mul_(g[1:]).mul_(h[:-1])
            ds[0].zero_()
            ds_rows = ds[:length].view(rows, n, e)
            if need_A:
                g_A = torch.mul(ds_rows, deltaT.view(rows, 1, e)).sum(0)
            if need_delta:
                g_dl = ds_rows.mul_(AT).sum(-2).view(length, bsz, e)
    return g_du, g_dl, g_A, g_B, g_C


def _sequential(
    deltaT: Tensor, duT: Tensor, AT: Tensor, BT: Tensor, CT: Tensor | None, k: int, hs: Tensor | None = None
) -> Tensor | None:
    """One step at a time; decays, inputs and outputs are computed ``k`` steps at a time into small
    reused buffers that stay in cache. Returns y (L, batch, E) or, with ``hs`` given, writes every
    state into it instead."""
    length, bsz, e = deltaT.shape
    n = AT.shape[0]
    k = max(1, min(k, length))
    a = deltaT.new_empty(k, bsz, n, e)
    hb = (deltaT.new_empty(k, bsz, n, e), deltaT.new_empty(k, bsz, n, e)) if hs is None else None
    y = deltaT.new_empty(length, bsz, 1, e) if hs is None else None
    prev: Tensor | None = None  # the state before the current step
    for i, t0 in enumerate(range(0, length, k)):
        m = min(k, length - t0)
        sl = slice(t0, t0 + m)
        h = hs[sl] if hs is not None else hb[i % 2][:m]  # ping-pong: prev stays valid
        torch.mul(deltaT[sl, :, None, :], AT, out=a[:m])
        a[:m].exp_()
        torch.mul(BT[sl, :, :, None], duT[sl, :, None, :], out=h)
        for j in range(m):
            if prev is not None:
                h[j].addcmul_(a[j], prev)
            prev = h[j]
        if y is not None:
            rows = m * bsz
            torch.bmm(CT[sl].view(rows, 1, n), h.view(rows, n, e), out=y[sl].view(rows, 1, e))
    return None if y is None else y.view(length, bsz, e)


def _sequential_grads(
    deltaT: Tensor,
    duT: Tensor,
    AT: Tensor,
    BT: Tensor,
    CT: Tensor,
    gyT: Tensor,
    k: int,
    need: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """Backward of :func:`_sequential`: recompute the states, then walk back in time carrying the
    adjoint ``a_t g_t``, ``k`` steps per block. Same outputs as :func:`_chunked_grads`."""
    need_du, need_delta, need_A, need_B, need_C = need
    length, bsz, e = deltaT.shape
    n = AT.shape[0]
    k = max(1, min(k, length))
    hs = deltaT.new_empty(length, bsz, n, e)
    _sequential(deltaT, duT, AT, BT, None, k, hs)
    a, g = deltaT.new_empty(k, bsz, n, e), deltaT.new_empty(k, bsz, n, e)
    carry = deltaT.new_zeros(bsz, n, e)  # a_{t+1} g_{t+1}: the adjoint flowing into step t
    g_du = deltaT.new_empty(length, bsz, 1, e) if need_du else None
    g_dl = deltaT.new_empty(length, bsz, e) if need_delta else None
    g_A = deltaT.new_zeros(n, e) if need_A else None
    g_B = deltaT.new_empty(length, bsz, n, 1) if need_B else None
    g_C = None
    if need_C:
        rows = length * bsz
        g_C = torch.bmm(hs.view(rows, n, e), gyT.view(rows, e, 1)).view(length, bsz, n)
    for t0 in reversed(range(0, length, k)):
        m = min(k, length - t0)
        rows = m * bsz
        sl = slice(t0, t0 + m)
        torch.mul(CT[sl, :, :, None], gyT[sl, :, None, :], out=g[:m])
        torch.mul(deltaT[sl, :, None, :], AT, out=a[:m])
        a[:m].exp_()
        for j in range(m - 1, -1, -1):
            g[j].add_(carry)  # g_t = C_t dy_t + a_{t+1} g_{t+1}
            a[j].mul_(g[j])  # a_t g_t, carried into step t - 1
            carry = a[j]
        carry = carry.clone()  # a is overwritten by the next block
        g_rows = g[:m].view(rows, n, e)
        if g_B is not None:
            torch.bmm(g_rows, duT[sl].view(rows, e, 1), out=g_B[sl].view(rows, n, 1))
        if g_du is not None:
            torch.bmm(BT[sl].view(rows, 1, n), g_rows, out=g_du[sl].view(rows, 1, e))
        if need_A or need_delta:  # dL/d(delta_t A) = a_t g_t h_{t-1} (h_{-1} = 0), written over a
            ds = a[:m]
            if t0 == 0:
                ds[1:].mul_(hs[: m - 1])
                ds[0].zero_()
            else:
                ds.mul_(hs[t0 - 1 : t0 + m - 1])
            if g_A is not None:  # g is free again: reuse it rather than allocate
                g_A += torch.mul(ds, deltaT[sl, :, None, :], out=g[:m]).view(rows, n, e).sum(0)
            if g_dl is not None:
                torch.sum(ds.mul_(AT), -2, out=g_dl[sl])
    return (
        None if g_du is None else g_du.view(length, bsz, e),
        g_dl,
        g_A,
        None if g_B is None else g_B.view(length, bsz, n),
        g_C,
    )


class _Scan(torch.autograd.Function):
    """Saves only the inputs; backward recomputes the states.

    ``lc > 0``: chunked with chunk length ``lc``; ``lc == 0``: sequential in blocks of ``k`` steps.
    ``reverse``: scan from the last step to the first.
    """

    @staticmethod
    def forward(
        ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, lc: int, k: int, reverse: bool
    ) -> Tensor:
        dtype = _compute_dtype(u, delta, A, B, C, D)
        u_, d_ = u.to(dtype), delta.to(dtype)
        deltaT = _time_major(d_, dtype, reverse)
        args = (deltaT, deltaT * _time_major(u_, dtype, reverse), A.to(dtype).t().contiguous())
        BT, CT = _time_major(B, dtype, reverse), _time_major(C, dtype, reverse)
        yT = _sequential(*args, BT, CT, k) if lc == 0 else _chunked(*args, BT, CT, lc)
        ctx.save_for_backward(u, delta, A, B, C, D)
        ctx.lc, ctx.k, ctx.reverse = lc, k, reverse
        return torch.addcmul(_batch_major(yT, reverse), D.to(dtype), u_).to(u.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D = ctx.saved_tensors
        rev = ctx.reverse
        dtype = _compute_dtype(u, delta, A, B, C, D)
        need_u, need_delta, need_A, need_B, need_C, need_D = ctx.needs_input_grad[:6]
        u_, d_, gy_ = u.to(dtype), delta.to(dtype), gy.to(dtype)
        grads: list[Tensor | None] = [None] * 9
        if need_D:
            grads[5] = (gy_ * u_).sum((0, 1)).to(D.dtype)
        need = (need_u or need_delta, need_delta, need_A, need_B, need_C)
        if not any(need):
            return tuple(grads)
        deltaT = _time_major(d_, dtype, rev)
        args = (deltaT, deltaT * _time_major(u_, dtype, rev), A.to(dtype).t().contiguous())
        BT, CT, gyT = (_time_major(t, dtype, rev) for t in (B, C, gy_))
        if ctx.lc == 0:
            g_du, g_dl, g_AT, g_B, g_C = _sequential_grads(*args, BT, CT, gyT, ctx.k, need)
        else:
            g_du, g_dl, g_AT, g_B, g_C = _chunked_grads(*args, BT, CT, gyT, ctx.lc, need)
        if g_du is not None:
            g_du = _batch_major(g_du, rev)
        if need_u:
            grads[0] = torch.addcmul(gy_ * D.to(dtype), g_du, d_).to(u.dtype)
        if need_delta:
            grads[1] = torch.addcmul(_batch_major(g_dl, rev), g_du, u_).to(delta.dtype)
        if need_A:
            grads[2] = g_AT.t().to(A.dtype)
        if need_B:
            grads[3] = _batch_major(g_B, rev).to(B.dtype)
        if need_C:
            grads[4] = _batch_major(g_C, rev).to(C.dtype)
        return tuple(grads)
