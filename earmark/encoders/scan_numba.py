"""The selective scan as a compiled CPU kernel (numba): forward and backward, both directions of a
block in one call, the decay exp(delta A), the D skip and optionally the SiLU(z) gate fused; and the
depthwise conv + SiLU that feeds it (:func:`conv_silu`, forward and backward).

Imported lazily by :mod:`earmark.encoders.scan` (numba is optional at run time: without it, or for
tensors not on the CPU, the pure-PyTorch scans run). Importing this module configures numba first:

* the on-disk cache of compiled kernels goes to ``$NUMBA_CACHE_DIR`` if the user set it, else
  ``$EARMARK_DATA/numba`` or ``~/.cache/earmark/numba``; when that directory is not writable
  (a read-only install or home) the kernels are compiled in memory each process instead;
* the threading layer is ``workqueue`` unless ``NUMBA_THREADING_LAYER`` is set: numba's OpenMP
  layer would start a second OpenMP pool beside torch's, and both spin after each parallel region
  on the same cores.

Threads: each call runs on ``threads`` workers (default ``torch.get_num_threads()``, capped at
numba's pool size), so the kernel and torch's ops, which alternate, use the same number of cores.
They do not quite take turns: after each parallel op torch's OpenMP workers (libgomp) keep
spinning for a while unless ``OMP_WAIT_POLICY=PASSIVE`` was set before torch was imported, and on
a machine whose cores are busy with other work that spinning slows torch and the kernel alike
(docs/encoders.md has the figures). A call on one thread runs a serial build of the same tasks:
numba's parallel launch costs tens of microseconds.

Why the loops look as they do: numba vectorises a contiguous inner loop over channels on 1-d
arrays with non-negative offsets (multi-dimensional indexing blocked it), and ``math.exp`` stays
scalar in numba builds without SVML, so decays use a branch-free polynomial ``exp2`` (exponent bits
set directly) in float32. float64 inputs use ``math.exp`` (the test path). Work is split over
(direction, batch item, block of ``WIDTH`` channels); each task keeps its (N, WIDTH) state local.
Channels, not states, are the vector axis: the output sums over states, which would otherwise be a
horizontal reduction per step and channel, and N can be as small as 4. The loops over the state
run over all ``WIDTH`` lanes, a compile-time trip count (lanes past the last channel hold zeros):
with a runtime count LLVM adds a remainder loop and overlap checks to every one of them, which cost
as much as their four vectors of work. Each pass of such a loop updates four states, so the
per-step vectors (delta, delta u, the output, the gradients summed over states) are loaded and
stored once per four states, and the backward's adjoint computes every gradient of a step in one
pass. Sums over time (dA, dD) accumulate in float64. B, C and z are read in place from the wider
tensors they are slices of (a row stride each), and the gated forward adds the directions up
itself. Tried and not kept: ``fastmath=True`` (no faster than reassociation + contraction, and it
would let LLVM assume no inf/NaN), 32 channels per task (slower), recomputing the decays in the
backward's adjoint instead of keeping them for the chunk (no faster), tasks handed out from an
atomic counter instead of numba's static split of a prange (no faster at 2 threads on this loaded machine).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

WIDTH = 64  # channels per forward task: 4 AVX-512 vectors; (N, WIDTH) state = 4 KiB at N = 16
BWIDTH = 128  # channels per backward task: its per-step work spreads over more lanes (the forward
# measured slower at 128, the backward faster: benchmarks/scan.py)
CHUNK = 32  # steps between saved states: saved memory = input size / 2 at N = 16


def cache_dir() -> Path:
    """Where the compiled kernels are cached (see the module docstring)."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("EARMARK_DATA")
    return (Path(data).expanduser() if data else Path.home() / ".cache" / "earmark") / "numba"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            return True
    except OSError:
        return False


def _configure() -> bool:
    """Set numba's environment before it is imported; returns whether the disk cache is usable."""
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    path = cache_dir()
    ok = _writable(path)
    if ok:
        os.environ.setdefault("NUMBA_CACHE_DIR", str(path))
    return ok


CACHE = _configure()

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

if os.environ.get("NUMBA_CACHE_DIR", "") != numba.config.CACHE_DIR:
    # numba was imported before us: its settings stand; cache only into a writable directory it names
    CACHE = bool(numba.config.CACHE_DIR) and _writable(Path(numba.config.CACHE_DIR))

