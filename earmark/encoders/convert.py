"""Load published SSAST / SSAMBA / AuM checkpoints into earmark's encoders (local files, nothing downloaded).

Why: the published self-supervised encoders were trained on AudioSet-scale data that earmark cannot
pretrain on; their weights fit earmark's encoders where the shapes allow, so they can start from them.

``load_published(path)`` reads a local ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``, never an
unrestricted pickle) or ``.safetensors`` file, strips DataParallel prefixes (``module.``, then ``v.``,
the wrapper attribute of SSAST / SSAMBA), recognises the format from its keys, reads the architecture
from the tensor shapes, maps the keys below and loads with strict checks: every encoder tensor must
come from the file with the same shape, and every file key must be either mapped or known to be safe to
ignore (classification and pretraining heads). Anything else raises ``CheckpointError`` naming the
file, the key and both shapes.

SSAST (github YuanGongND/ssast, ``ASTModel``; timm DeiT under ``module.v``), arch ``ast``:

============================================  ==========================  ============================
published key (after ``module.v.``)           earmark key                 rule
============================================  ==========================  ============================
``patch_embed.proj.weight`` (D, 1, 16, 16)    ``patch_embed.weight``      as is; (D, 1, 128, 2) frame
                                                                          patches are refused
``patch_embed.proj.bias``                     ``patch_embed.bias``        as is
``cls_token`` (1, 1, D)                       ``cls_token``               as is
``pos_embed`` (1, c + F*T, D) entry 0         ``cls_pos`` (1, 1, D)       class-token position
``pos_embed`` entries c..                     ``pos_embed`` (1, F, T, D)  reshape (see below)
``dist_token``, ``pos_embed`` entry 1         (dropped, reported)         only when c = 2 (DeiT
                                                                          distilled: tiny/small/base)
``blocks.{i}.norm1.{weight,bias}``            ``layers.{i}.norm1.*``      as is
``blocks.{i}.attn.qkv.{weight,bias}``         ``layers.{i}.attn.qkv.*``   as is: both pack rows
                                                                          [q; k; v], heads contiguous
``blocks.{i}.attn.proj.{weight,bias}``        ``layers.{i}.attn.proj.*``  as is
``blocks.{i}.norm2.{weight,bias}``            ``layers.{i}.norm2.*``      as is
``blocks.{i}.mlp.fc1.{weight,bias}``          ``layers.{i}.mlp.0.*``      as is
``blocks.{i}.mlp.fc2.{weight,bias}``          ``layers.{i}.mlp.2.*``      as is
``norm.{weight,bias}``                        ``norm_f.*``                as is
``head*``, ``mlp_head.*``, ``cpredlayer.*``,  (ignored, reported)         classifier / pretraining
``gpredlayer.*``, ``mask_embed``                                          heads
``p_input_fdim``, ``p_input_tdim``            (ignored, reported)         pretraining input size: used
                                                                          to check the patch grid
============================================  ==========================  ============================

SSAMBA (github SiavashShams/ssamba, ``AMBAModel``; Vision Mamba under ``module.v``) and AuM
(github kaistmm/Audio-Mamba-AuM, ``AudioMamba``, ``module.`` only), arch ``mamba``:

=============================================  ====================================  =============================
published key                                  earmark key                           rule
=============================================  ====================================  =============================
``patch_embed.proj.{weight,bias}``             ``patch_embed.*``                     as is (16 x 16 patches only)
``cls_token`` (1, 1, D)                        ``cls_token``                         as is
SSAMBA ``pos_embed`` / AuM                     ``cls_pos`` (entry 0),                (1, 1 + F*T, D): the class
``pos_embed.pos_embed``                        ``pos_embed`` (entries 1..)           entry first in both files
``layers.{i}.norm.weight`` (RMSNorm)           ``layers.{i}.norm.weight``            as is
``layers.{i}.mixer.in_proj.weight``            ``layers.{i}.mixer.in_proj.weight``   as is: (2E, D), shared by
                                                                                     both directions (v2)
``layers.{i}.mixer.conv1d.{weight,bias}``      ``layers.{i}.mixer.fwd.conv1d.*``     as is
``layers.{i}.mixer.x_proj.weight``             ``layers.{i}.mixer.fwd.x_proj.*``     as is: rows [dt; B; C]
``layers.{i}.mixer.dt_proj.{weight,bias}``     ``layers.{i}.mixer.fwd.dt_proj.*``    as is
``layers.{i}.mixer.A_log``, ``.D``             ``layers.{i}.mixer.fwd.A_log/D``      as is
``layers.{i}.mixer.conv1d_b.*``,               ``layers.{i}.mixer.bwd.*``            as is: the published branch
``x_proj_b``, ``dt_proj_b``, ``A_b_log``,                                            flips the sequence and runs
``D_b``                                                                              a causal conv; earmark's
                                                                                     reverse branch runs the same
                                                                                     taps anti-causally, no flips
``layers.{i}.mixer.out_proj.weight``           ``layers.{i}.mixer.out_proj.weight``  as is; times ``gamma`` per
                                                                                     row when a layer scale is
                                                                                     present (folded)
``norm_f.weight``                              ``norm_f.weight``                     as is
``head.*``, ``mlp_head.*``, ``cpredlayer.*``,  (ignored, reported)                   heads; ``p_input_*`` as SSAST
``gpredlayer.*``, ``mask_embed``
=============================================  ====================================  =============================

Position embeddings: published files hold a flattened token sequence; patch entry ``k`` is frequency
band ``k // T`` and time step ``k % T`` (Conv2d output ``(D, F, T)`` flattened), the same frequency-major
order as earmark, so ``pos[:, c:].reshape(1, F, T, D)`` is earmark's grid. ``F = n_mels / 16`` (8 for the
published 128 mel bins); ``T`` follows from the entry count (checked against ``p_input_tdim`` where the
file has it; a count that does not fit non-overlapping 16 x 16 patches means overlapping strides and is
refused). A grid with another number of time columns than ``config.max_frames / patch`` is cut to its
first columns (shorter target: clips that fit keep exactly the positions they were trained with) or
interpolated bilinearly along time (longer target, the operation the encoder itself applies to long
inputs). The class token's own entry becomes ``cls_pos``; earmark adds it to ``cls_token`` and inserts
the sum at index ``n // 2``.

What the loaded encoder computes: AuM (class token in the middle, v2 mixer with ``if_devide_out=True``,
frequency-major tokens, its defaults) maps to exactly its ``forward_features``. SSAST with one class
token maps exactly too: attention is permutation-equivariant and sees positions only through
``pos_embed``, so moving the class token to the middle changes nothing; with the distillation token
(all published SSAST models) that token is dropped and the output shifts. SSAMBA runs its class token
at index 0 (and normalises twice); earmark keeps it in the middle, so SSAMBA weights are a starting
point to fine-tune, not SSAMBA's function. Attention heads are assumed to be ``embed_dim // 64`` (DeiT);
the head count is not visible in the shapes.
"""

