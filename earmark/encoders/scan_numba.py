"""The selective scan as a compiled CPU kernel (numba): forward and backward, both directions of a
block in one call, the decay exp(delta A), the D skip and optionally the SiLU(z) gate fused.

Imported lazily by :mod:`earmark.encoders.scan` (numba is optional at run time: without it, or for
tensors not on the CPU, the pure-PyTorch scans run). Importing this module configures numba first:

* the on-disk cache of compiled kernels goes to ``$NUMBA_CACHE_DIR`` if the user set it, else
  ``$EARMARK_DATA/numba`` or ``~/.cache/earmark/numba``; when that directory is not writable
  (a read-only install or home) the kernels are compiled in memory each process instead;
* the threading layer is ``workqueue`` unless ``NUMBA_THREADING_LAYER`` is set: numba's OpenMP
  layer would start a second OpenMP pool beside torch's, and both spin after each parallel region
  on the same cores.

Threads: each call runs on ``threads`` workers (default ``torch.get_num_threads()``, capped at
numba's pool size), so the kernel and torch's ops - which never run at the same time - use the
same number of cores.

Why the loops look as they do: numba vectorises a contiguous inner loop over channels on 1-d
arrays with non-negative offsets (multi-dimensional indexing blocked it), and ``math.exp`` stays
scalar in numba builds without SVML, so decays use a branch-free polynomial ``exp2`` (exponent bits
set directly) in float32. float64 inputs use ``math.exp`` (the test path). Work is split over
(direction, batch item, block of ``WIDTH`` channels); each task keeps its (N, WIDTH) state local.
Sums over time (dA, dD) accumulate in float64.

Backward recomputes the states from those saved every ``chunk`` steps by the forward (memory
L / chunk x N x E per direction and item, never L x N x E), one chunk at a time into local
buffers, and runs the adjoint recurrence ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` back
through it.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

WIDTH = 64  # channels per task: 4 AVX-512 vectors; (N, WIDTH) state = 4 KiB at N = 16
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


def _exp2(x):  # pragma: no cover - typed by the overload below
    raise NotImplementedError


@overload(_exp2)
def _exp2_impl(x):
    """2**x: float32 a degree-5 polynomial on the fraction (relative error 1.5e-7) times 2**floor
    (clamped to [2^-126, 2^127]); float64 exact through math.exp."""
    if x == types.float32:
        c1, c2, c3 = np.float32(0.693152968), np.float32(0.240154530), np.float32(0.0558236044)
        c4, c5 = np.float32(0.00899258403), np.float32(0.00187623295)
        lo, hi, one = np.float32(-126.0), np.float32(127.0), np.float32(1.0)

        def f32(x):
            x = min(max(x, lo), hi)
            xi = np.floor(x)
            f = x - xi
            p = one + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * c5))))
            return p * _f32_from_bits(np.int32((np.int32(xi) + 127) << 23))

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


@njit(parallel=True, cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _forward(u, dl, A, B, C, D, z, rev, dims, scale, y, states, tid):
    """y (G, batch, L, E) = C . h + D u (times scale * silu(z) if z has elements), every array 1-d
    (flattened C-order); A (G, E, N). ``states`` (G, batch, L / chunk, N, E): the state entering
    every chunk (in scan order) when it has elements. ``tid``: the worker that ran each task
    (numba.get_num_threads inside a kernel would keep it out of the disk cache).

    Inner loops index per-step slices from 0: an index numba cannot prove non-negative gets a
    wraparound select, which turns LLVM's vector loads into gathers."""
    G, bsz, L, E, N, chunk = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    nb = (E + WIDTH - 1) // WIDTH
    nck = (L + chunk - 1) // chunk
    gated = z.size > 0
    keep = states.size > 0
    sp = dims[6] != 0  # dl holds the pre-activation: delta = softplus(dl)
    k = np.empty(3, dl.dtype)  # constants in the compute dtype (a float64 literal would promote)
    k[0], k[1], k[2] = 1.0, INV_LN2, scale
    one, l2e, sc = k[0], k[1], k[2]
    for task in prange(G * bsz * nb):
        tid[task] = numba.get_thread_id()
        g = task // (bsz * nb)
        b = (task // nb) % bsz
        e0 = (task % nb) * WIDTH
        w = min(WIDTH, E - e0)
        A2 = np.empty(N * WIDTH, dl.dtype)
        h = np.zeros(N * WIDTH, dl.dtype)
        dlv = np.empty(WIDTH, dl.dtype)
        duv = np.empty(WIDTH, dl.dtype)
        acc = np.empty(WIDTH, dl.dtype)
        for n in range(N):
            for e in range(w):
                A2[n * WIDTH + e] = A[(g * E + e0 + e) * N + n] * INV_LN2
        Dg = D[g * E + e0 : g * E + e0 + w]
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
                duv[e] = dlv[e] * ut[e]
                acc[e] = Dg[e] * ut[e]
            bc = (row + t) * N
            for n in range(N):
                bn = B[bc + n]
                cn = C[bc + n]
                hs = h[n * WIDTH : n * WIDTH + w]
                As = A2[n * WIDTH : n * WIDTH + w]
                for e in range(w):
                    hv = _exp2(dlv[e] * As[e]) * hs[e] + bn * duv[e]
                    hs[e] = hv
                    acc[e] += cn * hv
            yt = y[off : off + w]
            if gated:
                zo = (b * L + t) * E + e0
                zt = z[zo : zo + w]
                for e in range(w):
                    zz = zt[e]
                    yt[e] = acc[e] * (sc * zz / (one + _exp2(-zz * l2e)))
            else:
                for e in range(w):
                    yt[e] = acc[e]


@njit(parallel=True, cache=CACHE, fastmath=FASTMATH, error_model="numpy")
def _backward(u, dl, A, B, C, D, z, rev, dims, scale, states, gy, du, ddl, dA, dB, dC, dD, dz):
    """Gradients of :func:`_forward` from dL/dy ``gy`` (G, batch, L, E): du, ddl, dz per group
    (G, batch, L, E) (dz summed over groups by the caller), dA (G, batch, E, N) and dD (G, batch, E)
    in float64 per batch item, dB, dC (G, batch, channel blocks, L, N) per block of channels."""
    G, bsz, L, E, N, chunk = dims[0], dims[1], dims[2], dims[3], dims[4], dims[5]
    nb = (E + WIDTH - 1) // WIDTH
    nck = (L + chunk - 1) // chunk
    gated = z.size > 0
    sp = dims[6] != 0
    k = np.empty(3, dl.dtype)
    k[0], k[1], k[2] = 1.0, INV_LN2, scale
    one, l2e, sc = k[0], k[1], k[2]
    zero = one - one
    for task in prange(G * bsz * nb):
        g = task // (bsz * nb)
        b = (task // nb) % bsz
        blk = task % nb
        e0 = blk * WIDTH
        w = min(WIDTH, E - e0)
        NW = N * WIDTH
        A2 = np.empty(NW, dl.dtype)
        An = np.empty(NW, dl.dtype)
        hbuf = np.empty((chunk + 1) * NW, dl.dtype)  # state entering the chunk, then after each step
        abuf = np.empty(chunk * NW, dl.dtype)  # decays of the chunk
        carry = np.zeros(NW, dl.dtype)  # a_{t+1} g_{t+1}
        gA = np.zeros(NW, np.float64)
        gAc = np.zeros(NW, dl.dtype)
        gD = np.zeros(WIDTH, np.float64)
        dlv = np.empty(WIDTH, dl.dtype)
        duv = np.empty(WIDTH, dl.dtype)
        gyv = np.empty(WIDTH, dl.dtype)
        gdu = np.empty(WIDTH, dl.dtype)
        gdl = np.empty(WIDTH, dl.dtype)
        yv = np.empty(WIDTH, dl.dtype)
        gg = np.empty(WIDTH, dl.dtype)
        ds = np.empty(WIDTH, dl.dtype)
        for n in range(N):
            for e in range(w):
                a = A[(g * E + e0 + e) * N + n]
                An[n * WIDTH + e] = a
                A2[n * WIDTH + e] = a * INV_LN2
        Dg = D[g * E + e0 : g * E + e0 + w]
        row = (g * bsz + b) * L
        dbc = ((g * bsz + b) * nb + blk) * L * N
        for c in range(nck - 1, -1, -1):
            s0 = c * chunk
            m = min(chunk, L - s0)
            base = ((g * bsz + b) * nck + c) * N * E + e0
            for n in range(N):
                st = states[base + n * E : base + n * E + w]
                h0 = hbuf[n * WIDTH : n * WIDTH + w]
                for e in range(w):
                    h0[e] = st[e]
            # recompute the chunk's decays and states
            for j in range(m):
                s = s0 + j
                t = L - 1 - s if rev[g] else s
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
                    duv[e] = dlv[e] * ut[e]
                bc = (row + t) * N
                for n in range(N):
                    bn = B[bc + n]
                    cur = j * NW + n * WIDTH
                    As = A2[n * WIDTH : n * WIDTH + w]
                    ab = abuf[cur : cur + w]
                    hp = hbuf[cur : cur + w]
                    hn = hbuf[cur + NW : cur + NW + w]
                    for e in range(w):
                        ab[e] = _exp2(dlv[e] * As[e])
                    for e in range(w):
                        hn[e] = ab[e] * hp[e] + bn * duv[e]
            # adjoint back through the chunk
            for jj in range(m):
                j = m - 1 - jj
                s = s0 + j
                t = L - 1 - s if rev[g] else s
                off = (row + t) * E + e0
                bc = (row + t) * N
                dlt = dl[off : off + w]
                ut = u[off : off + w]
                gyt = gy[off : off + w]
                if sp:
                    for e in range(w):
                        dlv[e] = _softplus(dlt[e])
                else:
                    for e in range(w):
                        dlv[e] = dlt[e]
                for e in range(w):
                    duv[e] = dlv[e] * ut[e]
                    gyv[e] = gyt[e]
                    gdu[e] = zero
                    gdl[e] = zero
                if gated:
                    zo = (b * L + t) * E + e0
                    zt = z[zo : zo + w]
                    dzt = dz[off : off + w]
                    for e in range(w):
                        yv[e] = Dg[e] * ut[e]
                    for n in range(N):
                        cn = C[bc + n]
                        cur = (j + 1) * NW + n * WIDTH
                        hs = hbuf[cur : cur + w]
                        for e in range(w):
                            yv[e] += cn * hs[e]
                    for e in range(w):
                        zz = zt[e]
                        sg = one / (one + _exp2(-zz * l2e))
                        dzt[e] = gyv[e] * sc * yv[e] * sg * (one + zz * (one - sg))
                        gyv[e] *= sc * zz * sg
                for e in range(w):
                    gD[e] += gyv[e] * ut[e]
                # one array written per loop: fewer overlap checks for LLVM's vectoriser
                for n in range(N):
                    bn = B[bc + n]
                    cn = C[bc + n]
                    hn = n * WIDTH
                    cur = j * NW + hn
                    ab = abuf[cur : cur + w]
                    hp = hbuf[cur : cur + w]
                    hs = hbuf[cur + NW : cur + NW + w]
                    cy = carry[hn : hn + w]
                    gac = gAc[hn : hn + w]
                    an = An[hn : hn + w]
                    for e in range(w):  # g_t = C_t dy_t + a_{t+1} g_{t+1}
                        gg[e] = cn * gyv[e] + cy[e]
                    sumc = zero
                    sumb = zero
                    for e in range(w):
                        sumc += hs[e] * gyv[e]
                        sumb += gg[e] * duv[e]
                    dC[dbc + t * N + n] = sumc
                    dB[dbc + t * N + n] = sumb
                    for e in range(w):
                        gdu[e] += gg[e] * bn
                    for e in range(w):  # dL/d(delta_t A) = g_t a_t h_{t-1}
                        ds[e] = gg[e] * ab[e] * hp[e]
                    for e in range(w):
                        gac[e] += ds[e] * dlv[e]
                    for e in range(w):
                        gdl[e] += ds[e] * an[e]
                    for e in range(w):
                        cy[e] = ab[e] * gg[e]
                dut = du[off : off + w]
                ddt = ddl[off : off + w]
                for e in range(w):
                    dut[e] = gdu[e] * dlv[e] + gyv[e] * Dg[e]
                    ddt[e] = gdl[e] + gdu[e] * ut[e]
                if sp:  # d softplus(x) / dx = sigmoid(x)
                    for e in range(w):
                        ddt[e] *= one / (one + _exp2(-dlt[e] * l2e))
            for i in range(NW):  # dA: float32 within a chunk, float64 across chunks
                gA[i] += gAc[i]
                gAc[i] = zero
        ob = (g * bsz + b) * E + e0
        for e in range(w):
            dD[ob + e] = gD[e]
            for n in range(N):
                dA[(ob + e) * N + n] = gA[n * WIDTH + e]


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
    return t.detach().contiguous().view(-1).numpy()


def _dims(u: Tensor, n: int, chunk: int, softplus: bool) -> np.ndarray:
    g, bsz, length, e = u.shape
    return np.array([g, bsz, length, e, n, chunk, int(softplus)], dtype=np.int64)


def _empty(dtype: torch.dtype) -> np.ndarray:
    return np.empty(0, dtype=torch.empty(0, dtype=dtype).numpy().dtype)


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
    chunk: int = CHUNK,
    threads: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Grouped scan, no autograd: u, delta (G, batch, L, E), A (G, E, N), B, C (G, batch, L, N),
    D (G, E), all CPU and of one float dtype (float32 or float64). With ``z`` (batch, L, E) each
    group's output is multiplied by ``scale * silu(z)``; with ``softplus`` the kernel takes
    delta = softplus(``delta``) (and :func:`backward` returns the gradient of the pre-activation).
    Returns (y (G, batch, L, E), the states
    entering every ``chunk`` steps for :func:`backward` when ``keep_states``)."""
    global last_threads, last_workers
    g, bsz, length, e = u.shape
    n = A.shape[-1]
    dtype = u.dtype
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    nck = -(-length // chunk)
    states = u.new_empty(g, bsz, nck, n, e) if keep_states else None
    ntask = g * bsz * (-(-e // WIDTH))
    tid = np.zeros(ntask, dtype=np.int64)
    with _LAUNCH:
        numba.set_num_threads(threads_for(threads))
        last_threads = numba.get_num_threads()
        _forward(
            _np(u),
            _np(delta),
            _np(A),
            _np(B),
            _np(C),
            _np(D),
            _empty(dtype) if z is None else _np(z.to(dtype)),
            np.array(reverse, dtype=np.bool_),
            _dims(u, n, chunk, softplus),
            float(scale),
            y.view(-1).numpy(),
            _empty(dtype) if states is None else states.view(-1).numpy(),
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
    (G, batch, L, E)): (du, ddelta, dA, dB, dC, dD, dz or None), shaped as the inputs."""
    g, bsz, length, e = u.shape
    n = A.shape[-1]
    dtype = u.dtype
    nb = -(-e // WIDTH)
    du, ddl = torch.empty_like(u), torch.empty_like(u)
    dz = torch.empty_like(u) if z is not None else None
    dA = torch.empty(g, bsz, e, n, dtype=torch.float64)
    dD = torch.empty(g, bsz, e, dtype=torch.float64)
    dB = u.new_empty(g, bsz, nb, length, n)
    dC = u.new_empty(g, bsz, nb, length, n)
    with _LAUNCH:
        numba.set_num_threads(threads_for(threads))
        _backward(
            _np(u),
            _np(delta),
            _np(A),
            _np(B),
            _np(C),
            _np(D),
            _empty(dtype) if z is None else _np(z.to(dtype)),
            np.array(reverse, dtype=np.bool_),
            _dims(u, n, chunk, softplus),
            float(scale),
            _np(states),
            _np(gy.to(dtype)),
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
