"""Pooling over tokens and layers: widths, the old embedding kept when the old option is chosen, cache keys."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from earmark.encoders import EncoderConfig, MambaEncoder, build_encoder, resolve_config
from earmark.encoders.cache import embedder_fingerprint
from earmark.encoders.config import ENCODER_CONFIGS, POOLS
from earmark.encoders.embedder import AudioEmbedder

SMALL = EncoderConfig(embed_dim=16, depth=3, d_state=4, expand=1, max_frames=64, scan_impl="sequential")


def small(seed: int = 0, arch: str = "mamba", **changes) -> MambaEncoder:
    torch.manual_seed(seed)
    return build_encoder(dataclasses.replace(SMALL, arch=arch, **changes)).eval()


def fbank(batch: int = 3, frames: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 128, frames, generator=torch.Generator().manual_seed(seed))


def old_embedding(model: MambaEncoder, x: torch.Tensor) -> torch.Tensor:
    """The encoder's forward before pooling options existed (class token or mean of the patch tokens)."""
    tokens = model.forward_tokens(x)
    c = model.cls_index(tokens.shape[1] - 1)
    if model.config.pool == "cls":
        return tokens[:, c]
    return (tokens.sum(1) - tokens[:, c]) / (tokens.shape[1] - 1)


def patches(tokens: torch.Tensor) -> torch.Tensor:
    c = MambaEncoder.cls_index(tokens.shape[1] - 1)
    return torch.cat([tokens[:, :c], tokens[:, c + 1 :]], 1)


@pytest.mark.parametrize("arch", ["mamba", "ast"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize(("layers", "merge"), [(1, "concat"), (2, "concat"), (3, "mean")])
def test_widths_follow_the_pooling(arch: str, pool: str, layers: int, merge: str) -> None:
    model = small(arch=arch, pool=pool, pool_layers=layers, layer_merge=merge)
    parts = 2 if pool == "mean+max" else 1
    width = 16 * parts * (layers if merge == "concat" else 1)
    assert model.config.out_dim == model.embed_dim == width
    with torch.no_grad():
        out = model(fbank())
    assert out.shape == (3, width) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["mamba", "ast"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_the_old_options_give_the_old_embedding_bit_for_bit(arch: str, pool: str) -> None:
    model = small(arch=arch, pool=pool)
    x = fbank()
    with torch.no_grad():
        assert torch.equal(model(x), old_embedding(model, x))
        # the same with the explicit defaults, and through the general path (mean over one layer)
        merged = small(arch=arch, pool=pool, pool_layers=1, layer_merge="mean")
        assert torch.equal(merged(x), old_embedding(model, x))


def test_new_pooling_options_reuse_the_weights_of_the_old_encoder() -> None:
    """Every non-attention option has the same parameters: a trained mean-pooled encoder can be pooled anew."""
    base = small(pool="mean")
    x = fbank()
    with torch.no_grad():
        mean = base(x)
        tokens = base.hidden_states(x, 2)
        for pool in ("max", "mean+max"):
            other = small(seed=1, pool=pool, pool_layers=2)
            other.load_state_dict(base.state_dict())
            out = other(x)
            pooled = [patches(t).amax(1) if pool == "max" else torch.cat([patches(t).mean(1), patches(t).amax(1)], 1)
                      for t in tokens]
            assert torch.allclose(out, torch.cat(pooled, 1), atol=1e-6)
            last = out[:, -pooled[-1].shape[1]:]
            if pool == "mean+max":
                assert torch.allclose(last[:, :16], mean, atol=1e-6)  # the last layer's mean part is the old one


def test_hidden_states_end_with_forward_tokens_and_layers_differ() -> None:
    model = small(pool="mean")
    x = fbank()
    with torch.no_grad():
        states = model.hidden_states(x, 3)
        assert len(states) == 3 and torch.equal(states[-1], model.forward_tokens(x))
        assert not torch.allclose(states[0], states[-1])
        mean3 = small(pool="mean", pool_layers=3, layer_merge="mean")(x)
    per_layer = torch.stack([patches(s).mean(1) for s in states])
    assert torch.allclose(mean3, per_layer.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="last must be in 1..3"):
        model.hidden_states(x, 4)


def test_attention_pool_starts_as_the_mean_and_learns() -> None:
    mean, attn = small(pool="mean"), small(pool="attention")
    x = fbank()
    with torch.no_grad():
        assert torch.allclose(attn(x), mean(x), atol=1e-6)  # zero scores: uniform weights
        attn.pool_attn[0].weight.normal_()
        assert not torch.allclose(attn(x), mean(x), atol=1e-4)
    assert {n for n in attn.state_dict()} - {n for n in mean.state_dict()} == {"pool_attn.0.weight",
                                                                               "pool_attn.0.bias"}


def test_rms_norm_makes_every_part_unit_rms() -> None:
    model = small(pool="mean+max", pool_layers=2, pool_norm="rms")
    with torch.no_grad():
        out = model(fbank())
    for part in out.split(16, dim=1):
        assert torch.allclose(part.pow(2).mean(1), torch.ones(3), atol=1e-4)


def test_config_checks_round_trip_and_presets() -> None:
    for bad in ({"pool": "median"}, {"layer_merge": "sum"}, {"pool_norm": "l1"}, {"pool_layers": 0},
                {"pool_layers": 4}):
        with pytest.raises(ValueError):
            dataclasses.replace(SMALL, **bad)
    # old checkpoints' dicts (no pooling fields) load, and a default config writes none of them
    assert "pool_layers" not in SMALL.to_dict() and "pool_norm" not in SMALL.to_dict()
    assert EncoderConfig.from_dict(SMALL.to_dict()) == SMALL
    rich = dataclasses.replace(SMALL, pool="mean+max", pool_layers=2, pool_norm="rms")
    assert rich.to_dict()["pool_layers"] == 2 and EncoderConfig.from_dict(rich.to_dict()) == rich
    fast = ENCODER_CONFIGS.get("fast")
    assert resolve_config({"preset": "fast", "pool": "max"}) == dataclasses.replace(fast, pool="max")
    assert resolve_config({"preset": "fast"}) == fast
    with pytest.raises(ValueError, match="unknown EncoderConfig keys"):
        resolve_config({"preset": "fast", "pool_size": 2})


def test_embedding_cache_key_changes_with_the_pooling_only() -> None:
    a = AudioEmbedder(dataclasses.replace(SMALL, pool="mean"))
    b = AudioEmbedder(dataclasses.replace(SMALL, pool="mean"))
    b.load_state_dict(a.state_dict())
    assert embedder_fingerprint(a) == embedder_fingerprint(b)
    tried = ({"pool": "max"}, {"pool_layers": 2}, {"pool_norm": "rms"}, {"pool_layers": 2, "layer_merge": "mean"})
    for changes in tried:
        c = AudioEmbedder(dataclasses.replace(SMALL, **{"pool": "mean", **changes}))
        c.load_state_dict(a.state_dict())
        assert embedder_fingerprint(c) != embedder_fingerprint(a), changes


def test_embedder_round_trip_with_attention_pooling(tmp_path) -> None:
    emb = AudioEmbedder(dataclasses.replace(SMALL, pool="attention", pool_layers=2))
    with torch.no_grad():
        for lin in emb.encoder.pool_attn:
            lin.weight.normal_()
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    digest = emb.save(tmp_path / "e.safetensors")
    back = AudioEmbedder.load(tmp_path / "e.safetensors")
    assert back.digest == digest and back.embed_dim == 32
    assert torch.equal(back.embed(wave), emb.embed(wave))