from __future__ import annotations

import pickle
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earmark.checkpoint import CheckpointError
from earmark.encoders.config import EncoderConfig, build_encoder
from earmark.registry import Registry

__all__ = ["FORMATS", "ConversionReport", "PublishedFormat", "detect_format", "load_published", "read_state_dict"]

# Keys that hold heads or bookkeeping, not encoder weights: ignored (and reported), never an error.
_PRETRAIN_HEADS: tuple[tuple[str, str], ...] = (
    ("mlp_head.", "fine-tuning classifier head (earmark trains its own classifier)"),
    ("cpredlayer.", "SSAST discriminative (InfoNCE) pretraining head"),
    ("gpredlayer.", "SSAST generative (reconstruction) pretraining head"),
    ("mask_embed", "mask embedding, used only in masked-patch pretraining"),
    ("p_input_fdim", "pretraining input size (mel bins); used to check the patch grid"),
    ("p_input_tdim", "pretraining input size (frames); used to check the patch grid"),
)


@dataclass
class ConversionReport:
    """What ``load_published`` did: which published key went where, what it dropped and why."""

    path: str
    format: str
    config: EncoderConfig
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (published key, earmark key)
    ignored: dict[str, str] = field(default_factory=dict)  # published key -> reason
    notes: list[str] = field(default_factory=list)  # adaptations and caveats

    def summary(self) -> str:
        """A human-readable account, for logs and the CLI."""
        c = self.config
        lines = [
            f"{self.path}: {self.format} -> {c.arch} encoder (D={c.embed_dim}, depth={c.depth}, "
            f"max_frames={c.max_frames}" + (f", bidirectional={c.bidirectional})" if c.arch == "mamba" else ")"),
            f"  mapped {len(self.mapped)} tensors",
        ]
        lines += [f"  ignored {k}: {why}" for k, why in self.ignored.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class _Source:
    """A checkpoint's tensors under stripped names, tracking which were used, mapped or ignored."""

    def __init__(self, path: Path, tensors: dict[str, Tensor], original: dict[str, str]) -> None:
        self.path = path
        self.tensors = tensors
        self.original = original  # stripped name -> name in the file
        prefixes = Counter(full[: len(full) - len(short)] for short, full in original.items())
        self.prefix = prefixes.most_common(1)[0][0] if prefixes else ""  # for naming keys the file lacks
        self.used: set[str] = set()
        self.mapped: list[tuple[str, str]] = []
        self.ignored: dict[str, str] = {}
        self.notes: list[str] = []

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def name(self, key: str) -> str:
        return self.original.get(key, self.prefix + key)

    def error(self, key: str, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {self.name(key)}: {message}")

    def peek(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise self.error(key, "missing from the checkpoint")
        return self.tensors[key]

    def take(self, key: str, to: str) -> Tensor:
        """The tensor at ``key``, recorded as mapped onto earmark's ``to``."""
        t = self.peek(key)
        self.used.add(key)
        self.mapped.append((self.name(key), to))
        return t

    def ignore(self, key: str, reason: str) -> None:
        self.used.add(key)
        self.ignored[self.name(key)] = reason

    def scalar(self, key: str) -> int | None:
        t = self.tensors.get(key)
        return int(t.item()) if t is not None and t.numel() == 1 else None

    def indices(self, prefix: str) -> int:
        """Number of ``prefix.{i}.`` blocks, which must be numbered 0..n-1."""
        pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        found = {int(m.group(1)) for k in self.tensors if (m := pat.match(k))}
        if found != set(range(len(found))):
            raise CheckpointError(f"{self.path}: {prefix}.* blocks are numbered {sorted(found)}, not 0..n-1")
        return len(found)


def _shape(t: Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(t.shape if isinstance(t, Tensor) else t)


class PublishedFormat:
    """One published checkpoint layout: how to recognise it, read its architecture, map its keys.

    Subclasses set the class attributes and the block map; the shared front end (patch embedding,
    class token, flattened position embeddings) is handled here.
    """

    name = ""
    arch = "mamba"
    marker = ""  # a key (after prefix stripping) that this format has and the others lack
    pos_key = "pos_embed"
    block_prefix = "layers"
    final_map: tuple[tuple[str, str], ...] = ()
    ignored: tuple[tuple[str, str], ...] = _PRETRAIN_HEADS
    description = ""

    def detect(self, keys: Collection[str]) -> bool:
        return self.marker in keys

    def check(self, src: _Source) -> None:
        """Refuse variants whose weights exist but whose computation earmark's encoders do not have."""

    def prefix_tokens(self, src: _Source) -> int:
        """Leading non-patch entries of the flattened position embedding (the class entry is the first)."""
        return 1

    def block_map(self, config: EncoderConfig) -> tuple[tuple[str, str], ...]:
        raise NotImplementedError

    def infer_blocks(self, src: _Source, embed_dim: int) -> dict[str, object]:
        """Config fields read from the block shapes (depth, state size, ...)."""
        return {"depth": src.indices(self.block_prefix)}

    def adjust(self, src: _Source, out: dict[str, Tensor], config: EncoderConfig) -> None:
        """Fold extra published parameters into mapped ones (hook for subclasses)."""

    def notes(self, src: _Source) -> list[str]:
        return []

    # ---- shared front end -------------------------------------------------------------------------

    def patch(self, src: _Source, want: int | None) -> int:
        """Patch side from ``patch_embed.proj.weight``; refuses frame patches and other sizes."""
        key = "patch_embed.proj.weight"
        w = src.peek(key)
        if w.ndim != 4 or w.shape[1] != 1:
            raise src.error(
                key, f"expected a Conv2d weight (D, 1, kf, kt) over one spectrogram channel, got shape {_shape(w)}"
            )
        kf, kt = int(w.shape[2]), int(w.shape[3])
        if kf != kt:
            raise src.error(
                key,
                f"a frame-based checkpoint ({kf} x {kt} patches, fshape={kf}, tshape={kt}); "
                f"earmark's encoders cut square non-overlapping patches, so only patch-based "
                f"checkpoints (fshape = tshape = 16) can be loaded: shape {_shape(w)}",
            )
        if want is not None and kf != want:
            raise src.error(
                key,
                f"patch size {kf} x {kt} does not match the encoder's {want} x {want}: checkpoint "
                f"shape {_shape(w)}, encoder expects {(w.shape[0], 1, want, want)}",
            )
        return kf

    def grid(self, src: _Source, n_mels: int, patch: int) -> tuple[int, int]:
        """(frequency, time) patches of the stored position grid, checked against the pretraining input size."""
        pos = src.peek(self.pos_key)
        c = self.prefix_tokens(src)
        if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] <= c:
            raise src.error(self.pos_key, f"expected (1, {c} + patches, D), got shape {_shape(pos)}")
        num = int(pos.shape[1]) - c
        fdim, tdim = src.scalar("p_input_fdim"), src.scalar("p_input_tdim")
        if fdim is not None and tdim is not None:
            pf, pt = (fdim - patch) // patch + 1, (tdim - patch) // patch + 1
            if pf * pt != num:
                raise src.error(
                    self.pos_key,
                    f"{num} patch entries (shape {_shape(pos)}), but a {fdim} x {tdim} "
                    f"input cut into non-overlapping {patch} x {patch} patches gives "
                    f"{pf} x {pt} = {pf * pt}: the checkpoint uses overlapping strides, "
                    f"which earmark's encoders do not support",
                )
            if fdim != n_mels:
                raise src.error(
                    self.pos_key,
                    f"made for {fdim} mel bins ({pf} frequency patches); the encoder has "
                    f"n_mels={n_mels} ({n_mels // patch})",
                )
            return pf, pt
        f = n_mels // patch
        if num % f:
            raise src.error(
                self.pos_key,
                f"{num} patch entries (shape {_shape(pos)}) is not a multiple of {f} "
                f"frequency patches ({n_mels} mel bins / {patch}): overlapping strides or "
                f"another number of mel bins, which cannot be mapped",
            )
        return f, num // f

    def infer(self, src: _Source, n_mels: int | None) -> EncoderConfig:
        """The EncoderConfig that the file's shapes describe."""
        patch = self.patch(src, None)
        n_mels = n_mels or src.scalar("p_input_fdim") or EncoderConfig.n_mels
        if n_mels % patch:
            raise src.error("patch_embed.proj.weight", f"patch size {patch} does not divide {n_mels} mel bins")
        _, t = self.grid(src, n_mels, patch)
        d = int(src.peek("patch_embed.proj.weight").shape[0])
        fields = self.infer_blocks(src, d)
        return EncoderConfig(arch=self.arch, embed_dim=d, n_mels=n_mels, patch=patch, max_frames=t * patch, **fields)

    def reconcile(self, src: _Source, inferred: EncoderConfig, config: EncoderConfig) -> None:
        """Refuse a given config whose architecture differs from the file's in ways shapes cannot adapt."""
        if config.arch != self.arch:
            raise CheckpointError(
                f"{src.path}: a {self.name} checkpoint holds an {self.arch!r} encoder, "
                f"the config asks for {config.arch!r}"
            )
        self.patch(src, config.patch)
        if config.depth != inferred.depth:
            raise CheckpointError(
                f"{src.path}: {self.block_prefix}.*: the checkpoint has {inferred.depth} blocks, "
                f"the config asks for depth={config.depth}"
            )

    def convert(self, src: _Source, config: EncoderConfig) -> dict[str, Tensor]:
        """earmark state dict (position grid still at the file's own time length)."""
        out = {
            "patch_embed.weight": src.take("patch_embed.proj.weight", "patch_embed.weight"),
            "patch_embed.bias": src.take("patch_embed.proj.bias", "patch_embed.bias"),
            "cls_token": src.take("cls_token", "cls_token"),
        }
        f, t = self.grid(src, config.n_mels, config.patch)
        c = self.prefix_tokens(src)
        pos = src.peek(self.pos_key)
        src.used.add(self.pos_key)
        name = src.name(self.pos_key)
        out["cls_pos"] = pos[:, :1]
        out["pos_embed"] = pos[:, c:].reshape(1, f, t, pos.shape[-1])
        src.mapped += [(f"{name}[:, 0]", "cls_pos"), (f"{name}[:, {c}:]", "pos_embed")]
        for i in range(config.depth):
            for theirs, ours in self.block_map(config):
                key = f"{self.block_prefix}.{i}.{theirs}"
                out[f"layers.{i}.{ours}"] = src.take(key, f"layers.{i}.{ours}")
        for theirs, ours in self.final_map:
            out[ours] = src.take(theirs, ours)
        self.adjust(src, out, config)
        return out


FORMATS: Registry[PublishedFormat] = Registry("published checkpoint format")


class SSASTFormat(PublishedFormat):
    """SSAST: timm DeiT blocks; one class token, or class + distillation tokens, prepended."""

    name = "ssast"
    arch = "ast"
    marker = "blocks.0.attn.qkv.weight"
    block_prefix = "blocks"
    final_map = (("norm.weight", "norm_f.weight"), ("norm.bias", "norm_f.bias"))
    ignored = (
        *_PRETRAIN_HEADS,
        ("head_dist.", "DeiT distillation head (image classifier)"),
        ("head.", "DeiT classification head (image classifier)"),
    )
    description = "SSAST (YuanGongND/ssast ASTModel, timm DeiT under module.v)"
    _BLOCK = (
        *((f"{n}.{p}", f"{n}.{p}") for n in ("norm1", "attn.qkv", "attn.proj", "norm2") for p in ("weight", "bias")),
        *((f"mlp.{fc}.{p}", f"mlp.{i}.{p}") for fc, i in (("fc1", 0), ("fc2", 2)) for p in ("weight", "bias")),
    )

    def prefix_tokens(self, src: _Source) -> int:
        return 2 if "dist_token" in src else 1

    def block_map(self, config: EncoderConfig) -> tuple[tuple[str, str], ...]:
        return self._BLOCK

    def adjust(self, src: _Source, out: dict[str, Tensor], config: EncoderConfig) -> None:
        if "dist_token" in src:
            src.ignore("dist_token", "DeiT distillation token: earmark's encoders have one class token")

    def notes(self, src: _Source) -> list[str]:
        notes = [
            "class token moved from index 0 to the middle (n // 2): exact for attention, which sees "
            "positions only through pos_embed; attention heads assumed embed_dim // 64 (DeiT)"
        ]
        if "dist_token" in src:
            notes.append(
                f"distillation token and its position entry ({src.name(self.pos_key)}[:, 1]) dropped: "
                "SSAST runs two leading tokens, earmark one, so the output differs from SSAST's own "
                "forward; fine-tune before relying on it"
            )
        return notes


class _MambaFormat(PublishedFormat):
    """Vision-Mamba style blocks (bimamba v2): the layout shared by SSAMBA and AuM."""

    arch = "mamba"
    block_prefix = "layers"
    final_map = (("norm_f.weight", "norm_f.weight"),)
    _FORWARD = (
        ("norm.weight", "norm.weight"),
        ("mixer.in_proj.weight", "mixer.in_proj.weight"),
        ("mixer.conv1d.weight", "mixer.fwd.conv1d.weight"),
        ("mixer.conv1d.bias", "mixer.fwd.conv1d.bias"),
        ("mixer.x_proj.weight", "mixer.fwd.x_proj.weight"),
        ("mixer.dt_proj.weight", "mixer.fwd.dt_proj.weight"),
        ("mixer.dt_proj.bias", "mixer.fwd.dt_proj.bias"),
        ("mixer.A_log", "mixer.fwd.A_log"),
        ("mixer.D", "mixer.fwd.D"),
        ("mixer.out_proj.weight", "mixer.out_proj.weight"),
    )
    _BACKWARD = (
        ("mixer.conv1d_b.weight", "mixer.bwd.conv1d.weight"),
        ("mixer.conv1d_b.bias", "mixer.bwd.conv1d.bias"),
        ("mixer.x_proj_b.weight", "mixer.bwd.x_proj.weight"),
        ("mixer.dt_proj_b.weight", "mixer.bwd.dt_proj.weight"),
        ("mixer.dt_proj_b.bias", "mixer.bwd.dt_proj.bias"),
        ("mixer.A_b_log", "mixer.bwd.A_log"),
        ("mixer.D_b", "mixer.bwd.D"),
    )

    def detect(self, keys: Collection[str]) -> bool:
        return "layers.0.mixer.in_proj.weight" in keys and self.marker in keys

    def check(self, src: _Source) -> None:
        keys = list(src.tensors)
        refusals = (
            (
                lambda k: k.startswith("rope."),
                "rotary position embeddings (if_rope=True), which earmark's encoders do not have",
            ),
            (
                lambda k: k in ("cls_token_head", "cls_token_tail"),
                "two class tokens (use_double_cls_token=True); earmark's encoders have one, in the middle",
            ),
            (
                lambda k: re.fullmatch(r"layers\.\d+\.norm\.bias|norm_f\.bias", k) is not None,
                "LayerNorm blocks (rms_norm=False); earmark's Mamba blocks use RMSNorm",
            ),
            (
                lambda k: re.fullmatch(r"layers\.\d+\.mixer\.(in|out)_proj\.bias", k) is not None,
                "projection biases (bias=True); earmark's mixer projections have none",
            ),
        )
        for key in keys:
            for hit, why in refusals:
                if hit(key):
                    raise src.error(key, f"the checkpoint uses {why}")
        for i in range(src.indices("layers")):
            if f"layers.{i}.mixer.A_b_log" in src and f"layers.{i}.mixer.conv1d_b.weight" not in src:
                raise src.error(
                    f"layers.{i}.mixer.A_b_log",
                    "bimamba v1 (a second A on shared conv and projections); "
                    "earmark implements the v2 form (own conv, x_proj, "
                    "dt_proj, A, D per direction)",
                )
        if "cls_token" not in src:
            raise src.error(
                "cls_token",
                "missing: a checkpoint without a class token (if_cls_token=False) cannot "
                "be mapped onto earmark's middle class token",
            )

    def block_map(self, config: EncoderConfig) -> tuple[tuple[str, str], ...]:
        return self._FORWARD + (self._BACKWARD if config.bidirectional else ())

    def infer_blocks(self, src: _Source, embed_dim: int) -> dict[str, object]:
        depth = src.indices("layers")
        in_proj = src.peek("layers.0.mixer.in_proj.weight")
        inner = int(in_proj.shape[0]) // 2
        if in_proj.ndim != 2 or in_proj.shape[1] != embed_dim or inner % embed_dim or inner == 0:
            raise src.error(
                "layers.0.mixer.in_proj.weight",
                f"shape {_shape(in_proj)} is not (2 * expand * {embed_dim}, {embed_dim})",
            )
        rank = int(src.peek("layers.0.mixer.dt_proj.weight").shape[1])
        x_rows = int(src.peek("layers.0.mixer.x_proj.weight").shape[0])
        if (x_rows - rank) % 2 or x_rows <= rank:
            raise src.error(
                "layers.0.mixer.x_proj.weight", f"{x_rows} rows do not split into dt_rank {rank} + 2 * d_state"
            )
        return {
            "depth": depth,
            "expand": inner // embed_dim,
            "d_state": (x_rows - rank) // 2,
            "d_conv": int(src.peek("layers.0.mixer.conv1d.weight").shape[-1]),
            "dt_rank": 0 if rank == -(-embed_dim // 16) else rank,
            "bidirectional": "layers.0.mixer.conv1d_b.weight" in src,
        }

    def reconcile(self, src: _Source, inferred: EncoderConfig, config: EncoderConfig) -> None:
        super().reconcile(src, inferred, config)
        if config.bidirectional and not inferred.bidirectional:
            raise src.error(
                "layers.0.mixer.conv1d_b.weight",
                "missing: the checkpoint is unidirectional (no "
                "backward branch) but the config is bidirectional; "
                "load it with bidirectional=False (or config=None)",
            )
        if inferred.bidirectional and not config.bidirectional:
            raise src.error(
                "layers.0.mixer.conv1d_b.weight",
                "the checkpoint is bidirectional (bimamba v2) but the config is not; its backward branch would be lost",
            )

    def adjust(self, src: _Source, out: dict[str, Tensor], config: EncoderConfig) -> None:
        for i in range(config.depth):
            key = f"layers.{i}.mixer.gamma"
            if key in src:  # layer scale: out * gamma == out_proj with rows scaled by gamma
                ours = f"layers.{i}.mixer.out_proj.weight"
                gamma = src.take(key, ours)
                if gamma.shape != (out[ours].shape[0],):
                    raise src.error(key, f"shape {_shape(gamma)}, expected ({out[ours].shape[0]},)")
                out[ours] = out[ours] * gamma[:, None].to(out[ours].dtype)


class SSAMBAFormat(_MambaFormat):
    name = "ssamba"
    marker = "pos_embed"
    description = "SSAMBA (SiavashShams/ssamba AMBAModel, Vision Mamba under module.v)"
    ignored = (*_PRETRAIN_HEADS, ("head.", "Vision Mamba classification head"))

    def notes(self, src: _Source) -> list[str]:
        return [
            "SSAMBA runs its class token at index 0 (and applies the final norm twice); earmark inserts it at "
            "n // 2 and normalises once, so the encoder holds SSAMBA's weights but not SSAMBA's function: "
            "fine-tune before use"
        ]


class AuMFormat(_MambaFormat):
    name = "aum"
    marker = "pos_embed.pos_embed"
    pos_key = "pos_embed.pos_embed"
    description = "AuM (kaistmm/Audio-Mamba-AuM AudioMamba)"
    ignored = (*_PRETRAIN_HEADS, ("head.", "AuM classification head"))

    def notes(self, src: _Source) -> list[str]:
        return [
            "assumes AuM's defaults (bimamba v2 with if_devide_out=True, frequency-major tokens, class token "
            "in the middle); under them the encoder computes AuM's forward_features"
        ]


FORMATS.register("ssast")(SSASTFormat())
FORMATS.register("ssamba")(SSAMBAFormat())
FORMATS.register("aum")(AuMFormat())


def _strip(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key[2:] if key.startswith("v.") else key


def _unwrap(path: Path, obj: object) -> dict[str, Tensor]:
    """The state dict inside what torch.load returned (a bare one, or under 'model' / 'state_dict')."""
    for _ in range(2):
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict", "module") if k in obj), None)
            if isinstance(inner, Mapping):
                obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: holds no state dict of tensors ({what})")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A local checkpoint's tensors, read safely: safetensors, or torch.load with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...: all mean "not a usable file"
            raise CheckpointError(f"{path}: not a safetensors file ({type(exc).__name__}: {exc})") from exc
    with path.open("rb") as fh:
        head = fh.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects beyond tensors and plain containers, and "
            f"only torch.load(weights_only=True) is used (never an unrestricted pickle)"
        ) from exc
    except Exception as exc:  # truncated zip, bad pickle stream, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return _unwrap(path, obj)


def detect_format(keys: Collection[str]) -> str:
    """The registered format whose marker keys ``keys`` (prefixes stripped) hold; exactly one must match."""
    found = [name for name in FORMATS if FORMATS.get(name).detect(keys)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"keys match several formats ({', '.join(found)}); pass format=")
    hint = ""
    if any(k.startswith(("encoder.", "model.encoder.")) for k in keys):
        hint = "; it looks like an earmark checkpoint: use AudioEmbedder.load or encoder_from_checkpoint"
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(
        f"not an SSAST / SSAMBA / AuM checkpoint: no format's marker key found (first keys: {sample}){hint}"
    )


def _fit_time(grid: Tensor, t: int) -> tuple[Tensor, str | None]:
    have = grid.shape[2]
    if have == t:
        return grid, None
    if have > t:
        return grid[:, :, :t], f"pos_embed: kept the first {t} of {have} time columns (config.max_frames)"
    g = F.interpolate(grid.permute(0, 3, 1, 2), size=(grid.shape[1], t), mode="bilinear", align_corners=False)
    return g.permute(0, 2, 3, 1), f"pos_embed: interpolated bilinearly along time from {have} to {t} columns"


def load_published(
    path: str | Path, format: str | None = None, config: EncoderConfig | None = None
) -> tuple[nn.Module, ConversionReport]:
    """Build an earmark encoder holding a published checkpoint's weights; returns it (eval mode) and a report.

    ``format``: one of ``FORMATS`` (ssast, ssamba, aum), detected from the keys when None. ``config``: the
    encoder to build; read from the tensor shapes when None. A given config must agree with the file on
    arch, patch, depth and direction; its ``max_frames`` may differ (the position grid is cut or
    interpolated along time) and its pooling and scan settings are free.
    """
    path = Path(path)
    raw = read_state_dict(path)
    tensors: dict[str, Tensor] = {}
    original: dict[str, str] = {}
    for key, value in raw.items():
        short = _strip(key)
        if short in tensors:
            raise CheckpointError(f"{path}: keys {original[short]!r} and {key!r} both strip to {short!r}")
        tensors[short], original[short] = value, key
    src = _Source(path, tensors, original)
    try:
        name = format or detect_format(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if name not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)}")
    fmt = FORMATS.get(name)
    if not fmt.detect(tensors):
        raise CheckpointError(f"{path}: not a {name} checkpoint (marker key {fmt.marker!r} missing)")
    fmt.check(src)
    inferred = fmt.infer(src, config.n_mels if config else None)
    if config is None:
        config = inferred
    else:
        fmt.reconcile(src, inferred, config)
    encoder = build_encoder(config)
    target = encoder.state_dict()
    state = fmt.convert(src, config)
    state["pos_embed"], note = _fit_time(state["pos_embed"], config.max_frames // config.patch)
    src.notes += fmt.notes(src) + ([note] if note else [])
    source: dict[str, str] = {}
    for theirs, ours in src.mapped:
        source.setdefault(ours, theirs)
    missing = [ours for ours in target if ours not in state]
    if missing:
        raise CheckpointError(f"{path}: no published tensor maps onto the encoder's {', '.join(missing)}")
    for ours, got in state.items():  # in mapping order: the first disagreeing tensor is the one named
        want = target.get(ours)
        if want is None:
            raise CheckpointError(f"{path}: {source.get(ours, ours)} maps onto {ours}, which the encoder lacks")
        if _shape(got) != _shape(want):
            theirs = source.get(ours, ours)
            raise CheckpointError(
                f"{path}: {theirs} -> {ours}: checkpoint shape {_shape(got)}, encoder expects {_shape(want)}"
            )
        state[ours] = got.detach().to(dtype=want.dtype).clone()
    for key in sorted(set(src.tensors) - src.used):
        why = next((why for prefix, why in fmt.ignored if key.startswith(prefix)), None)
        if why is None:
            raise CheckpointError(
                f"{path}: {src.name(key)} (shape {_shape(src.tensors[key])}) has no counterpart in "
                f"earmark's {config.arch} encoder and is not a known head"
            )
        src.ignore(key, why)
    encoder.load_state_dict(state, strict=True)
    report = ConversionReport(str(path), name, config, src.mapped, src.ignored, src.notes)
    return encoder.eval(), report
