"""Loading published SSAST / SSAMBA / AuM checkpoints (earmark/encoders/convert.py).

The checkpoints are written here, small, by helpers that perform the inverse mapping from a random earmark
encoder into each published layout (key names and shapes as in the public code). Loading them back must give
the source encoder's outputs; for SSAST and AuM the loaded encoder must also equal a plain re-implementation
of the published forward pass run on the published tensors, which checks the map against the published
semantics (class-token placement, position entries, scan directions) rather than against itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from earmark.checkpoint import CheckpointError
from earmark.encoders import EncoderConfig, build_encoder
from earmark.encoders.convert import FORMATS, detect_format, load_published

torch.set_num_threads(1)

MAMBA = EncoderConfig(embed_dim=32, depth=2, d_state=4, max_frames=64)  # 8 x 4 patches + class token
AST = EncoderConfig(arch="ast", embed_dim=128, depth=2, max_frames=64)  # 2 heads of 64


def source(config: EncoderConfig, seed: int = 0) -> torch.nn.Module:
    """A random encoder; every parameter perturbed so that swapped or transposed tensors show."""
    torch.manual_seed(seed)
    enc = build_encoder(config).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def fbank(frames: int = 64, batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 128, frames, generator=torch.Generator().manual_seed(seed))


# ---- inverse maps: earmark encoder -> published state dicts --------------------------------------------


def to_ssast(enc, *, dist: bool = False, module: bool = True, pretrain: bool = True) -> dict[str, Tensor]:
    """SSAST ASTModel (DataParallel): timm DeiT under ``module.v``, heads beside it."""
    sd, d = enc.state_dict(), enc.config.embed_dim
    v = {
        "patch_embed.proj.weight": sd["patch_embed.weight"],
        "patch_embed.proj.bias": sd["patch_embed.bias"],
        "cls_token": sd["cls_token"],
        "norm.weight": sd["norm_f.weight"],
        "norm.bias": sd["norm_f.bias"],
        "head.weight": torch.randn(10, d),
        "head.bias": torch.randn(10),
    }
    lead = [sd["cls_pos"]]
    if dist:
        v["dist_token"] = torch.randn(1, 1, d)
        lead.append(torch.randn(1, 1, d))
        v["head_dist.weight"], v["head_dist.bias"] = torch.randn(10, d), torch.randn(10)
    v["pos_embed"] = torch.cat([*lead, sd["pos_embed"].flatten(1, 2)], dim=1)  # (1, c + F*T, D), band-major
    for i in range(enc.config.depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2"):
            for p in ("weight", "bias"):
                v[f"blocks.{i}.{name}.{p}"] = sd[f"layers.{i}.{name}.{p}"]
        for fc, j in (("fc1", 0), ("fc2", 2)):
            for p in ("weight", "bias"):
                v[f"blocks.{i}.mlp.{fc}.{p}"] = sd[f"layers.{i}.mlp.{j}.{p}"]
    outer = {f"v.{k}": t for k, t in v.items()}
    if pretrain:
        outer |= {
            "cpredlayer.0.weight": torch.randn(d, d),
            "cpredlayer.2.weight": torch.randn(256, d),
            "gpredlayer.0.weight": torch.randn(d, d),
            "mask_embed": torch.randn(1, 1, d),
            "p_input_fdim": torch.tensor(128),
            "p_input_tdim": torch.tensor(enc.config.max_frames),
        }
    else:
        outer |= {"mlp_head.0.weight": torch.ones(d), "mlp_head.1.weight": torch.randn(5, d)}
    return {("module." if module else "") + k: t.clone() for k, t in outer.items()}


def to_mamba(enc, fmt: str, *, module: bool = True) -> dict[str, Tensor]:
    """SSAMBA (Vision Mamba under ``module.v``, SSAST heads) or AuM (``module.`` only): bimamba v2 layers."""
    sd, d, cfg = enc.state_dict(), enc.config.embed_dim, enc.config
    v = {
        "patch_embed.proj.weight": sd["patch_embed.weight"],
        "patch_embed.proj.bias": sd["patch_embed.bias"],
        "cls_token": sd["cls_token"],
        "norm_f.weight": sd["norm_f.weight"],
        "head.weight": torch.randn(7, d),
        "head.bias": torch.randn(7),
    }
    pos = torch.cat([sd["cls_pos"], sd["pos_embed"].flatten(1, 2)], dim=1)  # class entry first in both
    v["pos_embed.pos_embed" if fmt == "aum" else "pos_embed"] = pos
    for i in range(cfg.depth):
        a, b = f"layers.{i}.mixer.", f"layers.{i}."
        v[b + "norm.weight"] = sd[b + "norm.weight"]
        v[a + "in_proj.weight"] = sd[a + "in_proj.weight"]
        v[a + "out_proj.weight"] = sd[a + "out_proj.weight"]
        branches = [("", "fwd", "A_log", "D")] + ([("_b", "bwd", "A_b_log", "D_b")] if cfg.bidirectional else [])
        for suffix, ours, a_name, d_name in branches:
            for p in ("weight", "bias"):
                v[f"{a}conv1d{suffix}.{p}"] = sd[f"{a}{ours}.conv1d.{p}"]
                v[f"{a}dt_proj{suffix}.{p}"] = sd[f"{a}{ours}.dt_proj.{p}"]
            v[f"{a}x_proj{suffix}.weight"] = sd[f"{a}{ours}.x_proj.weight"]
            v[a + a_name] = sd[f"{a}{ours}.A_log"]
            v[a + d_name] = sd[f"{a}{ours}.D"]
    if fmt == "ssamba":
        outer = {f"v.{k}": t for k, t in v.items()}
        outer |= {"cpredlayer.0.weight": torch.randn(d, d), "mask_embed": torch.randn(1, 1, d)}
        outer |= {"p_input_fdim": torch.tensor(128), "p_input_tdim": torch.tensor(cfg.max_frames)}
    else:
        outer = v
    return {("module." if module else "") + k: t.clone() for k, t in outer.items()}


def write(tmp_path, tensors: dict[str, Tensor], name: str = "ckpt.pth"):
    path = tmp_path / name
    torch.save(tensors, path)
    return path


def stripped(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, t in tensors.items():
        k = k.removeprefix("module.")
        out[k.removeprefix("v.")] = t
    return out


# ---- plain re-implementations of the published forward passes ------------------------------------------


def ssast_forward(sd: dict[str, Tensor], x: Tensor, depth: int) -> Tensor:
    """SSAST finetuningcls before mlp_head (one class token): timm DeiT blocks, class token first."""
    t = F.conv2d(x[:, None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    b, d = t.shape[0], t.shape[2]
    heads = d // 64
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1) + sd["pos_embed"]
    n = t.shape[1]
    for i in range(depth):

        def p(name: str, i: int = i) -> Tensor:
            return sd[f"blocks.{i}.{name}"]

        h = F.layer_norm(t, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        t = t + F.linear((att @ v).transpose(1, 2).reshape(b, n, d), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(t, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias")
        )
        t = t + h
    return F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def rms(x: Tensor, w: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def mamba_branch(p, x: Tensor, z: Tensor, s: str, a_name: str, d_name: str) -> Tensor:
    """mamba_inner_fn_no_out_proj: causal depthwise conv, SiLU, selective scan (sequential), gate."""
    length, e = x.shape[1], x.shape[2]
    w = p(f"conv1d{s}.weight")
    xc = F.conv1d(x.transpose(1, 2), w, p(f"conv1d{s}.bias"), padding=w.shape[-1] - 1, groups=e)[..., :length]
    xc = F.silu(xc).transpose(1, 2)
    rank = p(f"dt_proj{s}.weight").shape[1]
    n = (p(f"x_proj{s}.weight").shape[0] - rank) // 2
    dt, bm, cm = F.linear(xc, p(f"x_proj{s}.weight")).split([rank, n, n], dim=-1)
    delta = F.softplus(F.linear(dt, p(f"dt_proj{s}.weight"), p(f"dt_proj{s}.bias")))
    a = -torch.exp(p(a_name))
    h = torch.zeros(x.shape[0], e, n)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * a) * h + delta[:, t, :, None] * bm[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * cm[:, t, None, :]).sum(-1) + p(d_name) * xc[:, t])
    return torch.stack(ys, dim=1) * F.silu(z)


def aum_forward(sd: dict[str, Tensor], x: Tensor, depth: int) -> Tensor:
    """AuM forward_features: class token at N // 2, FlexiPosEmbed prefix handling, v2 blocks (if_devide_out)."""
    t = F.conv2d(x[:, None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    t = t.flatten(2).transpose(1, 2)
    b, n = t.shape[0], t.shape[1]
    c = n // 2
    t = torch.cat([t[:, :c], sd["cls_token"].expand(b, -1, -1), t[:, c:]], dim=1)
    t = torch.cat([t[:, c : c + 1], t[:, :c], t[:, c + 1 :]], dim=1)  # insert_to_prefix
    t = t + sd["pos_embed.pos_embed"]
    t = torch.cat([t[:, 1 : c + 1], t[:, :1], t[:, c + 1 :]], dim=1)  # insert_from_prefix
    for i in range(depth):

        def p(name: str, i: int = i) -> Tensor:
            return sd[f"layers.{i}.mixer.{name}"]

        xz = F.linear(rms(t, sd[f"layers.{i}.norm.weight"]), p("in_proj.weight"))
        xs, zs = xz.chunk(2, dim=-1)
        y = mamba_branch(p, xs, zs, "", "A_log", "D")
        y_b = mamba_branch(p, xs.flip(1), zs.flip(1), "_b", "A_b_log", "D_b").flip(1)
        t = t + F.linear((y + y_b) / 2, p("out_proj.weight"))
    return rms(t, sd["norm_f.weight"])[:, c]


# ---- tests --------------------------------------------------------------------------------------------


def inverse(fmt: str, enc, module: bool) -> dict[str, Tensor]:
    return to_ssast(enc, module=module) if fmt == "ssast" else to_mamba(enc, fmt, module=module)


@pytest.mark.parametrize("module", [True, False])
@pytest.mark.parametrize("fmt", ["ssast", "ssamba", "aum"])
def test_round_trip_reproduces_the_source_encoder(tmp_path, fmt: str, module: bool) -> None:
    config = AST if fmt == "ssast" else MAMBA
    src = source(config)
    path = write(tmp_path, inverse(fmt, src, module))
    enc, report = load_published(path)
    assert report.format == fmt and detect_format(stripped(torch.load(path))) == fmt
    assert report.config == config  # every architecture field read back from the shapes
    for name, t in src.state_dict().items():
        assert torch.equal(enc.state_dict()[name], t), name
    with torch.no_grad():
        for frames in (64, 40):  # the full grid, and a shorter clip (first time columns)
            torch.testing.assert_close(enc(fbank(frames)), src(fbank(frames)), rtol=0, atol=1e-6)
    first = next(iter(inverse(fmt, src, module)))
    assert first.startswith("module." if module else ("v." if fmt != "aum" else "patch"))


def test_ssast_matches_the_published_forward(tmp_path) -> None:
    src = source(AST, seed=3)
    tensors = to_ssast(src, pretrain=False)
    enc, report = load_published(write(tmp_path, tensors))
    x = fbank(64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ssast_forward(stripped(tensors), x, AST.depth), rtol=1e-4, atol=1e-5)
    assert any("class token moved" in n for n in report.notes)


def test_aum_matches_the_published_forward(tmp_path) -> None:
    src = source(MAMBA, seed=4)
    tensors = to_mamba(src, "aum")
    enc, _ = load_published(write(tmp_path, tensors))
    x = fbank(64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), aum_forward(stripped(tensors), x, MAMBA.depth), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        {"bidirectional": False},
        {"dt_rank": 5, "d_conv": 3, "expand": 1, "d_state": 6},
        {"embed_dim": 48, "depth": 3, "max_frames": 32},
    ],
)
def test_config_inferred_from_shapes(tmp_path, changes: dict) -> None:
    config = dataclasses.replace(MAMBA, **changes)
    src = source(config)
    enc, report = load_published(write(tmp_path, to_mamba(src, "aum")), format="aum")
    assert report.config == config
    assert enc.config.bidirectional == config.bidirectional
    with torch.no_grad():
        torch.testing.assert_close(enc(fbank(48)), src(fbank(48)), rtol=0, atol=1e-6)