INV_LN2 = 1.0 / math.log(2.0)
# reassociation lets LLVM vectorise the sums over channels (dB, dC); contraction gives FMAs
FASTMATH = {"reassoc", "contract"}


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret int32 bits as float32 (vectorisable, unlike a lookup or ldexp)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    """Reinterpret float32 bits as int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


def _exp2(x):  # pragma: no cover - typed by the overload below
    raise NotImplementedError


@overload(_exp2)
def _exp2_impl(x):
    """2**x: float32 a degree-5 polynomial p on the fraction (relative error 1.5e-7; p in [1, 2))
    with floor(x) added to its exponent bits (an integer add instead of a float multiply; x is
    clamped to [-126, 127], so the result stays a normal number); float64 exact through math.exp."""
    if x == types.float32:
        c1, c2, c3 = np.float32(0.693152968), np.float32(0.240154530), np.float32(0.0558236044)
        c4, c5 = np.float32(0.00899258403), np.float32(0.00187623295)
        lo, hi, one = np.float32(-126.0), np.float32(127.0), np.float32(1.0)

        def f32(x):
            x = min(max(x, lo), hi)
            xi = np.floor(x)
            f = x - xi
            p = one + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
            return _f32_from_bits(np.int32(_bits_from_f32(p) + (np.int32(xi) << 23)))

        return f32
    if x == types.float64:
        ln2 = math.log(2.0)

        def f64(x):
            return math.exp(x * ln2)

        return f64
    return None


def _softplus(x):  # pragma: no cover - typed by the overload below
    raise NotImplementedError


@overload(_softplus)
def _softplus_impl(x):
    """log(1 + e^x) = max(x, 0) + log1p(y), y = e^-|x| in (0, 1]: float32 through _exp2 and the
    series log1p(y) = 2 atanh(s), s = y / (2 + y) <= 1/3 (7 terms: relative error < 3e-8), so it
    vectorises; float64 exact through math.log1p."""
    if x == types.float32:
        zero, one, two = np.float32(0.0), np.float32(1.0), np.float32(2.0)
        l2e = np.float32(INV_LN2)
        k3, k5, k7, k9 = np.float32(1 / 3), np.float32(1 / 5), np.float32(1 / 7), np.float32(1 / 9)
        k11, k13 = np.float32(1 / 11), np.float32(1 / 13)

        def f32(x):
            y = _exp2(-abs(x) * l2e)
            s = y / (two + y)
            q = s * s
            p = one + q * (k3 + q * (k5 + q * (k7 + q * (k9 + q * (k11 + q * k13)))))
            return max(x, zero) + two * s * p

        return f32
    if x == types.float64:

        def f64(x):
            return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

        return f64
    return None


_KW = {"cache": CACHE, "fastmath": FASTMATH, "error_model": "numpy"}


@njit(**_KW)
def _consts(dtype_like, scale):
    """(1, 1 / ln 2, scale) in the compute dtype (a float64 literal would promote float32 maths)."""
    k = np.empty(3, dtype_like.dtype)
    k[0], k[1], k[2] = 1.0, INV_LN2, scale
    return k[0], k[1], k[2]


@njit(**_KW)
def _forward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, y, states):
    """One task of :func:`_forward`: direction g, batch item b, channels e0 .. e0 + WIDTH.

    Every loop over the state runs over all WIDTH lanes (a constant trip count: no remainder
    loop, fewer checks); lanes past the last channel hold zeros (decay 1, input 0, state 0) and
    are never stored. The state loop handles four states per pass, so the per-step vectors
    (delta, delta u, the output) are loaded and stored once per four states."""
    bsz, L, E, N, chunk = dims[1], dims[2], dims[3], dims[4], dims[5]
    sp = dims[6] != 0  # dl holds the pre-activation: delta = softplus(dl)
    zrow = dims[8]  # z's row stride (z may be a view into in_proj's output)
    brow, crow = dims[9], dims[10]  # B's and C's row strides (views into x_proj's output)
    summed = dims[11] != 0  # y is (batch, L, E): the sum over groups
    nb = (E + WIDTH - 1) // WIDTH
    nck = (L + chunk - 1) // chunk
    gated = z.size > 0
    keep = states.size > 0
    one, l2e, sc = _consts(dl, scale)
    g = task // (bsz * nb)
    b = (task // nb) % bsz
    e0 = (task % nb) * WIDTH
    w = min(WIDTH, E - e0)
    NW = N * WIDTH
    A2 = np.zeros(NW, dl.dtype)
    h = np.zeros(NW, dl.dtype)
    dlv = np.zeros(WIDTH, dl.dtype)
    uv = np.zeros(WIDTH, dl.dtype)
    Dg = np.zeros(WIDTH, dl.dtype)
    duv = np.empty(WIDTH, dl.dtype)
    acc = np.empty(WIDTH, dl.dtype)
    for n in range(N):
        for e in range(w):
            A2[n * WIDTH + e] = A[(g * E + e0 + e) * N + n] * INV_LN2
    Dt = D[g * E + e0 : g * E + e0 + w]
    for e in range(w):
        Dg[e] = Dt[e]
    row = (g * bsz + b) * L
    for s in range(L):
        t = L - 1 - s if rev[g] else s
        if keep and s % chunk == 0:
            base = ((g * bsz + b) * nck + s // chunk) * N * E + e0
            for n in range(N):
                st = states[base + n * E : base + n * E + w]
                hs = h[n * WIDTH : n * WIDTH + w]
                for e in range(w):
                    st[e] = hs[e]
        off = (row + t) * E + e0
        dlt = dl[off : off + w]
        ut = u[off : off + w]
        if sp:
            for e in range(w):
                dlv[e] = _softplus(dlt[e])
        else:
            for e in range(w):
                dlv[e] = dlt[e]
        for e in range(w):
            uv[e] = ut[e]
        for e in range(WIDTH):
            duv[e] = dlv[e] * uv[e]
            acc[e] = Dg[e] * uv[e]
        bo = (row + t) * brow
        co = (row + t) * crow
        n = 0
        while n + 4 <= N:
            b0, b1, b2, b3 = B[bo + n], B[bo + n + 1], B[bo + n + 2], B[bo + n + 3]
            c0, c1, c2, c3 = C[co + n], C[co + n + 1], C[co + n + 2], C[co + n + 3]
            hs = h[n * WIDTH : (n + 4) * WIDTH]
            As = A2[n * WIDTH : (n + 4) * WIDTH]
            for e in range(WIDTH):
                dv = dlv[e]
                x = duv[e]
                v0 = _exp2(dv * As[e]) * hs[e] + b0 * x
                v1 = _exp2(dv * As[WIDTH + e]) * hs[WIDTH + e] + b1 * x
                v2 = _exp2(dv * As[2 * WIDTH + e]) * hs[2 * WIDTH + e] + b2 * x
                v3 = _exp2(dv * As[3 * WIDTH + e]) * hs[3 * WIDTH + e] + b3 * x
                hs[e] = v0
                hs[WIDTH + e] = v1
                hs[2 * WIDTH + e] = v2
                hs[3 * WIDTH + e] = v3
                acc[e] += (c0 * v0 + c1 * v1) + (c2 * v2 + c3 * v3)
            n += 4
        while n < N:
            bn = B[bo + n]
            cn = C[co + n]
            hs = h[n * WIDTH : (n + 1) * WIDTH]
            As = A2[n * WIDTH : (n + 1) * WIDTH]
            for e in range(WIDTH):
                hv = _exp2(dlv[e] * As[e]) * hs[e] + bn * duv[e]
                hs[e] = hv
                acc[e] += cn * hv
            n += 1
        yo = (b * L + t) * E + e0 if summed else off
        yt = y[yo : yo + w]
        if gated:
            zo = (b * L + t) * zrow + e0
            zt = z[zo : zo + w]
            if summed and g > 0:  # the groups run in order: add to the first one's output
                for e in range(w):
                    zz = zt[e]
                    yt[e] += acc[e] * (sc * zz / (one + _exp2(-zz * l2e)))
            else:
                for e in range(w):
                    zz = zt[e]
                    yt[e] = acc[e] * (sc * zz / (one + _exp2(-zz * l2e)))
        elif summed and g > 0:
            for e in range(w):
                yt[e] += acc[e]
        else:
            for e in range(w):
                yt[e] = acc[e]


@njit(parallel=True, **_KW)
def _forward(u, dl, A, B, C, D, z, rev, dims, scale, y, states, tid):
    """y (G, batch, L, E) = C . h + D u (times scale * silu(z) if z has elements; with ``dims[11]``
    y is (batch, L, E), the sum over groups, added in group order by one worker per block of
    channels: one parallel region, no race), every array 1-d
    (flattened C-order; z (batch, L, E) with row stride ``dims[8]``); A (G, E, N). ``states``
    (G, batch, L / chunk, N, E): the state entering every chunk (in scan order) when it has
    elements. Tasks (direction, batch item, block of WIDTH channels) run on numba's threads;
    ``tid``: the worker that ran each (numba.get_num_threads inside a kernel would keep it out of
    the disk cache)."""
    per = dims[1] * ((dims[3] + WIDTH - 1) // WIDTH)  # tasks per group
    if dims[11] != 0:  # summed over groups: one worker runs every group of its channels, in order
        for i in prange(per):
            for g in range(dims[0]):
                task = g * per + i
                tid[task] = numba.get_thread_id()
                _forward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, y, states)
    else:
        for task in prange(dims[0] * per):
            tid[task] = numba.get_thread_id()
            _forward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, y, states)


@njit(**_KW)
def _forward_serial(u, dl, A, B, C, D, z, rev, dims, scale, y, states, tid):
    """:func:`_forward` on the calling thread (one thread: no parallel launch, which costs
    tens of microseconds per call)."""
    ntask = dims[0] * dims[1] * ((dims[3] + WIDTH - 1) // WIDTH)
    for task in range(ntask):
        tid[task] = 0
        _forward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, y, states)


@njit(**_KW)
def _backward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, states, gy, du, ddl, dA, dB, dC, dD, dz):
    """One task of :func:`_backward` (as :func:`_forward_task`: lanes past the last channel are
    zeros throughout). Per chunk of saved states, from the last: recompute the chunk's decays,
    states, delta, delta u and (gated) ungated outputs into task-local buffers, then run the
    adjoint back through it, four states per pass, every gradient of a step in that one pass."""
    bsz, L, E, N, chunk = dims[1], dims[2], dims[3], dims[4], dims[5]
    sp = dims[6] != 0
    gyg = dims[7]  # gy's group stride: 0 when every group gets the same dL/dy
    zrow, brow, crow = dims[8], dims[9], dims[10]
    nb = (E + BWIDTH - 1) // BWIDTH
    nck = (L + chunk - 1) // chunk
    gated = z.size > 0
    one, l2e, sc = _consts(dl, scale)
    zero = one - one
    g = task // (bsz * nb)
    b = (task // nb) % bsz
    blk = task % nb
    e0 = blk * BWIDTH
    w = min(BWIDTH, E - e0)
    NW = N * BWIDTH
    A2 = np.zeros(NW, dl.dtype)
    An = np.zeros(NW, dl.dtype)
    hbuf = np.zeros((chunk + 1) * NW, dl.dtype)  # state entering the chunk, then after each step
    abuf = np.empty(chunk * NW, dl.dtype)  # decays of the chunk
    dbuf = np.zeros(chunk * BWIDTH, dl.dtype)  # delta per step
    ubuf = np.zeros(chunk * BWIDTH, dl.dtype)  # u per step
    xbuf = np.empty(chunk * BWIDTH, dl.dtype)  # delta u per step
    ybuf = np.empty(chunk * BWIDTH, dl.dtype)  # ungated output per step (for dz)
    carry = np.zeros(NW, dl.dtype)  # a_{t+1} g_{t+1}
    gA = np.zeros(NW, np.float64)
    gAc = np.zeros(NW, dl.dtype)
    gD = np.zeros(BWIDTH, np.float64)
    Dg = np.zeros(BWIDTH, dl.dtype)
    yv = np.empty(BWIDTH, dl.dtype)
    gyv = np.zeros(BWIDTH, dl.dtype)
    gdu = np.empty(BWIDTH, dl.dtype)
    gdl = np.empty(BWIDTH, dl.dtype)
    for n in range(N):
        for e in range(w):
            a = A[(g * E + e0 + e) * N + n]
            An[n * BWIDTH + e] = a
            A2[n * BWIDTH + e] = a * INV_LN2
    Dt = D[g * E + e0 : g * E + e0 + w]
    for e in range(w):
        Dg[e] = Dt[e]
    row = (g * bsz + b) * L
    dbc = ((g * bsz + b) * nb + blk) * L * N
    for c in range(nck - 1, -1, -1):
        s0 = c * chunk
        m = min(chunk, L - s0)
        base = ((g * bsz + b) * nck + c) * N * E + e0
        for n in range(N):
            st = states[base + n * E : base + n * E + w]
            h0 = hbuf[n * BWIDTH : n * BWIDTH + w]
            for e in range(w):
                h0[e] = st[e]
        # recompute the chunk
        for j in range(m):
            s = s0 + j
            t = L - 1 - s if rev[g] else s
            off = (row + t) * E + e0
            dlt = dl[off : off + w]
            ut = u[off : off + w]
            dj = dbuf[j * BWIDTH : (j + 1) * BWIDTH]
            uj = ubuf[j * BWIDTH : (j + 1) * BWIDTH]
            xj = xbuf[j * BWIDTH : (j + 1) * BWIDTH]
            if sp:
                for e in range(w):
                    dj[e] = _softplus(dlt[e])
            else:
                for e in range(w):
                    dj[e] = dlt[e]
            for e in range(w):
                uj[e] = ut[e]
            for e in range(BWIDTH):
                xj[e] = dj[e] * uj[e]
                yv[e] = Dg[e] * uj[e]
            bo = (row + t) * brow
            co = (row + t) * crow
            n = 0
            while n + 4 <= N:
                b0, b1, b2, b3 = B[bo + n], B[bo + n + 1], B[bo + n + 2], B[bo + n + 3]
                c0, c1, c2, c3 = C[co + n], C[co + n + 1], C[co + n + 2], C[co + n + 3]
                cur = j * NW + n * BWIDTH
                As = A2[n * BWIDTH : (n + 4) * BWIDTH]
                ab = abuf[cur : cur + 4 * BWIDTH]
                hp = hbuf[cur : cur + 4 * BWIDTH]
                hn = hbuf[cur + NW : cur + NW + 4 * BWIDTH]
                for e in range(BWIDTH):
                    dv = dj[e]
                    x = xj[e]
                    a0 = _exp2(dv * As[e])
                    a1 = _exp2(dv * As[BWIDTH + e])
                    a2 = _exp2(dv * As[2 * BWIDTH + e])
                    a3 = _exp2(dv * As[3 * BWIDTH + e])
                    v0 = a0 * hp[e] + b0 * x
                    v1 = a1 * hp[BWIDTH + e] + b1 * x
                    v2 = a2 * hp[2 * BWIDTH + e] + b2 * x
                    v3 = a3 * hp[3 * BWIDTH + e] + b3 * x
                    ab[e] = a0
                    ab[BWIDTH + e] = a1
                    ab[2 * BWIDTH + e] = a2
                    ab[3 * BWIDTH + e] = a3
                    hn[e] = v0
                    hn[BWIDTH + e] = v1
                    hn[2 * BWIDTH + e] = v2
                    hn[3 * BWIDTH + e] = v3
                    yv[e] += (c0 * v0 + c1 * v1) + (c2 * v2 + c3 * v3)
                n += 4
            while n < N:
                bn = B[bo + n]
                cn = C[co + n]
                cur = j * NW + n * BWIDTH
                As = A2[n * BWIDTH : (n + 1) * BWIDTH]
                ab = abuf[cur : cur + BWIDTH]
                hp = hbuf[cur : cur + BWIDTH]
                hn = hbuf[cur + NW : cur + NW + BWIDTH]
                for e in range(BWIDTH):
                    a0 = _exp2(dj[e] * As[e])
                    v0 = a0 * hp[e] + bn * xj[e]
                    ab[e] = a0
                    hn[e] = v0
                    yv[e] += cn * v0
                n += 1
            if gated:
                yj = ybuf[j * BWIDTH : (j + 1) * BWIDTH]
                for e in range(BWIDTH):
                    yj[e] = yv[e]
        # adjoint back through the chunk
        for jj in range(m):
            j = m - 1 - jj
            s = s0 + j
            t = L - 1 - s if rev[g] else s
            off = (row + t) * E + e0
            bo = (row + t) * brow
            co = (row + t) * crow
            dj = dbuf[j * BWIDTH : (j + 1) * BWIDTH]
            uj = ubuf[j * BWIDTH : (j + 1) * BWIDTH]
            xj = xbuf[j * BWIDTH : (j + 1) * BWIDTH]
            go = g * gyg + (b * L + t) * E + e0
            gyt = gy[go : go + w]
            for e in range(w):
                gyv[e] = gyt[e]
            if gated:
                zo = (b * L + t) * zrow + e0
                zt = z[zo : zo + w]
                dzt = dz[off : off + w]
                yj = ybuf[j * BWIDTH : (j + 1) * BWIDTH]
                for e in range(w):
                    zz = zt[e]
                    sg = one / (one + _exp2(-zz * l2e))
                    dzt[e] = gyv[e] * sc * yj[e] * sg * (one + zz * (one - sg))
                    gyv[e] *= sc * zz * sg
            for e in range(BWIDTH):
                gD[e] += gyv[e] * uj[e]
                gdu[e] = zero
                gdl[e] = zero
            n = 0
            while n + 4 <= N:
                b0, b1, b2, b3 = B[bo + n], B[bo + n + 1], B[bo + n + 2], B[bo + n + 3]
                c0, c1, c2, c3 = C[co + n], C[co + n + 1], C[co + n + 2], C[co + n + 3]
                hn0 = n * BWIDTH
                cur = j * NW + hn0
                ab = abuf[cur : cur + 4 * BWIDTH]
                hp = hbuf[cur : cur + 4 * BWIDTH]
                hs = hbuf[cur + NW : cur + NW + 4 * BWIDTH]
                cy = carry[hn0 : hn0 + 4 * BWIDTH]
                gac = gAc[hn0 : hn0 + 4 * BWIDTH]
                an = An[hn0 : hn0 + 4 * BWIDTH]
                sc0 = sc1 = sc2 = sc3 = zero
                sb0 = sb1 = sb2 = sb3 = zero
                for e in range(BWIDTH):
                    gye = gyv[e]
                    x = xj[e]
                    dv = dj[e]
                    # g_t = C_t dy_t + a_{t+1} g_{t+1}
                    q0 = c0 * gye + cy[e]
                    q1 = c1 * gye + cy[BWIDTH + e]
                    q2 = c2 * gye + cy[2 * BWIDTH + e]
                    q3 = c3 * gye + cy[3 * BWIDTH + e]
                    sc0 += hs[e] * gye
                    sc1 += hs[BWIDTH + e] * gye
                    sc2 += hs[2 * BWIDTH + e] * gye
                    sc3 += hs[3 * BWIDTH + e] * gye
                    sb0 += q0 * x
                    sb1 += q1 * x
                    sb2 += q2 * x
                    sb3 += q3 * x
                    gdu[e] += (b0 * q0 + b1 * q1) + (b2 * q2 + b3 * q3)
                    a0 = ab[e]
                    a1 = ab[BWIDTH + e]
                    a2 = ab[2 * BWIDTH + e]
                    a3 = ab[3 * BWIDTH + e]
                    # dL/d(delta_t A) = g_t a_t h_{t-1}
                    r0 = q0 * a0 * hp[e]
                    r1 = q1 * a1 * hp[BWIDTH + e]
                    r2 = q2 * a2 * hp[2 * BWIDTH + e]
                    r3 = q3 * a3 * hp[3 * BWIDTH + e]
                    gac[e] += r0 * dv
                    gac[BWIDTH + e] += r1 * dv
                    gac[2 * BWIDTH + e] += r2 * dv
                    gac[3 * BWIDTH + e] += r3 * dv
                    gdl[e] += (r0 * an[e] + r1 * an[BWIDTH + e]) + (r2 * an[2 * BWIDTH + e] + r3 * an[3 * BWIDTH + e])
                    cy[e] = a0 * q0
                    cy[BWIDTH + e] = a1 * q1
                    cy[2 * BWIDTH + e] = a2 * q2
                    cy[3 * BWIDTH + e] = a3 * q3
                o = dbc + t * N + n
                dC[o], dC[o + 1], dC[o + 2], dC[o + 3] = sc0, sc1, sc2, sc3
                dB[o], dB[o + 1], dB[o + 2], dB[o + 3] = sb0, sb1, sb2, sb3
                n += 4
            while n < N:
                bn = B[bo + n]
                cn = C[co + n]
                hn0 = n * BWIDTH
                cur = j * NW + hn0
                ab = abuf[cur : cur + BWIDTH]
                hp = hbuf[cur : cur + BWIDTH]
                hs = hbuf[cur + NW : cur + NW + BWIDTH]
                cy = carry[hn0 : hn0 + BWIDTH]
                gac = gAc[hn0 : hn0 + BWIDTH]
                an = An[hn0 : hn0 + BWIDTH]
                sc0 = zero
                sb0 = zero
                for e in range(BWIDTH):
                    gye = gyv[e]
                    q0 = cn * gye + cy[e]
                    sc0 += hs[e] * gye
                    sb0 += q0 * xj[e]
                    gdu[e] += bn * q0
                    r0 = q0 * ab[e] * hp[e]
                    gac[e] += r0 * dj[e]
                    gdl[e] += r0 * an[e]
                    cy[e] = ab[e] * q0
                dC[dbc + t * N + n] = sc0
                dB[dbc + t * N + n] = sb0
                n += 1
            dut = du[off : off + w]
            ddt = ddl[off : off + w]
            for e in range(w):
                dut[e] = gdu[e] * dj[e] + gyv[e] * Dg[e]
                ddt[e] = gdl[e] + gdu[e] * uj[e]
            if sp:  # d softplus(x) / dx = sigmoid(x)
                dlt = dl[off : off + w]
                for e in range(w):
                    ddt[e] *= one / (one + _exp2(-dlt[e] * l2e))
        for i in range(NW):  # dA: float32 within a chunk, float64 across chunks
            gA[i] += gAc[i]
            gAc[i] = zero
    ob = (g * bsz + b) * E + e0
    for e in range(w):
        dD[ob + e] = gD[e]
        for n in range(N):
            dA[(ob + e) * N + n] = gA[n * BWIDTH + e]


@njit(parallel=True, **_KW)
def _backward(u, dl, A, B, C, D, z, rev, dims, scale, states, gy, du, ddl, dA, dB, dC, dD, dz):
    """Gradients of :func:`_forward` from dL/dy ``gy`` (G, batch, L, E; group stride ``dims[7]``,
    0 when shared): du, ddl, dz per group (G, batch, L, E) (dz summed over groups by the caller),
    dA (G, batch, E, N) and dD (G, batch, E) in float64 per batch item, dB, dC
    (G, batch, channel blocks, L, N) per block of channels."""
    ntask = dims[0] * dims[1] * ((dims[3] + BWIDTH - 1) // BWIDTH)
    for task in prange(ntask):
        _backward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, states, gy, du, ddl, dA, dB, dC, dD, dz)


@njit(**_KW)
def _backward_serial(u, dl, A, B, C, D, z, rev, dims, scale, states, gy, du, ddl, dA, dB, dC, dD, dz):
    """:func:`_backward` on the calling thread."""
    ntask = dims[0] * dims[1] * ((dims[3] + BWIDTH - 1) // BWIDTH)
    for task in range(ntask):
        _backward_task(task, u, dl, A, B, C, D, z, rev, dims, scale, states, gy, du, ddl, dA, dB, dC, dD, dz)


# ------------------------------------------------------------------ the depthwise conv + SiLU front

TSTEPS = 32  # time steps per task of the conv kernels


@njit(**_KW)
def _conv_task(task, x, w, bias, rev, cdims, u):
    """u[g, b, t] = silu(bias[g] + sum_s w[g, K-1-s] x[b, t - s]) (``rev[g]``: x[b, t + s]),
    steps outside the sequence contributing nothing; one task = (g, b, TSTEPS steps)."""
    bsz, L, E, K, xrow = cdims[1], cdims[2], cdims[3], cdims[4], cdims[5]
    nt = (L + TSTEPS - 1) // TSTEPS
    g = task // (bsz * nt)
    b = (task // nt) % bsz
    t0 = (task % nt) * TSTEPS
    one, l2e, _ = _consts(x, 1.0)
    wg = w[g * K * E : (g + 1) * K * E]
    bg = bias[g * E : (g + 1) * E]
    d = 1 if rev[g] else -1  # the step s taps away is t + d s
    for t in range(t0, min(t0 + TSTEPS, L)):
        o = ((g * bsz + b) * L + t) * E
        out = u[o : o + E]
        if K == 4 and t + 3 * d >= 0 and t + 3 * d < L:  # every tap inside: one pass
            x0 = x[(b * L + t) * xrow : (b * L + t) * xrow + E]
            x1 = x[(b * L + t + d) * xrow : (b * L + t + d) * xrow + E]
            x2 = x[(b * L + t + 2 * d) * xrow : (b * L + t + 2 * d) * xrow + E]
            x3 = x[(b * L + t + 3 * d) * xrow : (b * L + t + 3 * d) * xrow + E]
            w3, w2, w1, w0 = wg[3 * E : 4 * E], wg[2 * E : 3 * E], wg[E : 2 * E], wg[:E]
            for e in range(E):
                q = bg[e] + w3[e] * x0[e] + w2[e] * x1[e] + w1[e] * x2[e] + w0[e] * x3[e]
                out[e] = q / (one + _exp2(-q * l2e))
            continue
        for e in range(E):
            out[e] = bg[e]
        for s in range(K):
            src = t + s if rev[g] else t - s
            if src >= 0 and src < L:
                xs = x[(b * L + src) * xrow : (b * L + src) * xrow + E]
                ws = wg[(K - 1 - s) * E : (K - s) * E]
                for e in range(E):
                    out[e] += ws[e] * xs[e]
        for e in range(E):
            q = out[e]
            out[e] = q / (one + _exp2(-q * l2e))


@njit(**_KW)
def _conv_grad_task(task, x, w, bias, rev, cdims, gu, gpre, gw, gb):
    """Pass 1 of the conv backward, task as :func:`_conv_task`: gpre = dL/du * silu'(pre) (pre
    recomputed), and the task's partial sums of dL/dw (K, E) and dL/dbias (E)."""
    bsz, L, E, K, xrow = cdims[1], cdims[2], cdims[3], cdims[4], cdims[5]
    nt = (L + TSTEPS - 1) // TSTEPS
    g = task // (bsz * nt)
    b = (task // nt) % bsz
    t0 = (task % nt) * TSTEPS
    one, l2e, _ = _consts(x, 1.0)
    wg = w[g * K * E : (g + 1) * K * E]
    bg = bias[g * E : (g + 1) * E]
    gwt = gw[task * K * E : (task + 1) * K * E]
    gbt = gb[task * E : (task + 1) * E]
    for i in range(K * E):
        gwt[i] = one - one
    for e in range(E):
        gbt[e] = one - one
    pre = np.empty(E, x.dtype)
    d = 1 if rev[g] else -1
    for t in range(t0, min(t0 + TSTEPS, L)):
        o = ((g * bsz + b) * L + t) * E
        gut = gu[o : o + E]
        gp = gpre[o : o + E]
        if K == 4 and t + 3 * d >= 0 and t + 3 * d < L:  # every tap inside: two passes
            x0 = x[(b * L + t) * xrow : (b * L + t) * xrow + E]
            x1 = x[(b * L + t + d) * xrow : (b * L + t + d) * xrow + E]
            x2 = x[(b * L + t + 2 * d) * xrow : (b * L + t + 2 * d) * xrow + E]
            x3 = x[(b * L + t + 3 * d) * xrow : (b * L + t + 3 * d) * xrow + E]
            w3, w2, w1, w0 = wg[3 * E : 4 * E], wg[2 * E : 3 * E], wg[E : 2 * E], wg[:E]
            for e in range(E):
                q = bg[e] + w3[e] * x0[e] + w2[e] * x1[e] + w1[e] * x2[e] + w0[e] * x3[e]
                sg = one / (one + _exp2(-q * l2e))
                gp[e] = gut[e] * sg * (one + q * (one - sg))
            g3, g2, g1, g0 = gwt[3 * E : 4 * E], gwt[2 * E : 3 * E], gwt[E : 2 * E], gwt[:E]
            for e in range(E):
                v = gp[e]
                gbt[e] += v
                g3[e] += v * x0[e]
                g2[e] += v * x1[e]
                g1[e] += v * x2[e]
                g0[e] += v * x3[e]
            continue
        for e in range(E):
            pre[e] = bg[e]
        for s in range(K):
            src = t + s if rev[g] else t - s
            if src >= 0 and src < L:
                xs = x[(b * L + src) * xrow : (b * L + src) * xrow + E]
                ws = wg[(K - 1 - s) * E : (K - s) * E]
                for e in range(E):
                    pre[e] += ws[e] * xs[e]
        for e in range(E):
            q = pre[e]
            sg = one / (one + _exp2(-q * l2e))
            v = gut[e] * sg * (one + q * (one - sg))
            gp[e] = v
            gbt[e] += v
        for s in range(K):
            src = t + s if rev[g] else t - s
            if src >= 0 and src < L:
                xs = x[(b * L + src) * xrow : (b * L + src) * xrow + E]
                gws = gwt[(K - 1 - s) * E : (K - s) * E]
                for e in range(E):
                    gws[e] += gp[e] * xs[e]


@njit(**_KW)
def _conv_gx_task(task, w, rev, cdims, gpre, gx):
    """Pass 2: dL/dx[b, t] = sum over directions g and taps of w[g, K-1-s] gpre[g, b, t + s]
    (reversed: t - s); one task = (b, TSTEPS steps)."""
    G, bsz, L, E, K = cdims[0], cdims[1], cdims[2], cdims[3], cdims[4]
    nt = (L + TSTEPS - 1) // TSTEPS
    b = task // nt
    t0 = (task % nt) * TSTEPS
    for t in range(t0, min(t0 + TSTEPS, L)):
        out = gx[(b * L + t) * E : (b * L + t + 1) * E]
        for e in range(E):
            out[e] = 0.0
        for g in range(G):
            d = -1 if rev[g] else 1  # the output step that tap K-1-s of x[t] reaches is t + d s
            if K == 4 and t + 3 * d >= 0 and t + 3 * d < L:  # every tap inside: one pass
                o = ((g * bsz + b) * L + t) * E
                p0 = gpre[o : o + E]
                p1 = gpre[o + d * E : o + (d + 1) * E]
                p2 = gpre[o + 2 * d * E : o + (2 * d + 1) * E]
                p3 = gpre[o + 3 * d * E : o + (3 * d + 1) * E]
                wg = w[g * K * E : (g + 1) * K * E]
                w3, w2, w1, w0 = wg[3 * E : 4 * E], wg[2 * E : 3 * E], wg[E : 2 * E], wg[:E]
                for e in range(E):
                    out[e] += w3[e] * p0[e] + w2[e] * p1[e] + w1[e] * p2[e] + w0[e] * p3[e]
                continue
            for s in range(K):
                tp = t - s if rev[g] else t + s
                if tp >= 0 and tp < L:
                    o = ((g * bsz + b) * L + tp) * E
                    gs = gpre[o : o + E]
                    ws = w[(g * K + K - 1 - s) * E : (g * K + K - s) * E]
                    for e in range(E):
                        out[e] += ws[e] * gs[e]


@njit(parallel=True, **_KW)
def _conv(x, w, bias, rev, cdims, u):
    """The depthwise conv + SiLU of every direction (see :func:`_conv_task`) on numba's threads."""
    nt = (cdims[2] + TSTEPS - 1) // TSTEPS
    for task in prange(cdims[0] * cdims[1] * nt):
        _conv_task(task, x, w, bias, rev, cdims, u)


@njit(**_KW)
def _conv_serial(x, w, bias, rev, cdims, u):
    nt = (cdims[2] + TSTEPS - 1) // TSTEPS
    for task in range(cdims[0] * cdims[1] * nt):
        _conv_task(task, x, w, bias, rev, cdims, u)


@njit(parallel=True, **_KW)
def _conv_backward(x, w, bias, rev, cdims, gu, gpre, gw, gb, gx):
    """Backward of :func:`_conv`: both passes, each on numba's threads."""
    nt = (cdims[2] + TSTEPS - 1) // TSTEPS
    for task in prange(cdims[0] * cdims[1] * nt):
        _conv_grad_task(task, x, w, bias, rev, cdims, gu, gpre, gw, gb)
    for task in prange(cdims[1] * nt):
        _conv_gx_task(task, w, rev, cdims, gpre, gx)


@njit(**_KW)
def _conv_backward_serial(x, w, bias, rev, cdims, gu, gpre, gw, gb, gx):
    nt = (cdims[2] + TSTEPS - 1) // TSTEPS
    for task in range(cdims[0] * cdims[1] * nt):
        _conv_grad_task(task, x, w, bias, rev, cdims, gu, gpre, gw, gb)
    for task in range(cdims[1] * nt):
        _conv_gx_task(task, w, rev, cdims, gpre, gx)


# -------------------------------------------------------------------------------------- wrappers

last_threads = 0  # numba's thread count for the last forward call
last_workers: set[int] = set()  # distinct worker ids that ran its tasks


# Numba's workqueue threading layer (the default here, see _configure) aborts the whole process when
# two Python threads launch parallel kernels at once (the HTTP service classifies on several threads).
# One launch at a time: the kernel itself already uses every thread it is given.
_LAUNCH = threading.Lock()


def threads_for(threads: int | None = None) -> int:
    """Worker threads for a call: ``threads``, else torch's, capped at numba's pool size."""
    want = threads if threads else torch.get_num_threads()
    return max(1, min(int(want), numba.config.NUMBA_NUM_THREADS))


def _np(t: Tensor) -> np.ndarray:
    """A contiguous tensor as a flat numpy array (a view; others are copied first). The calls
    here are the kernel's per-call overhead, so each takes the cheapest route (about 1 us)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy().ravel()


def _rows(t: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, int]:
    """(t (..., K) as a flat numpy array over its rows, the row stride): a view without a copy when
    the last axis is contiguous and the rows evenly strided - as B and C (slices of x_proj's
    output) and z (half of in_proj's) are - else a contiguous copy (row stride K)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    k = t.shape[-1]
    if t.is_contiguous() or t.ndim < 2 or t.numel() == 0:
        return _np(t), k
    if t.stride(-1) == 1 or k == 1:
        rs = t.stride(-2) if t.shape[-2] > 1 else k
        expect, ok = rs, rs >= k
        for d in range(t.ndim - 2, -1, -1):
            ok = ok and (t.shape[d] == 1 or t.stride(d) == expect)
            expect *= t.shape[d]
        if ok:
            if t.requires_grad:
                t = t.detach()
            return t.as_strided(((t.numel() // k - 1) * rs + k,), (1,)).numpy(), rs
    return _np(t), k


def _dims(
    u: Tensor, n: int, chunk: int, softplus: bool, strides: tuple[int, int, int, int], summed: bool = False
) -> np.ndarray:
    """The kernels' integer arguments: shapes, chunk, softplus, the strides (gy's group stride,
    z's, B's and C's row strides), whether the forward sums its output over groups."""
    g, bsz, length, e = u.shape
    return np.array([g, bsz, length, e, n, chunk, int(softplus), *strides, int(summed)], dtype=np.int64)


_EMPTY = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def _empty(dtype: torch.dtype) -> np.ndarray:
    """A zero-size array of the dtype: what the kernels take for an absent optional array."""
    return _EMPTY[dtype]


def forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    reverse: tuple[bool, ...],
    *,
    z: Tensor | None = None,
    scale: float = 1.0,
    softplus: bool = False,
    keep_states: bool = False,
    sum_groups: bool = False,
    chunk: int = CHUNK,
    threads: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Grouped scan, no autograd: u, delta (G, batch, L, E), A (G, E, N), B, C (G, batch, L, N),
    D (G, E), all CPU and of one float dtype (float32 or float64). With ``z`` (batch, L, E) each
    group's output is multiplied by ``scale * silu(z)``; with ``softplus`` the kernel takes
    delta = softplus(``delta``) (and :func:`backward` returns the gradient of the pre-activation).
    Returns (y (G, batch, L, E), or with ``sum_groups`` its sum over groups (batch, L, E) added up
    in the kernel, the states entering every ``chunk`` steps for :func:`backward` when
    ``keep_states``)."""
    global last_threads, last_workers
    g, bsz, length, e = u.shape
    n = A.shape[-1]
    dtype = u.dtype
    y = u.new_empty(bsz, length, e) if sum_groups else u.new_empty(g, bsz, length, e)
    nck = -(-length // chunk)
    states = u.new_empty(g, bsz, nck, n, e) if keep_states else None
    ntask = g * bsz * (-(-e // WIDTH))
    tid = np.zeros(ntask, dtype=np.int64)
    b_np, brow = _rows(B, dtype)
    c_np, crow = _rows(C, dtype)
    z_np, zrow = (_empty(dtype), e) if z is None else _rows(z, dtype)
    with _LAUNCH:
        numba.set_num_threads(threads_for(threads))
        last_threads = numba.get_num_threads()
        (_forward if last_threads > 1 and ntask > 1 else _forward_serial)(
            _np(u),
            _np(delta),
            _np(A),
            b_np,
            c_np,
            _np(D),
            z_np,
            np.array(reverse, dtype=np.bool_),
            _dims(u, n, chunk, softplus, (0, zrow, brow, crow), sum_groups),
            float(scale),
            y.numpy().ravel(),
            _empty(dtype) if states is None else states.numpy().ravel(),
            tid,
        )
    last_workers = set(tid.tolist())
    return y, states


def backward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    reverse: tuple[bool, ...],
    states: Tensor,
    gy: Tensor,
    *,
    z: Tensor | None = None,
    scale: float = 1.0,
    softplus: bool = False,
    chunk: int = CHUNK,
    threads: int | None = None,
) -> tuple[Tensor, ...]:
    """Gradients of :func:`forward` (same arguments, plus its ``states`` and dL/dy ``gy``
    (G, batch, L, E), or (batch, L, E) - or expanded from it - when every group gets the same):
    (du, ddelta, dA, dB, dC, dD, dz or None), shaped as the inputs."""
    g, bsz, length, e = u.shape
    n = A.shape[-1]
    dtype = u.dtype
    nb = -(-e // BWIDTH)
    du, ddl = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    dA = torch.empty(g, bsz, e, n, dtype=torch.float64)
    dD = torch.empty(g, bsz, e, dtype=torch.float64)
    dB = u.new_empty(g, bsz, nb, length, n)
    dC = u.new_empty(g, bsz, nb, length, n)
    ntask = g * bsz * nb
    b_np, brow = _rows(B, dtype)
    c_np, crow = _rows(C, dtype)
    z_np, zrow = (_empty(dtype), e) if z is None else _rows(z, dtype)
    gy = gy.detach().to(dtype)
    if gy.ndim == 4 and gy.stride(0) == 0:  # one dL/dy for every group (expanded): read it once
        gy = gy[0]
    gy_group = 0 if gy.ndim == 3 else bsz * length * e
    with _LAUNCH:
        numba.set_num_threads(threads_for(threads))
        (_backward if numba.get_num_threads() > 1 and ntask > 1 else _backward_serial)(
            _np(u),
            _np(delta),
            _np(A),
            b_np,
            c_np,
            _np(D),
            z_np,
            np.array(reverse, dtype=np.bool_),
            _dims(u, n, chunk, softplus, (gy_group, zrow, brow, crow)),
            float(scale),
            _np(states),
            _np(gy),
            du.view(-1).numpy(),
            ddl.view(-1).numpy(),
            dA.view(-1).numpy(),
            dB.view(-1).numpy(),
            dC.view(-1).numpy(),
            dD.view(-1).numpy(),
            _empty(dtype) if dz is None else dz.view(-1).numpy(),
        )
    return (
        du,
        ddl,
        dA.sum(1).to(dtype),
        dB.sum(2) if nb > 1 else dB[:, :, 0],
        dC.sum(2) if nb > 1 else dC[:, :, 0],
        dD.sum(1).to(dtype),
        None if dz is None else dz.sum(0),
    )


def _conv_dims(x: Tensor, w: Tensor, xrow: int) -> np.ndarray:
    bsz, length, e = x.shape
    g, k, _ = w.shape
    return np.array([g, bsz, length, e, k, xrow], dtype=np.int64)


def conv_silu(x: Tensor, w: Tensor, b: Tensor, reverse: tuple[bool, ...], *, threads: int | None = None) -> Tensor:
    """silu(depthwise conv along time) of every direction, no autograd: x (batch, L, E) (rows may
    be strided: half of in_proj's output is read in place), taps w (G, K, E) (tap K-1 multiplies
    the current step, tap K-1-s the step s behind, or ahead where ``reverse[g]``), bias b (G, E),
    one float dtype -> (G, batch, L, E)."""
    bsz, length, e = x.shape
    dtype = x.dtype
    x_np, xrow = _rows(x, dtype)
    u = x.new_empty(w.shape[0], bsz, length, e)
    ntask = w.shape[0] * bsz * -(-length // TSTEPS)
    with _LAUNCH:
        numba.set_num_threads(threads_for(threads))
        (_conv if numba.get_num_threads() > 1 and ntask > 1 else _conv_serial)(
            x_np,
            _np(w.to(dtype)),
            _np(b.to(dtype)),
            np.array(reverse, dtype=np.bool_),
            _conv_dims(x, w, xrow),
            u.numpy().ravel(),
        )
    return u


def conv_silu_backward(
    x: Tensor, w: Tensor, b: Tensor, reverse: tuple[bool, ...], gu: Tensor, *, threads: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`conv_silu` from dL/du (G, batch, L, E): (dx, dw, db) shaped as x, w, b."""
    bsz, length, e = x.shape
    g, k, _ = w.shape
    dtype = x.dtype
    x_np, xrow = _rows(x, dtype)
    nt = -(-length // TSTEPS)
    gpre = x.new_empty(g, bsz, length, e)
    gw = x.new_empty(g, bsz * nt, k, e)
    gb = x.new_empty(g, bsz * nt, e)
    gx = x.new_empty(bsz, length, e)
    with _LAUNCH:
        numba.set_num_threads(threads_for(threads))
        (_conv_backward if numba.get_num_threads() > 1 else _conv_backward_serial)(
            x_np,
            _np(w.to(dtype)),
            _np(b.to(dtype)),
            np.array(reverse, dtype=np.bool_),
            _conv_dims(x, w, xrow),
            _np(gu.to(dtype)),
            gpre.numpy().ravel(),
            gw.numpy().ravel(),
            gb.numpy().ravel(),
            gx.numpy().ravel(),
        )
    return gx, gw.sum(1), gb.sum(1)
