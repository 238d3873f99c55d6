"""The Audio Spectrogram Transformer baseline: shapes, token layout, bidirectionality, registry, init."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from earmark.encoders import ENCODER_CONFIGS, ENCODERS, EncoderConfig, build_encoder
from earmark.encoders.ast import ASTEncoder, num_heads

torch.set_num_threads(1)

SMALL = EncoderConfig(arch="ast", embed_dim=32, depth=2, max_frames=64)


def small(seed: int = 0, **changes) -> ASTEncoder:
    torch.manual_seed(seed)
    return build_encoder(dataclasses.replace(SMALL, **changes)).eval()


def fbank(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, frames, generator=torch.Generator().manual_seed(seed))


def test_registered_and_built_from_config() -> None:
    assert ENCODERS.get("ast") is ASTEncoder
    model = build_encoder(EncoderConfig(arch="ast", embed_dim=64, depth=1))
    assert isinstance(model, ASTEncoder)
    assert model.layers[0].attn.heads == 1 and num_heads(192) == 3 and num_heads(16) == 1
    assert ENCODER_CONFIGS.get("ast-fast").embed_dim == ENCODER_CONFIGS.get("fast").embed_dim
    assert ENCODER_CONFIGS.get("ast-fast").depth == ENCODER_CONFIGS.get("fast").depth


@pytest.mark.parametrize("frames", [1, 7, 16, 17, 50, 64, 150])
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
    if frames > SMALL.max_frames:
        assert t > model.max_time_patches


def test_class_token_in_the_middle_and_pooled() -> None:
    model = small()
    x = fbank(2, 40)  # 8 x 3 = 24 patches -> class token at 12
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        out = model(x)
    handle.remove()
    c = ASTEncoder.cls_index(24)
    assert c == 12
    expected = (model.cls_token + model.cls_pos)[0, 0].expand(2, -1)
    assert torch.allclose(seen[0][:, c], expected)
    assert not torch.allclose(seen[0][:, c - 1], expected)
    assert torch.equal(out, tokens[:, c])
    mean_model = small(pool="mean")
    with torch.no_grad():
        t2 = mean_model.forward_tokens(x)
        assert torch.allclose(mean_model(x), torch.cat([t2[:, :c], t2[:, c + 1 :]], 1).mean(1), atol=1e-6)


def test_tiny_preset_parameter_count() -> None:
    torch.manual_seed(0)
    model = build_encoder("ast-tiny")
    n = sum(p.numel() for p in model.parameters())
    assert 5.3e6 < n < 5.8e6, n  # DeiT/AST-tiny ~5.5-5.7M (no classifier head)


def test_gradients_reach_every_parameter() -> None:
    model = small().train()
    model(fbank(2, 70)).square().sum().backward()  # 5 time patches > 4: interpolated positions
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    no_decay = model.no_weight_decay_params()
    assert {"pos_embed", "cls_token", "cls_pos", "norm_f.weight", "layers.0.attn.qkv.bias"} <= no_decay
    assert "layers.0.attn.qkv.weight" not in no_decay


def test_attention_is_bidirectional() -> None:
    """Changing the last patch (after the class token) changes the class embedding, and the first
    patch changes the last token: information flows both ways."""
    model = small()
    x = fbank(1, 48)  # 8 x 3 patches, cls at 12
    late = x.clone()
    late[:, -16:, -16:] += 1.0  # highest band, last time step = last token
    early = x.clone()
    early[:, :16, :16] += 1.0  # first token
    with torch.no_grad():
        base, t_late, t_early = (model.forward_tokens(v) for v in (x, late, early))
    assert not torch.allclose(base[:, 12], t_late[:, 12])
    assert not torch.allclose(base[:, -1], t_early[:, -1])
    assert not torch.allclose(base[:, 0], t_late[:, 0])


def test_deterministic_for_a_seed() -> None:
    x = fbank(2, 33)
    with torch.no_grad():
        a, b, c = small(seed=3)(x), small(seed=3)(x), small(seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_explicit_attention_equals_sdpa() -> None:
    """attention="explicit" (the n x n matrix materialised, as SSAST) computes the same function
    with the same weights as the default scaled_dot_product_attention."""
    torch.manual_seed(0)
    cfg = EncoderConfig(arch="ast", embed_dim=64, depth=2, max_frames=64)
    sdpa = build_encoder(cfg).eval()
    explicit = build_encoder(dataclasses.replace(cfg, attention="explicit")).eval()
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 128, 48)
    with torch.no_grad():
        assert torch.allclose(sdpa(x), explicit(x), atol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        EncoderConfig(arch="ast", attention="flash")