def test_ignored_heads_are_reported_with_reasons(tmp_path) -> None:
    src = source(AST)
    _, report = load_published(write(tmp_path, to_ssast(src, pretrain=True)))
    for key in (
        "module.cpredlayer.0.weight",
        "module.gpredlayer.0.weight",
        "module.mask_embed",
        "module.p_input_tdim",
        "module.v.head.weight",
    ):
        assert key in report.ignored and report.ignored[key], key
    assert "pretraining head" in report.ignored["module.cpredlayer.0.weight"]
    _, report = load_published(write(tmp_path, to_ssast(src, pretrain=False), "ft.pth"))
    assert "classifier head" in report.ignored["module.mlp_head.1.weight"]
    mapped = dict(report.mapped)
    assert mapped["module.v.blocks.1.mlp.fc2.weight"] == "layers.1.mlp.2.weight"
    assert mapped["module.v.norm.bias"] == "norm_f.bias"
    _, report = load_published(write(tmp_path, to_mamba(source(MAMBA), "aum"), "aum.pth"))
    assert set(report.ignored) == {"module.head.weight", "module.head.bias"}
    assert dict(report.mapped)["module.layers.0.mixer.A_b_log"] == "layers.0.mixer.bwd.A_log"
    assert "aum" in report.summary() and "ignored module.head.weight" in report.summary()


