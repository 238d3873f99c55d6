"""The fast selective scans (chunked, sequential) against the plain reference loop.

Tolerances: float64 agrees to ~1e-12 relative, asserted at 1e-10. float32 is asserted at 1e-5
*relative to the largest magnitude* of the compared tensor (measured: <= ~3e-7). An absolute 1e-5
is reachable only while values are O(1): with large decays and inputs, outputs reach ~500 and the
float32 reference itself is then ~1e-4 away from float64.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from earmark.encoders.scan import (
    SCAN_IMPLS,
    _mamba_ssm_kernel,
    block_steps,
    choose_impl,
    chunk_length,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
    selective_scan_sequential,
    uses_own_scan,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (impl, kwargs) pairs covering the chunked scan at several chunk lengths and the sequential scan
# with several block sizes (block=1: one step at a time; large: one block for everything).
FAST = [
    ("chunked", {"chunk": 0}),
    ("chunked", {"chunk": 1}),
    ("chunked", {"chunk": 8}),
    ("chunked", {"chunk": 16}),
    ("sequential", {"block": 1}),
    ("sequential", {"block": 3}),
    ("sequential", {"block": 0}),
]


def _run(impl: str, kw: dict, *args: torch.Tensor) -> torch.Tensor:
    if impl == "chunked":
        return selective_scan_chunked(*args, **kw)
    return selective_scan_sequential(*args, **kw)


def make_inputs(
    batch: int, length: int, e: int, n: int, dtype: torch.dtype, seed: int = 0, big_decay: bool = False
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, e, generator=g, dtype=dtype)
    if big_decay:  # per-step decay delta * |A| of 2.5..600: a chunk sums to far more than 88
        delta = 5 + 20 * torch.rand(batch, length, e, generator=g, dtype=dtype)
    else:
        delta = F.softplus(torch.randn(batch, length, e, generator=g, dtype=dtype) - 2)
    scale = 0.5 + torch.rand(e, 1, generator=g, dtype=dtype)
    A = -torch.arange(1, n + 1, dtype=dtype).repeat(e, 1) * scale
    B = torch.randn(batch, length, n, generator=g, dtype=dtype)
    C = torch.randn(batch, length, n, generator=g, dtype=dtype)
    D = torch.randn(e, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x {scale:.3g}"


def check_against_reference(impl: str, kw: dict, inputs: list[torch.Tensor], tol: float) -> None:
    y_ref = selective_scan_reference(*inputs)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=y_ref.dtype)
    g_ref = torch.autograd.grad(y_ref, inputs, gy)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    y = _run(impl, kw, *fresh)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, tol, f"{impl}{kw} y")
    grads = torch.autograd.grad(y, fresh, gy)
    for name, g, gr in zip(["u", "delta", "A", "B", "C", "D"], grads, g_ref, strict=True):
        assert g.shape == gr.shape, name
        assert_close(g, gr, tol, f"{impl}{kw} d{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [1, 7, 33, 257])
@pytest.mark.parametrize(("impl", "kw"), FAST)
def test_matches_reference_forward_and_gradients(impl: str, kw: dict, length: int, dtype: torch.dtype) -> None:
    check_against_reference(impl, kw, make_inputs(2, length, 6, 4, dtype, seed=length), TOL[dtype])


@pytest.mark.parametrize("length", [7, 8, 9, 15, 16, 17, 24, 31, 32, 33])
@pytest.mark.parametrize(("impl", "kw"), [("chunked", {"chunk": 8}), ("sequential", {"block": 8})])
def test_lengths_at_chunk_boundaries(impl: str, kw: dict, length: int) -> None:
    check_against_reference(impl, kw, make_inputs(2, length, 3, 4, torch.float64, seed=length), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("impl", "kw"), FAST)
def test_large_decays_stay_finite_and_agree(impl: str, kw: dict, dtype: torch.dtype) -> None:
    inputs = make_inputs(2, 40, 5, 16, dtype, big_decay=True)
    dA = inputs[1].detach()[..., None] * inputs[2].detach()
    assert dA[:, :8].sum(1).min() < -1000  # far past exp() overflow (~88 in float32) in one chunk
    check_against_reference(impl, kw, inputs, TOL[dtype])


@pytest.mark.parametrize("length", [1, 9, 33])
@pytest.mark.parametrize(("impl", "kw"), FAST)
def test_reverse_equals_scanning_the_flipped_sequence(impl: str, kw: dict, length: int) -> None:
    inputs = make_inputs(2, length, 4, 3, torch.float64, seed=length)
    u, delta, A, B, C, D = inputs
    y_ref = selective_scan_reference(u.flip(1), delta.flip(1), A, B.flip(1), C.flip(1), D).flip(1)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2), dtype=y_ref.dtype)
    g_ref = torch.autograd.grad(y_ref, inputs, gy)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    y = _run(impl, {**kw, "reverse": True}, *fresh)
    assert_close(y, y_ref, 1e-10, "reverse y")
    for g, gr in zip(torch.autograd.grad(y, fresh, gy), g_ref, strict=True):
        assert_close(g, gr, 1e-10, "reverse grads")
    assert_close(selective_scan_reference(*inputs, reverse=True), y_ref, 1e-12, "reference reverse")


def test_realistic_model_sizes_float32() -> None:
    """Encoder-like shapes (E=64 channels, N=16, 97 tokens) through both fast paths."""
    inputs = make_inputs(3, 97, 64, 16, torch.float32, seed=3)
    for impl, kw in (("chunked", {"chunk": 0}), ("sequential", {"block": 0})):
        check_against_reference(impl, kw, inputs, 1e-5)


@pytest.mark.parametrize(
    ("impl", "kw"), [("chunked", {"chunk": 2}), ("chunked", {"chunk": 4}), ("sequential", {"block": 2})]
)
def test_gradcheck_float64(impl: str, kw: dict) -> None:
    inputs = make_inputs(2, 5, 3, 2, torch.float64, seed=7)
    assert torch.autograd.gradcheck(lambda *xs: _run(impl, kw, *xs), inputs, eps=1e-6, atol=1e-8)


def test_partial_gradients_and_no_skip() -> None:
    u, delta, A, B, C, _ = make_inputs(2, 11, 3, 4, torch.float64)
    A_ = A.detach()  # A without grad: only the needed gradients are computed
    for impl in ("chunked", "sequential"):
        y = selective_scan(u, delta, A_, B, C, None, impl=impl)
        y_ref = selective_scan_reference(u, delta, A_, B, C, None)
        assert_close(y, y_ref, 1e-10, f"{impl} without D")
        g = torch.autograd.grad(y.sum(), [u, C])
        g_ref = torch.autograd.grad(y_ref.sum(), [u, C])
        for a, b in zip(g, g_ref, strict=True):
            assert_close(a, b, 1e-10, f"{impl} partial grads")


def test_no_grad_and_low_precision_inputs() -> None:
    u, delta, A, B, C, D = (t.detach() for t in make_inputs(2, 20, 4, 4, torch.float32))
    with torch.no_grad():
        y32 = selective_scan(u, delta, A, B, C, D)
        y16 = selective_scan(u.bfloat16(), delta, A, B.bfloat16(), C.bfloat16(), D)
    assert y16.dtype == torch.bfloat16  # computed in float32, returned in u's dtype
    assert (y16.float() - y32).abs().max() < 0.05 * y32.abs().max()


def test_dispatch_and_validation() -> None:
    assert set(SCAN_IMPLS) == {"auto", "numba", "sequential", "chunked", "reference", "cuda"}
    assert choose_impl(2, 32, 4, 1000) == "chunked"  # tiny steps: per-op overhead dominates
    assert choose_impl(2, 32, 4, 8) == "sequential"  # too short for chunks to pay off
    assert choose_impl(2, 384, 16, 4097) == "sequential"
    assert chunk_length(257) == 17 and chunk_length(1) == 1 and chunk_length(10, 64) == 10
    assert block_steps(1, 1, 1) >= 1 and block_steps(10**6, 10**3, 16) == 1
    inputs = make_inputs(2, 9, 3, 4, torch.float64)
    y_ref = selective_scan(*inputs, impl="reference")
    for impl in ("auto", "chunked", "sequential"):
        assert_close(selective_scan(*inputs, impl=impl), y_ref, 1e-10, impl)
    with pytest.raises(ValueError, match="unknown selective scan impl"):
        selective_scan(*inputs, impl="magic")
    u, delta, A, B, C, D = inputs
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, delta, A[:, :2].T, B, C, D)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(u, delta, A, B[:, :3], C, D)
    grouped = [t[None].expand(2, *t.shape) for t in inputs]
    with pytest.raises(ValueError, match="one flag per group"):
        selective_scan(*grouped, reverse=(True, False, True))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(*grouped[:2], A, *grouped[3:])


def make_grouped(groups: int, batch: int, length: int, e: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    per_group = [make_inputs(batch, length, e, n, dtype, seed=10 + i) for i in range(groups)]
    return [torch.stack([p[j].detach() for p in per_group]).requires_grad_() for j in range(6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("impl", "kw"), [("chunked", {"chunk": 0}), ("chunked", {"chunk": 4}), *FAST[4:]])
def test_grouped_equals_one_scan_per_group(impl: str, kw: dict, dtype: torch.dtype) -> None:
    """Two directions in one pass (G=2, the second reversed) = two separate reference scans,
    forward and every gradient (each group has its own A and D)."""
    inputs = make_grouped(2, 3, 19, 5, 4, dtype)
    reverse = (False, True)
    y_ref = torch.stack([selective_scan_reference(*(t[g] for t in inputs), reverse=reverse[g]) for g in range(2)])
    assert_close(selective_scan_reference(*inputs, reverse=reverse), y_ref, TOL[dtype], "grouped reference")
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    g_ref = torch.autograd.grad(y_ref, inputs, gy)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    y = _run(impl, dict(kw, reverse=reverse), *fresh)
    assert y.shape == (2, 3, 19, 5)
    assert_close(y, y_ref, TOL[dtype], f"grouped {impl}{kw} y")
    for name, g, gr in zip(["u", "delta", "A", "B", "C", "D"], torch.autograd.grad(y, fresh, gy), g_ref, strict=True):
        assert g.shape == gr.shape, name
        assert_close(g, gr, TOL[dtype], f"grouped {impl}{kw} d{name}")


@pytest.mark.parametrize(("impl", "kw"), [("chunked", {"chunk": 2}), ("sequential", {"block": 2})])
def test_grouped_gradcheck_float64(impl: str, kw: dict) -> None:
    inputs = make_grouped(2, 2, 5, 3, 2, torch.float64)
    run = lambda *xs: _run(impl, dict(kw, reverse=(True, False)), *xs)  # noqa: E731
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-8)


@pytest.fixture(autouse=True)
def _forget_kernel_lookup():
    """The mamba-ssm lookup is cached; tests below change what is importable."""
    _mamba_ssm_kernel.cache_clear()
    yield
    _mamba_ssm_kernel.cache_clear()


def _install_fake_mamba_ssm(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """A stand-in for mamba-ssm's ``selective_scan_fn`` with its documented layout and semantics
    (u, delta (b, E, L); A (E, N); B, C (b, N, L); D (E,); out (b, E, L)), computed on the CPU, so
    the adapter's layout conversions and direction handling are checked without a GPU."""

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        b, e, length = u.shape
        assert delta.shape == u.shape and A.shape[0] == e and B.shape == C.shape == (b, A.shape[1], length)
        assert A.dtype == torch.float32 and delta.dtype == B.dtype == u.dtype
        calls.append(tuple(u.shape))
        dA = torch.exp(delta.double()[..., None] * A.double()[:, None, :])  # (b, E, L, N)
        dBu = (delta * u).double()[..., None] * B.double().transpose(1, 2)[:, None]
        x = u.new_zeros(b, e, A.shape[1], dtype=torch.float64)
        ys = []
        for i in range(length):
            x = dA[:, :, i] * x + dBu[:, :, i]
            ys.append((x * C.double()[:, None, :, i]).sum(-1))
        y = torch.stack(ys, -1)
        return (y if D is None else y + u.double() * D.double()[:, None]).to(u.dtype)

    module = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    module.selective_scan_fn = selective_scan_fn
    monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops", types.ModuleType("mamba_ssm.ops"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", module)


