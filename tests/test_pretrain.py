import json

import pytest
import torch

from earmark.checkpoint import CheckpointError, load_tensors
from earmark.encoders import EncoderConfig, build_encoder
from earmark.training.pretrain import (
    MaskedPatchModel,
    PretrainConfig,
    cluster_mask,
    encoder_from_checkpoint,
    masked_patch_tokens,
    patchify,
    pretrain,
    pretrain_loss,
)

torch.set_num_threads(1)

TINY = EncoderConfig(embed_dim=32, depth=2)


def structured(n: int, frames: int = 128, seed: int = 0) -> torch.Tensor:
    """Plane waves with a per-clip amplitude and phase plus noise: masked patches are predictable from
    their position and the visible context, and differ in direction (so dot-product NCE can pick them)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.arange(128)[:, None].float()
    t = torch.arange(frames)[None].float()
    amp = 0.5 + torch.rand(n, 1, 1, generator=g)
    phase = torch.rand(n, 1, 1, generator=g) * 0.5
    return amp * torch.sin(2 * torch.pi * (m / 23 + t / 37) + phase) + 0.1 * torch.randn(n, 128, frames, generator=g)


def test_cluster_mask_exact_count_clustered_and_seeded():
    f, t, k = 8, 16, 20
    a = cluster_mask(16, f, t, k, torch.Generator().manual_seed(3))
    b = cluster_mask(16, f, t, k, torch.Generator().manual_seed(3))
    c = cluster_mask(16, f, t, k, torch.Generator().manual_seed(4))
    assert a.shape == (16, k) and torch.equal(a, b) and not torch.equal(a, c)
    with_neighbour = 0
    for row in a:
        assert len(set(row.tolist())) == k and row.min() >= 0 and row.max() < f * t
        inner = torch.zeros(f * t, dtype=torch.bool)
        inner[row] = True
        grid = torch.nn.functional.pad(inner.view(f, t), (1, 1, 1, 1))
        nb = grid[:-2, 1:-1] | grid[2:, 1:-1] | grid[1:-1, :-2] | grid[1:-1, 2:]
        with_neighbour += int((nb.reshape(-1)[row]).sum())
    # random masks of 20 / 128 leave about half the masked patches without a masked 4-neighbour
    assert with_neighbour / (16 * k) > 0.9
    with pytest.raises(ValueError):
        cluster_mask(1, f, t, f * t + 1, torch.Generator())


def test_mask_fraction_and_full_grid():
    assert PretrainConfig().mask_count(512) == 384
    assert PretrainConfig(mask_patches=400).mask_count(512) == 400
    full = cluster_mask(2, 3, 4, 12, torch.Generator().manual_seed(0))
    assert torch.equal(full, torch.arange(12).repeat(2, 1))


def test_patchify_matches_the_patch_embedding_and_masked_content_is_hidden():
    enc = build_encoder(TINY)
    x = torch.randn(2, 128, 100)  # 100 frames: padded to 7 time patches like the encoder does
    p = patchify(x, 16)
    assert p.shape == (2, 56, 256)
    ref = enc.patch_embed(torch.nn.functional.pad(x, (0, 12))[:, None]).permute(0, 2, 3, 1).flatten(1, 2)
    assert torch.allclose(p @ enc.patch_embed.weight.flatten(1).T + enc.patch_embed.bias, ref, atol=1e-5)
    model = MaskedPatchModel(enc).eval()
    mask = torch.tensor([[0, 1, 7, 8], [20, 21, 27, 28]])
    with torch.no_grad():
        h = masked_patch_tokens(enc, x, mask, model.mask_embed)
        y = x.clone()
        y[0, :16, :16] += 5.0  # patch 0 of clip 0: masked -> no effect
        assert torch.equal(masked_patch_tokens(enc, y, mask, model.mask_embed), h)
        y[0, :16, 32:48] += 5.0  # patch 2 of clip 0: visible -> changes the states
        assert not torch.allclose(masked_patch_tokens(enc, y, mask, model.mask_embed)[0], h[0])
    assert h.shape == (2, 56, 32)


def test_loss_is_finite_and_perfect_predictions_score_well():
    target = torch.randn(2, 6, 16)
    loss, stats = pretrain_loss(torch.randn(2, 6, 16), torch.randn(2, 6, 16), target, 10.0)
    assert torch.isfinite(loss) and stats["mse"] > 0.5
    good, gs = pretrain_loss(target * 10, target, target, 10.0)
    assert gs["accuracy"] == 1.0 and gs["mse"] == 0.0 and good < loss


def test_pretraining_lowers_the_loss_and_beats_chance():
    enc = build_encoder(TINY)
    cfg = PretrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=5)
    h = pretrain(enc, structured(8), cfg, progress=False)
    assert len(h.loss) == 30 and all(torch.isfinite(torch.tensor(h.loss)))
    first, last = sum(h.loss[:3]) / 3, sum(h.loss[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    chance = 1 / cfg.mask_count(64)
    assert sum(h.accuracy[-3:]) / 3 > 4 * chance
    assert not enc.training


def test_resume_matches_an_uninterrupted_run(tmp_path):
    feats = structured(6, frames=64)
    cfg = PretrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2)
    torch.manual_seed(0)
    straight = build_encoder(TINY)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    pretrain(straight, feats, cfg, progress=False)

    path = tmp_path / "pre.safetensors"
    first = build_encoder(TINY)
    first.load_state_dict(init)
    h1 = pretrain(first, feats, cfg, checkpoint_path=path, progress=False, stop_at=3)
    assert (h1.start_step, h1.end_step) == (0, 3)
    resumed = build_encoder(TINY)  # fresh weights: everything must come from the checkpoint
    h2 = pretrain(resumed, feats, cfg, checkpoint_path=path, progress=False)
    assert (h2.start_step, h2.end_step, len(h2.loss)) == (3, 6, 3)
    for name, value in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], value, atol=1e-6, rtol=0), name
    assert not torch.equal(straight.state_dict()["patch_embed.weight"], init["patch_embed.weight"])

    # the file is safetensors with the JSON description in its header, not a pickle
    raw = path.read_bytes()
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = json.loads(header["__metadata__"]["earmark"])
    assert meta["kind"] == "pretrain" and meta["step"] == 6
    tensors, _, _ = load_tensors(path, kind="pretrain")
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in tensors)
    assert "model.mask_embed" in tensors and "model.disc_head.0.weight" in tensors
    # finished: a further call does nothing; the encoder alone can be read back
    assert len(pretrain(resumed, feats, cfg, checkpoint_path=path, progress=False).loss) == 0
    enc = encoder_from_checkpoint(path)
    assert torch.equal(enc.state_dict()["patch_embed.weight"], resumed.state_dict()["patch_embed.weight"])
    with pytest.raises(CheckpointError):
        pretrain(build_encoder(EncoderConfig(embed_dim=16, depth=2)), feats, cfg, checkpoint_path=path, progress=False)


def test_ast_encoder_takes_a_step():
    enc = build_encoder(EncoderConfig(arch="ast", embed_dim=32, depth=2))
    before = enc.patch_embed.weight.clone()
    h = pretrain(enc, structured(4, frames=64), PretrainConfig(steps=2, batch_size=4, warmup_steps=1), progress=False)
    assert len(h.loss) == 2 and all(v == v and v < 1e6 for v in h.loss)
    assert not torch.equal(enc.patch_embed.weight, before)


def test_rejects_encoders_without_patch_tokens():
    with pytest.raises(TypeError):
        MaskedPatchModel(torch.nn.Linear(4, 4))