def test_ssast_distillation_token_dropped_and_noted(tmp_path) -> None:
    src = source(AST)
    enc, report = load_published(write(tmp_path, to_ssast(src, dist=True)))
    assert "distillation token" in report.ignored["module.v.dist_token"]
    assert any("distillation token" in n for n in report.notes)
    with torch.no_grad():  # the class entry is entry 0, the patch grid starts after both tokens
        torch.testing.assert_close(enc(fbank(64)), src(fbank(64)), rtol=0, atol=1e-6)


def test_ssamba_caveat_is_reported(tmp_path) -> None:
    _, report = load_published(write(tmp_path, to_mamba(source(MAMBA), "ssamba")))
    assert any("index 0" in n for n in report.notes)


def test_wrong_shape_names_file_key_and_both_shapes(tmp_path) -> None:
    tensors = to_mamba(source(MAMBA), "aum")
    tensors["module.layers.1.mixer.x_proj.weight"] = torch.randn(9, 64)  # layer 0 says (2 + 2 * 4, 64)
    path = write(tmp_path, tensors)
    with pytest.raises(CheckpointError) as err:
        load_published(path)
    msg = str(err.value)
    assert str(path) in msg and "module.layers.1.mixer.x_proj.weight" in msg
    assert "(9, 64)" in msg and "(10, 64)" in msg
    # a given config whose width differs: named at the first tensor that disagrees
    wide = dataclasses.replace(AST, embed_dim=64)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight.*\(128, 1, 16, 16\).*\(64, 1, 16, 16\)"):
        load_published(write(tmp_path, to_ssast(source(AST)), "ast.pth"), config=wide)