def test_mamba_ssm_adapter_layout_and_directions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _install_fake_mamba_ssm(monkeypatch, calls)
    inputs = make_grouped(2, 3, 11, 5, 4, torch.float32)
    reverse = (False, True)
    y_ref = selective_scan_reference(*inputs, reverse=reverse)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    g_ref = torch.autograd.grad(y_ref, inputs, gy)
    fresh = [t.detach().clone().requires_grad_() for t in inputs]
    y = selective_scan(*fresh, impl="cuda", reverse=reverse)
    assert calls == [(3, 5, 11), (3, 5, 11)]  # one kernel call per group, in the kernel's layout
    assert_close(y, y_ref, TOL[torch.float32], "mamba-ssm adapter y")
    for name, g, gr in zip(["u", "delta", "A", "B", "C", "D"], torch.autograd.grad(y, fresh, gy), g_ref, strict=True):
        assert_close(g, gr, TOL[torch.float32], f"mamba-ssm adapter d{name}")
    ungrouped = [t[1].detach() for t in inputs]
    assert_close(selective_scan(*ungrouped, impl="cuda", reverse=True), y_ref[1], TOL[torch.float32], "ungrouped")


def test_auto_uses_the_kernel_only_for_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _install_fake_mamba_ssm(monkeypatch, calls)
    u, delta, A, B, C, D = (t.detach() for t in make_inputs(2, 9, 4, 3, torch.float32))
    assert uses_own_scan(u, "auto") and not uses_own_scan(u, "cuda") and not uses_own_scan(u, "reference")
    selective_scan(u, delta, A, B, C, D)
    assert calls == []  # CPU tensors: our own scan, even with mamba-ssm importable


def test_cuda_impl_without_mamba_ssm_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # import fails
    u, delta, A, B, C, D = (t.detach() for t in make_inputs(1, 4, 3, 2, torch.float32))
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        selective_scan(u, delta, A, B, C, D, impl="cuda")
    assert uses_own_scan(u, "auto")
