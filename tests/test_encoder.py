"""The bidirectional Mamba encoder: shapes, token layout, direction handling, init and bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from earmark.encoders import ENCODER_CONFIGS, ENCODERS, EncoderConfig, MambaEncoder, build_encoder

SMALL = EncoderConfig(embed_dim=32, depth=2, d_state=4, max_frames=64)


def small(seed: int = 0, **changes) -> MambaEncoder:
    torch.manual_seed(seed)
    return build_encoder(dataclasses.replace(SMALL, **changes)).eval()


def fbank(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, frames, generator=torch.Generator().manual_seed(seed))


def layer_input(model: MambaEncoder, x: torch.Tensor) -> torch.Tensor:
    """The token sequence entering the first block."""
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model.forward_tokens(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("frames", [1, 7, 15, 16, 17, 50, 64, 100, 150])
def test_output_shapes_for_any_length(frames: int) -> None:
    model = small()
    x = fbank(3, frames)
    with torch.no_grad():
        out = model(x)
        tokens = model.forward_tokens(x)
    f, t = model.token_grid(frames)
    assert (f, t) == (8, max(1, -(-frames // 16)))
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert tokens.shape == (3, f * t + 1, 32)
    if frames > SMALL.max_frames:  # position embeddings interpolated along time
        assert t > model.max_time_patches


def test_class_token_sits_in_the_middle_and_is_pooled() -> None:
    model = small()
    x = fbank(2, 40)  # 8 x 3 = 24 patches -> class token at index 12
    h = layer_input(model, x)
    n = h.shape[1] - 1
    c = MambaEncoder.cls_index(n)
    assert (n, c) == (24, 12)
    expected = (model.cls_token + model.cls_pos)[0, 0]
    assert torch.allclose(h[:, c], expected.expand(2, -1))
    assert not torch.allclose(h[:, c - 1], expected.expand(2, -1))
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_tokens(x)[:, c])


def test_tokens_are_frequency_major() -> None:
    model = small()
    x = torch.zeros(1, 128, 48)  # 8 bands x 3 time steps
    base = layer_input(model, x)
    band, step = 5, 1
    x[0, band * 16 : (band + 1) * 16, step * 16 : (step + 1) * 16] = 1.0
    changed = (layer_input(model, x) - base).abs().sum(-1)[0].nonzero().flatten().tolist()
    k = band * 3 + step  # frequency-major patch index
    c = MambaEncoder.cls_index(24)
    assert changed == [k + 1 if k >= c else k]


def test_mean_pool_averages_patch_tokens() -> None:
    model = small(pool="mean")
    x = fbank(2, 33)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        c = MambaEncoder.cls_index(tokens.shape[1] - 1)
        patches = torch.cat([tokens[:, :c], tokens[:, c + 1 :]], 1)
        assert torch.allclose(model(x), patches.mean(1), atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("k", [2, 4])
def test_depthwise_conv_matches_conv1d_and_gradcheck(length: int, k: int) -> None:
    """The fused conv of both directions equals nn.Conv1d's causal conv (the forward direction) and
    the flipped-input conv flipped back (the backward one), for sequences shorter and longer than
    the kernel; its hand-written backward passes gradcheck in float64."""
    from earmark.encoders.mamba import _conv

    torch.manual_seed(k * 10 + length)
    e = 5
    convs = [torch.nn.Conv1d(e, e, k, groups=e, padding=k - 1).double() for _ in range(2)]
    x = torch.randn(3, length, e, dtype=torch.float64)

    def causal(conv: torch.nn.Conv1d, seq: torch.Tensor) -> torch.Tensor:
        return conv(seq.transpose(1, 2))[..., :length].transpose(1, 2)

    got = _conv(x, [c.weight for c in convs], [c.bias for c in convs], (False, True))
    assert torch.allclose(got[0], causal(convs[0], x), atol=1e-12)
    assert torch.allclose(got[1], causal(convs[1], x.flip(1)).flip(1), atol=1e-12)
    w = [c.weight.detach().clone().requires_grad_() for c in convs]
    b = [c.bias.detach().clone().requires_grad_() for c in convs]
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *p: _conv(x, p[:2], p[2:], (False, True)), (xg, *w, *b))


def test_backward_direction_is_used() -> None:
    model = small()
    x = fbank(2, 48)
    with torch.no_grad():
        before = model(x)
        model.layers[0].mixer.bwd.x_proj.weight.mul_(1.5)
        after = model(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_later_tokens_reach_earlier_ones_only_when_bidirectional(bidirectional: bool) -> None:
    model = small(bidirectional=bidirectional)
    assert (model.layers[0].mixer.bwd is not None) == bidirectional
    x = fbank(1, 48)
    y = x.clone()
    y[:, -16:, -16:] += 1.0  # the last patch: highest band, last time step -> last token
    with torch.no_grad():
        a, b = model.forward_tokens(x), model.forward_tokens(y)
    earlier = (a[:, :-1] - b[:, :-1]).abs().max().item()
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4
    if bidirectional:
        assert earlier > 1e-4
    else:
        assert earlier == 0.0  # causal: nothing flows backwards in time


def test_unidirectional_differs_and_has_fewer_parameters() -> None:
    bi, uni = small(), small(bidirectional=False)
    x = fbank(2, 40)
    with torch.no_grad():
        assert not torch.allclose(bi(x), uni(x))
    assert sum(p.numel() for p in uni.parameters()) < sum(p.numel() for p in bi.parameters())


def test_deterministic_given_seed() -> None:
    x = fbank(2, 37)
    with torch.no_grad():
        a, b, c = small(seed=3)(x), small(seed=3)(x), small(seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_scan_implementations_agree_inside_the_model() -> None:
    x = fbank(2, 70)
    with torch.no_grad():
        outs = {impl: small(scan_impl=impl)(x) for impl in ("reference", "chunked", "sequential", "auto")}
    for impl in ("chunked", "sequential", "auto"):
        assert torch.allclose(outs[impl], outs["reference"], atol=1e-5, rtol=1e-5), impl


def test_tiny_has_about_seven_million_parameters() -> None:
    model = build_encoder("tiny")
    count = sum(p.numel() for p in model.parameters())
    print(f"tiny: {count / 1e6:.2f}M parameters")
    assert 5e6 < count < 9e6
    assert model.embed_dim == 192 and len(model.layers) == 24


def test_gradients_reach_every_parameter() -> None:
    model = small().train()
    x = fbank(2, SMALL.max_frames)  # uses every position embedding column
    model(x).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_no_weight_decay_names() -> None:
    model = small()
    names = model.no_weight_decay_params()
    params = dict(model.named_parameters())
    assert names <= set(params)
    for name in params:
        if name.endswith(("A_log", ".D")) or "norm" in name or name.endswith("bias"):
            assert name in names, name
    assert {"pos_embed", "cls_token", "cls_pos"} <= names
    assert sum(n.endswith("A_log") for n in names) == 2 * SMALL.depth  # both directions
    assert sum(n.endswith(".D") for n in names) == 2 * SMALL.depth
    assert params["layers.0.mixer.fwd.A_log"]._no_weight_decay
    assert "layers.0.mixer.in_proj.weight" not in names and "patch_embed.weight" not in names


def test_initialization() -> None:
    model = small()
    mixer = model.layers[0].mixer
    for branch in (mixer.fwd, mixer.bwd):
        dt = F.softplus(branch.dt_proj.bias.detach())
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        assert branch.A_log.dtype == torch.float32
        assert torch.allclose(-torch.exp(branch.A_log[0]), -torch.arange(1.0, SMALL.d_state + 1))
        assert torch.equal(branch.D.detach(), torch.ones_like(branch.D))
    pos = model.pos_embed.detach()
    assert 0.01 < pos.std() < 0.02 and pos.abs().max() <= 0.04 + 1e-6  # trunc-normal(0.02), cut at 2 std
    torch.manual_seed(0)
    deep = build_encoder(dataclasses.replace(SMALL, depth=8))
    ratio = (model.layers[0].mixer.out_proj.weight.std() / deep.layers[0].mixer.out_proj.weight.std()).item()
    assert ratio == pytest.approx(2.0, rel=0.1)  # out_proj / sqrt(depth)


def test_config_round_trip_and_registries() -> None:
    assert {"tiny", "small", "fast"} <= set(ENCODER_CONFIGS.names())
    assert ENCODERS.get("mamba") is MambaEncoder
    cfg = ENCODER_CONFIGS.get("fast")
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert EncoderConfig.from_dict({"embed_dim": 64}).embed_dim == 64
    with pytest.raises(ValueError, match="unknown EncoderConfig keys"):
        EncoderConfig.from_dict({"embed_dims": 64})
    with pytest.raises(ValueError):
        EncoderConfig(pool="median")  # max is valid since the pooling options
    with pytest.raises(KeyError):
        build_encoder("huge")
    with pytest.raises(ValueError, match="expected"):
        small()(torch.zeros(1, 64, 20))


def _training_grads(model: MambaEncoder, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    model.train()
    x = x.clone().requires_grad_()
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("scan_impl", ["sequential", "chunked"])
def test_recomputing_branch_equals_plain_autograd(bidirectional: bool, scan_impl: str) -> None:
    """recompute=True (the fused branch: saves only its input, recomputes conv and projections in
    backward) gives the output and every gradient of plain autograd (recompute=False), in float64."""
    x = fbank(2, 37).double()
    runs = {}
    for recompute in (True, False):
        model = small(seed=5, recompute=recompute, bidirectional=bidirectional, scan_impl=scan_impl).double()
        runs[recompute] = _training_grads(model, x)
    (out_f, grads_f, gx_f), (out_p, grads_p, gx_p) = runs[True], runs[False]
    assert torch.allclose(out_f, out_p, atol=1e-12)
    assert torch.allclose(gx_f, gx_p, atol=1e-10) and gx_f.abs().sum() > 0
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        assert torch.allclose(grads_f[name], grads_p[name], atol=1e-10), name
        if "A_log" in name or "conv1d" in name or "x_proj" in name:  # the recomputed branch's own
            assert grads_f[name].abs().sum() > 0, name


@pytest.mark.parametrize("bidirectional", [True, False])
def test_inference_path_equals_the_grad_path(bidirectional: bool) -> None:
    """Without grad the mixer works in place (silu, gate, the scan's output); the result must be
    the one the autograd path gives, and the input must be left untouched."""
    model = small(seed=3, bidirectional=bidirectional, d_state=8)
    x = fbank(2, 37)
    kept = x.clone()
    with torch.no_grad():
        fast = model(x)
    slow = model(x)
    assert slow.requires_grad
    assert torch.allclose(fast, slow.detach(), atol=1e-6)
    assert torch.equal(x, kept)


def _saved_bytes(model: MambaEncoder, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after a training forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_recompute_keeps_less_for_backward() -> None:
    """The point of the fused branch: the conv/projection/scan inputs are not kept (measured on this
    config: half the bytes of plain autograd)."""
    x = fbank(2, 160)
    kept = {r: _saved_bytes(small(recompute=r, d_state=16), x) for r in (True, False)}
    assert kept[True] < 0.6 * kept[False], kept


def test_recomputing_branch_under_autocast() -> None:
    """Mixed precision (bfloat16 autocast on the CPU): the fused branch's output and gradients agree
    with plain autograd's to bfloat16 precision. (The front casts explicitly, so this holds with or
    without the forward's autocast state restored in backward; the branch restores it anyway.)"""
    x = fbank(2, 37)
    runs = {}
    for recompute in (True, False):
        model = small(seed=6, recompute=recompute)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[recompute] = _training_grads(model, x)
    (out_f, grads_f, gx_f), (out_p, grads_p, gx_p) = runs[True], runs[False]
    assert torch.allclose(out_f, out_p, atol=1e-6)
    assert torch.allclose(gx_f, gx_p, rtol=1e-3, atol=1e-6)
    for name in grads_p:
        scale = grads_p[name].abs().max().clamp(min=1e-6)
        assert (grads_f[name] - grads_p[name]).abs().max() <= 1e-2 * scale, name