def test_ssast_frame_checkpoint_refused(tmp_path) -> None:
    d = 16
    tensors = {
        "module.v.patch_embed.proj.weight": torch.randn(d, 1, 128, 2),  # fshape=128, tshape=2
        "module.v.patch_embed.proj.bias": torch.randn(d),
        "module.v.cls_token": torch.randn(1, 1, d),
        "module.v.dist_token": torch.randn(1, 1, d),
        "module.v.pos_embed": torch.randn(1, 2 + 512, d),
        "module.v.blocks.0.attn.qkv.weight": torch.randn(3 * d, d),
        "module.p_input_fdim": torch.tensor(128),
        "module.p_input_tdim": torch.tensor(1024),
    }
    with pytest.raises(CheckpointError, match=r"module\.v\.patch_embed\.proj\.weight: a frame-based checkpoint"):
        load_published(write(tmp_path, tensors))


def test_overlapping_strides_refused(tmp_path) -> None:
    tensors = to_ssast(source(AST))
    tensors["module.v.pos_embed"] = torch.randn(1, 1 + 12 * 5, 128)  # fstride=10 grid, p_input says 8 x 4
    with pytest.raises(CheckpointError, match="overlapping strides"):
        load_published(write(tmp_path, tensors))
    del tensors["module.p_input_fdim"], tensors["module.p_input_tdim"]
    tensors["module.v.pos_embed"] = torch.randn(1, 1 + 12 * 101, 128)  # 1212 is not 8 x T
    with pytest.raises(CheckpointError, match="not a multiple of 8 frequency patches"):
        load_published(write(tmp_path, tensors))


def test_unidirectional_checkpoint_into_bidirectional_encoder_refused(tmp_path) -> None:
    path = write(tmp_path, to_mamba(source(dataclasses.replace(MAMBA, bidirectional=False)), "ssamba"))
    with pytest.raises(CheckpointError, match=r"module\.v\.layers\.0\.mixer\.conv1d_b\.weight: missing.*unidirect"):
        load_published(path, config=MAMBA)
    enc, report = load_published(path)  # inferred: loads as a unidirectional encoder
    assert enc.config.bidirectional is False and enc.layers[0].mixer.bwd is None
    path = write(tmp_path, to_mamba(source(MAMBA), "ssamba"), "bi.pth")
    with pytest.raises(CheckpointError, match="backward branch would be lost"):
        load_published(path, config=dataclasses.replace(MAMBA, bidirectional=False))


