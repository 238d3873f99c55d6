"""Encoder configuration, named presets and the arch -> module registry.

Kept free of model code so checkpoints, the harness and the CLI can name and describe an encoder
without importing (or building) it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from earmark.registry import Registry


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that determines an encoder's architecture (not its weights)."""

    arch: str = "mamba"  # key into ENCODERS
    embed_dim: int = 192  # D
    depth: int = 24  # residual blocks
    d_state: int = 16  # N, SSM state size per channel
    d_conv: int = 4  # depthwise causal conv kernel
    expand: int = 2  # E = expand * D
    dt_rank: int = 0  # R; 0 -> ceil(D / 16)
    dt_min: float = 1e-3  # softplus(dt bias) is log-uniform in [dt_min, dt_max] at init
    dt_max: float = 0.1
    n_mels: int = 128
    patch: int = 16  # square patches, stride = patch (no overlap)
    max_frames: int = 1024  # position embeddings cover this many frames; longer inputs interpolate
    # Pooling over tokens: "cls" (class token in the middle), "mean" / "max" over the patch tokens,
    # "mean+max" (both, concatenated: 2 x D) or "attention" (softmax-weighted mean of the patch tokens,
    # one learned score per token; its weights start at zero, i.e. at the mean).
    pool: str = "cls"
    # Pooling over layers: the outputs of the last ``pool_layers`` blocks, each through the final norm,
    # pooled alike and merged by ``layer_merge``: "concat" (width x pool_layers) or "mean".
    pool_layers: int = 1
    layer_merge: str = "concat"
    # "none", or "rms": each pooled part (per layer, per token pooling) divided by its root mean square
    # before merging, so parts weigh alike and the scale stays that of the final RMSNorm.
    pool_norm: str = "none"
    bidirectional: bool = True  # v2 bidirectional Mamba: a backward branch over the flipped sequence
    scan_impl: str = "auto"  # selective scan: auto | numba | sequential | chunked | reference | cuda
    scan_chunk: int = 0  # chunk length of the chunked scan; 0 -> ~sqrt(sequence length)
    recompute: bool = True  # training: recompute conv/projections in backward instead of keeping them
    attention: str = "sdpa"  # AST only: "sdpa" (fused kernel) or "explicit" (softmax(QK^T) V materialised, as SSAST)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))}, got {self.pool!r}")
        if self.layer_merge not in ("concat", "mean"):
            raise ValueError(f"layer_merge must be 'concat' or 'mean', got {self.layer_merge!r}")
        if self.pool_norm not in ("none", "rms"):
            raise ValueError(f"pool_norm must be 'none' or 'rms', got {self.pool_norm!r}")
        if not 1 <= self.pool_layers <= self.depth:
            raise ValueError(f"pool_layers must be in 1..depth ({self.depth}), got {self.pool_layers}")
        if self.attention not in ("sdpa", "explicit"):
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {self.attention!r}")
        if self.n_mels % self.patch:
            raise ValueError(f"n_mels ({self.n_mels}) must be a multiple of patch ({self.patch})")
        if self.max_frames < self.patch:
            raise ValueError("max_frames must be at least one patch")
        for name in ("embed_dim", "depth", "d_state", "d_conv", "expand", "patch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def inner_dim(self) -> int:
        return self.expand * self.embed_dim

    @property
    def rank(self) -> int:
        return self.dt_rank or -(-self.embed_dim // 16)

    @property
    def out_dim(self) -> int:
        """Width of the clip embedding: D, x2 for "mean+max", x pool_layers when layers are concatenated."""
        parts = 2 if self.pool == "mean+max" else 1
        return self.embed_dim * parts * (self.pool_layers if self.layer_merge == "concat" else 1)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the pooling fields added later while at their defaults: a checkpoint
        of an encoder that does not use them keeps the bytes (and digest) it had before they existed."""
        d = dataclasses.asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """Missing keys take defaults (older checkpoints); unknown keys are an error (typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys: {', '.join(sorted(unknown))}")
        return cls(**d)


POOLS = ("cls", "mean", "max", "mean+max", "attention")
# Fields added after checkpoints were written, left out of to_dict() at these defaults.
LATER_DEFAULTS: dict[str, Any] = {"pool_layers": 1, "layer_merge": "concat", "pool_norm": "none"}

ENCODER_CONFIGS: Registry[EncoderConfig] = Registry("encoder config")
ENCODERS: Registry[type[nn.Module]] = Registry("encoder arch")

# Audio Mamba / Vision Mamba sizes.
ENCODER_CONFIGS.register("tiny")(EncoderConfig(embed_dim=192, depth=24))  # ~7M parameters
ENCODER_CONFIGS.register("small")(EncoderConfig(embed_dim=384, depth=24))  # ~26M parameters
# Small enough to train from scratch on a few CPU cores (benchmarks/scan.py encoder times it). The
# scan dominates the cost (batch x tokens x E x N x depth x 2 directions), hence expand 1 and a
# small state.
# Mean pooling over patch tokens for this shallow preset (tiny/small keep the published middle class token).
ENCODER_CONFIGS.register("fast")(EncoderConfig(embed_dim=128, depth=3, d_state=4, expand=1, pool="mean"))
# Transformer baselines (earmark/encoders/ast.py): ast-tiny is AST/DeiT-tiny (192 x 12, 3 heads, ~5.5M
# parameters); ast-fast has the fast preset's width, depth and pooling.
ENCODER_CONFIGS.register("ast-tiny")(EncoderConfig(arch="ast", embed_dim=192, depth=12))
ENCODER_CONFIGS.register("ast-fast")(EncoderConfig(arch="ast", embed_dim=128, depth=3, pool="mean"))


def resolve_config(config: EncoderConfig | str | dict) -> EncoderConfig:
    """A preset name (see ENCODER_CONFIGS), a dict of EncoderConfig fields, or a config as is.

    A dict with a ``preset`` key starts from that preset and changes the other keys, e.g.
    ``{"preset": "fast", "pool": "mean+max", "pool_layers": 2}``; without one, missing fields take
    EncoderConfig's defaults.
    """
    if isinstance(config, str):
        return ENCODER_CONFIGS.get(config)
    if isinstance(config, dict):
        if "preset" in config:
            changes = {k: v for k, v in config.items() if k != "preset"}
            base = ENCODER_CONFIGS.get(config["preset"])
            return EncoderConfig.from_dict({**dataclasses.asdict(base), **changes})
        return EncoderConfig.from_dict(config)
    return config


def build_encoder(config: EncoderConfig | str) -> nn.Module:
    """An untrained encoder for a config or preset name."""
    config = resolve_config(config)
    return ENCODERS.get(config.arch)(config)
