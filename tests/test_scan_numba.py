"""The numba scan kernel against the plain reference loop, its fused variants (softplus, gate),
its thread and cache settings, ``auto`` / ``EARMARK_SCAN`` dispatch and the fallback without numba.

Tolerances as in test_scan.py: 1e-10 in float64, 1e-5 relative to the largest magnitude in float32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from earmark.encoders import EncoderConfig, build_encoder
from earmark.encoders import scan as scan_module
from earmark.encoders.scan import SCAN_IMPLS, resolve_impl, selective_scan, selective_scan_reference
from tests.test_scan import TOL, assert_close, make_grouped, make_inputs

numba = pytest.importorskip("numba")
K = pytest.importorskip("earmark.encoders.scan_numba")

NAMES = ["u", "delta", "A", "B", "C", "D"]


def check_numba(inputs: list[torch.Tensor], tol: float, reverse=False) -> None:
    """selective_scan(impl='numba') = the reference loop, output and every gradient."""
    y_ref = selective_scan_reference(*inputs, reverse=reverse)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=y_ref.dtype)
    g_ref = torch.autograd.grad(y_ref, inputs, gy)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    y = selective_scan(*fresh, impl="numba", reverse=reverse)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, tol, "numba y")
    for name, g, gr in zip(NAMES, torch.autograd.grad(y, fresh, gy), g_ref, strict=True):
        assert g.shape == gr.shape, name
        assert_close(g, gr, tol, f"numba d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 7, 33, 65, 257])
def test_numba_matches_reference(length: int, dtype: torch.dtype) -> None:
    # E = 70: one full block of 64 channels and a partial one; 65 steps: two saved-state chunks + 1
    check_numba(make_inputs(2, length, 70, 4, dtype, seed=length), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_large_decays(dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 40, 5, 16, dtype, big_decay=True)
    check_numba(inputs, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 9, 37])
def test_numba_both_directions_in_one_call(length: int, dtype: torch.dtype) -> None:
    inputs = make_grouped(2, 3, length, 67, 4, dtype)
    check_numba(inputs, TOL[dtype], reverse=(False, True))
    check_numba([t.detach()[1].requires_grad_() for t in inputs], TOL[dtype], reverse=True)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_numba_gradcheck_float64(chunk: int) -> None:
    inputs = make_grouped(2, 2, 5, 3, 2, torch.float64)
    plan = scan_module.plan_scan(inputs[0], inputs[2], "numba", block=chunk, reverse=(True, False))
    run = lambda *xs: scan_module._Scan.apply(*xs, plan, True)  # noqa: E731
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-8)


def _fused_reference(inputs: list[torch.Tensor], pre: torch.Tensor, z: torch.Tensor, reverse) -> torch.Tensor:
    """mean over groups of scan(softplus(pre)) * silu(z), through the reference loop."""
    u, _, A, B, C, D = inputs
    y = selective_scan_reference(u, F.softplus(pre), A, B, C, D, reverse=reverse)
    return y.mean(0) * F.silu(z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_fused_softplus_and_gate(dtype: torch.dtype) -> None:
    """The mixer's fused form: softplus of delta and the direction-averaged SiLU(z) gate inside the
    kernel, forward and gradients (including dz and d pre-activation)."""
    inputs = make_grouped(2, 2, 23, 66, 4, dtype)
    g = torch.Generator().manual_seed(5)
    pre = (torch.randn(inputs[1].shape, generator=g, dtype=dtype) - 2).requires_grad_()
    z = torch.randn(inputs[0].shape[1:], generator=g, dtype=dtype).requires_grad_()
    reverse = (False, True)
    leaves = [inputs[0], pre, *inputs[2:], z]
    y_ref = _fused_reference(inputs, pre, z, reverse)
    gy = torch.randn(y_ref.shape, generator=g, dtype=dtype)
    g_ref = torch.autograd.grad(y_ref, leaves, gy)
    args = [t.detach() for t in (inputs[0], pre, *inputs[2:])]
    y, states = K.forward(*args, reverse, z=z.detach(), scale=0.5, softplus=True, keep_states=True, chunk=4)
    assert_close(y.sum(0), y_ref, TOL[dtype], "fused y")
    for threads in (1, 2):  # summed in the kernel, group after group: the same sum, bit for bit
        summed, _ = K.forward(*args, reverse, z=z.detach(), scale=0.5, softplus=True, sum_groups=True, threads=threads)
        assert torch.equal(summed, y.sum(0))
    grads = K.backward(*args, reverse, states, gy.expand(2, *gy.shape), z=z.detach(), scale=0.5, softplus=True, chunk=4)
    for name, got, want in zip([*NAMES, "z"], grads, g_ref, strict=True):
        assert_close(got, want, TOL[dtype], f"fused d{name}")


def test_numba_reads_strided_views_and_a_shared_dy() -> None:
    """B, C and z as the mixer passes them (column slices of wider x_proj / in_proj outputs) are
    read in place, and a dL/dy expanded over the groups is read once: the same numbers, bit for
    bit, as contiguous copies and a materialised dL/dy."""
    g = torch.Generator().manual_seed(7)
    G, bsz, L, E, N = 2, 2, 41, 70, 4
    u = torch.randn(G, bsz, L, E, generator=g)
    pre = torch.randn(G, bsz, L, E, generator=g) - 2
    A = -torch.rand(G, E, N, generator=g) - 0.1
    D = torch.randn(G, E, generator=g)
    dbc = torch.randn(G, bsz * L, 3 + 2 * N, generator=g)  # dt rank 3, then B, then C
    B = dbc[..., 3 : 3 + N].reshape(G, bsz, L, N)
    C = dbc[..., 3 + N :].reshape(G, bsz, L, N)
    xz = torch.randn(bsz, L, 2 * E, generator=g)
    z = xz[..., E:]
    assert not (B.is_contiguous() or C.is_contiguous() or z.is_contiguous())
    assert K._rows(B, torch.float32)[1] == 3 + 2 * N and K._rows(z, torch.float32)[1] == 2 * E
    rev = (False, True)
    kw = {"scale": 0.5, "softplus": True, "chunk": 8}
    y, st = K.forward(u, pre, A, B, C, D, rev, z=z, keep_states=True, **kw)
    Bc, Cc, zc = B.contiguous(), C.contiguous(), z.contiguous()
    y_ref, st_ref = K.forward(u, pre, A, Bc, Cc, D, rev, z=zc, keep_states=True, **kw)
    assert torch.equal(y, y_ref) and torch.equal(st, st_ref)
    gy = torch.randn(bsz, L, E, generator=g)
    got = K.backward(u, pre, A, B, C, D, rev, st, gy.expand(G, *gy.shape), z=z, **kw)
    want = K.backward(u, pre, A, Bc, Cc, D, rev, st, gy.repeat(G, 1, 1, 1), z=zc, **kw)
    for name, a, b in zip([*NAMES, "z"], got, want, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("length", "taps"), [(1, 4), (2, 4), (7, 4), (37, 4), (9, 2), (5, 1)])
def test_numba_conv_silu_matches_torch(length: int, taps: int, dtype: torch.dtype) -> None:
    """The kernel's depthwise conv + SiLU (both directions, x a half of a wider tensor as in the
    mixer) = SiLU of the mixer's PyTorch conv, output and gradients, at lengths shorter than, equal
    to and longer than the taps."""
    from earmark.encoders.mamba import _ConvSilu, _DepthwiseConv

    g = torch.Generator().manual_seed(length * 10 + taps)
    E = 70
    xz = torch.randn(3, length, 2 * E, generator=g, dtype=dtype)
    w = torch.randn(2, taps, E, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(2, E, generator=g, dtype=dtype, requires_grad=True)
    rev = (False, True)
    x = xz[..., :E].clone().requires_grad_()
    ref = F.silu(_DepthwiseConv.apply(x, w, b, rev))
    gu = torch.randn(ref.shape, generator=g, dtype=dtype)
    g_ref = torch.autograd.grad(ref, (x, w, b), gu)
    xv = xz[..., :E].requires_grad_()
    got = _ConvSilu.apply(xv, w, b, rev)
    assert_close(got, ref, TOL[dtype], "conv silu")
    for name, a, r in zip("xwb", torch.autograd.grad(got, (xv, w, b), gu), g_ref, strict=True):
        assert_close(a, r, TOL[dtype], f"conv silu d{name}")


def test_numba_conv_silu_gradcheck_float64() -> None:
    from earmark.encoders.mamba import _ConvSilu

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _ConvSilu.apply(*t, (True, False)), (x, w, b), eps=1e-6, atol=1e-8)


def test_numba_uses_the_threads_it_is_given() -> None:
    inputs = [t.detach() for t in make_grouped(2, 2, 17, 256, 4, torch.float32)]  # 16 tasks
    for threads in (1, 2):
        if threads > numba.config.NUMBA_NUM_THREADS:
            continue
        K.forward(*inputs, (False, True), threads=threads)
        assert K.last_threads == threads
        assert K.last_workers <= set(range(threads))
    K.forward(*inputs, (False, True))  # default: torch's thread count
    assert K.last_threads == min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    assert K.threads_for(10**6) == numba.config.NUMBA_NUM_THREADS


def test_auto_picks_numba_and_the_env_forces(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "numba" in SCAN_IMPLS
    u, delta, A, B, C, D = (t.detach() for t in make_inputs(2, 9, 4, 3, torch.float32))
    monkeypatch.delenv("EARMARK_SCAN", raising=False)
    assert resolve_impl(u, A) == "numba"
    monkeypatch.setenv("EARMARK_SCAN", "torch")
    assert resolve_impl(u, A) in ("sequential", "chunked")
    assert resolve_impl(u, A, "numba") == "numba"  # an explicit impl is not overridden
    y_torch = selective_scan(u, delta, A, B, C, D)
    monkeypatch.setenv("EARMARK_SCAN", "numba")
    assert resolve_impl(u, A) == "numba"
    assert_close(selective_scan(u, delta, A, B, C, D), y_torch, 1e-5, "forced numba")
    monkeypatch.setenv("EARMARK_SCAN", "magic")
    with pytest.raises(ValueError, match="EARMARK_SCAN"):
        resolve_impl(u, A)


@pytest.fixture
def without_numba(monkeypatch: pytest.MonkeyPatch):
    """The kernel's import helper raising ImportError, as where numba is not installed."""

    def missing():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(scan_module, "_import_numba_kernel", missing)
    scan_module.numba_kernel.cache_clear()
    yield
    scan_module.numba_kernel.cache_clear()