def test_position_grid_cut_or_interpolated_along_time(tmp_path) -> None:
    src = source(MAMBA)
    path = write(tmp_path, to_mamba(src, "aum"))
    grid = src.pos_embed.detach()  # (1, 8, 4, D)
    short, report = load_published(path, config=dataclasses.replace(MAMBA, max_frames=32))
    assert torch.equal(short.pos_embed.detach(), grid[:, :, :2])
    assert any("first 2 of 4" in n for n in report.notes)
    with torch.no_grad():  # clips that fit keep their positions exactly
        torch.testing.assert_close(short(fbank(32)), src(fbank(32)), rtol=0, atol=1e-6)
    long, report = load_published(path, config=dataclasses.replace(MAMBA, max_frames=160, pool="mean"))
    want = F.interpolate(grid.permute(0, 3, 1, 2), size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(long.pos_embed.detach(), want.permute(0, 2, 3, 1))
    assert any("interpolated" in n for n in report.notes) and long.config.pool == "mean"


def test_safetensors_and_wrapped_state_dicts(tmp_path) -> None:
    src = source(MAMBA)
    tensors = to_mamba(src, "aum", module=False)
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "aum.safetensors")
    enc, _ = load_published(tmp_path / "aum.safetensors")
    wrapped = write(tmp_path, {"model": tensors, "epoch": 3, "optimizer": {"lr": 0.1}}, "wrapped.pth")
    enc2, _ = load_published(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(enc(fbank()), src(fbank()), rtol=0, atol=1e-6)
        torch.testing.assert_close(enc2(fbank()), src(fbank()), rtol=0, atol=1e-6)


class NotATensor:
    pass


def test_files_that_are_not_checkpoints(tmp_path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("just some text\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a PyTorch checkpoint"):
        load_published(text)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 32)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_published(bad)
    obj = write(tmp_path, {"x": NotATensor()}, "pickled.pth")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*never an unrestricted pickle"):
        load_published(obj)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_published(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_published(write(tmp_path, {"epoch": 3}, "meta.pth"))
    with pytest.raises(CheckpointError, match="not an SSAST / SSAMBA / AuM checkpoint.*earmark checkpoint"):
        load_published(write(tmp_path, {"encoder.cls_token": torch.zeros(1)}, "earmark.pth"))


def test_registry_and_explicit_format(tmp_path) -> None:
    assert FORMATS.names() == ["aum", "ssamba", "ssast"]
    path = write(tmp_path, to_mamba(source(MAMBA), "aum"))
    with pytest.raises(CheckpointError, match="not a ssast checkpoint"):
        load_published(path, format="ssast")
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'vit'"):
        load_published(path, format="vit")
    with pytest.raises(CheckpointError, match="holds an 'mamba' encoder"):
        load_published(path, config=dataclasses.replace(MAMBA, arch="ast"))


def test_unsupported_variants_refused_and_layer_scale_folded(tmp_path) -> None:
    src = source(MAMBA)
    base = to_mamba(src, "aum")
    cases = {
        "module.rope.freqs_cos": (torch.randn(32, 16), "rotary position embeddings"),
        "module.layers.0.norm.bias": (torch.randn(32), "LayerNorm"),
        "module.layers.1.mixer.out_proj.bias": (torch.randn(32), "projection biases"),
        "module.extra.weight": (torch.randn(3), "no counterpart"),
    }
    for key, (tensor, why) in cases.items():
        with pytest.raises(CheckpointError, match=why):
            load_published(write(tmp_path, base | {key: tensor}, "variant.pth"))
    v1 = {k: t for k, t in base.items() if "_b." not in k and not k.endswith("D_b")}  # keeps A_b_log only
    with pytest.raises(CheckpointError, match="bimamba v1"):
        load_published(write(tmp_path, v1, "v1.pth"))
    gamma = torch.rand(32) + 0.5
    enc, report = load_published(write(tmp_path, base | {"module.layers.1.mixer.gamma": gamma}, "gamma.pth"))
    want = src.layers[1].mixer.out_proj.weight.detach() * gamma[:, None]
    torch.testing.assert_close(enc.layers[1].mixer.out_proj.weight.detach(), want)
    assert ("module.layers.1.mixer.gamma", "layers.1.mixer.out_proj.weight") in report.mapped


def test_pipeline_starts_base_training_from_a_published_file(tmp_path) -> None:
    from earmark.training.base import load_pretrained_encoder

    enc = source(EncoderConfig(embed_dim=32, depth=2, max_frames=64))
    path = write(tmp_path, inverse("aum", enc, True))
    loaded = load_pretrained_encoder(path)
    x = fbank()
    torch.testing.assert_close(loaded.eval()(x), enc.eval()(x))