def test_fallback_without_numba(without_numba, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EARMARK_SCAN", raising=False)
    inputs = make_inputs(2, 20, 6, 4, torch.float64, seed=3)
    assert scan_module.numba_kernel() is None
    assert resolve_impl(inputs[0], inputs[2]) in ("sequential", "chunked")
    y = selective_scan(*inputs)
    assert_close(y, selective_scan_reference(*inputs), 1e-10, "fallback")
    with pytest.raises(RuntimeError, match="numba"):
        selective_scan(*inputs, impl="numba")
    monkeypatch.setenv("EARMARK_SCAN", "numba")
    with pytest.raises(RuntimeError, match="numba"):
        selective_scan(*inputs)


def _encoder_run(dtype: torch.dtype, recompute: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    cfg = EncoderConfig(embed_dim=32, depth=2, d_state=4, max_frames=64, recompute=recompute)
    torch.manual_seed(0)
    model = build_encoder(cfg).to(dtype)
    x = torch.randn(2, 128, 40, dtype=dtype)
    y = model(x)
    y.pow(2).sum().backward()
    with torch.no_grad():
        y_eval = model(x)
    return y.detach(), y_eval, [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    ("dtype", "recompute"),
    [(torch.float32, True), (torch.float32, False), (torch.float64, True), (torch.float64, False)],
)
def test_encoder_numba_equals_torch_scan(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, recompute: bool) -> None:
    """The Mamba encoder on the kernel (fused branch with recompute, plain _Scan without) equals
    the encoder on the PyTorch scan: output, no-grad output and every parameter gradient."""
    monkeypatch.setenv("EARMARK_SCAN", "torch")
    ref = _encoder_run(dtype, recompute)
    monkeypatch.setenv("EARMARK_SCAN", "numba")
    got = _encoder_run(dtype, recompute)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close(got[0], ref[0], tol, "encoder y")
    assert_close(got[1], ref[0], tol, "encoder y without grad")
    for g, gr in zip(got[2], ref[2], strict=True):
        assert_close(g / gr.abs().max(), gr / gr.abs().max(), tol, "encoder grads")


def test_encoder_without_numba_runs_the_torch_scan(without_numba, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EARMARK_SCAN", raising=False)
    fallback = _encoder_run(torch.float32, True)
    scan_module.numba_kernel.cache_clear()
    monkeypatch.setattr(scan_module, "_import_numba_kernel", lambda: K)
    assert resolve_impl(torch.zeros(1, 1, 1), torch.zeros(1, 1)) == "numba"
    kernel = _encoder_run(torch.float32, True)
    assert_close(fallback[0], kernel[0], 1e-4, "fallback encoder")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.delenv("EARMARK_DATA", raising=False)
    assert K.cache_dir() == Path.home() / ".cache" / "earmark" / "numba"
    monkeypatch.setenv("EARMARK_DATA", str(tmp_path))
    assert K.cache_dir() == tmp_path / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert K.cache_dir() == tmp_path / "mine"
    assert K._writable(tmp_path / "mine")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not K._writable(blocker / "numba")


def test_unwritable_cache_dir_still_runs(tmp_path: Path) -> None:
    """A cache directory that cannot be created (here: below a regular file, which stops root
    too): the kernel compiles in memory and runs."""
    blocker = tmp_path / "data"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["EARMARK_DATA"] = str(blocker)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = (
        "import torch\n"
        "from earmark.encoders import scan_numba as K\n"
        "assert not K.CACHE, K.cache_dir()\n"
        "u = torch.randn(1, 1, 5, 3)\n"
        "y, _ = K.forward(u, torch.rand_like(u), -torch.rand(1, 3, 2), torch.randn(1, 1, 5, 2),\n"
        "                 torch.randn(1, 1, 5, 2), torch.ones(1, 3), (False,))\n"
        "assert torch.isfinite(y).all()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_kernel_launches_from_several_python_threads_do_not_abort_the_process():
    """Numba's workqueue layer kills the process on concurrent launches (the service classifies on
    several threads); launches are serialised. Run in a subprocess: the failure mode is an abort."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import threading, torch
        from earmark.encoders import scan_numba as k
        g = torch.Generator().manual_seed(0)
        u = torch.randn(2, 2, 65, 70, generator=g)
        dl = torch.rand(2, 2, 65, 70, generator=g)
        A = -torch.rand(2, 70, 4, generator=g)
        B, C = torch.randn(2, 2, 65, 4, generator=g), torch.randn(2, 2, 65, 4, generator=g)
        D = torch.randn(2, 70, generator=g)
        want = k.forward(u, dl, A, B, C, D, (False, True))[0]
        bad = []
        def work():
            for _ in range(20):
                if not torch.equal(k.forward(u, dl, A, B, C, D, (False, True))[0], want):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("ok", len(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ok 0"
