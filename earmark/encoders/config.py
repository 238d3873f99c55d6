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
    pool: str = "cls"  # "cls" (class token in the middle) or "mean" (mean of patch tokens)
    bidirectional: bool = True  # v2 bidirectional Mamba: a backward branch over the flipped sequence
    scan_impl: str = "auto"  # selective scan: auto | numba | sequential | chunked | reference | cuda
    scan_chunk: int = 0  # chunk length of the chunked scan; 0 -> ~sqrt(sequence length)
    recompute: bool = True  # training: recompute conv/projections in backward instead of keeping them
    attention: str = "sdpa"  # AST only: "sdpa" (fused kernel) or "explicit" (softmax(QK^T) V materialised, as SSAST)

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """Missing keys take defaults (older checkpoints); unknown keys are an error (typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys: {', '.join(sorted(unknown))}")
        return cls(**d)


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
    """A preset name (see ENCODER_CONFIGS), a dict of EncoderConfig fields, or a config as is."""
    if isinstance(config, str):
        return ENCODER_CONFIGS.get(config)
    if isinstance(config, dict):
        return EncoderConfig.from_dict(config)
    return config


def build_encoder(config: EncoderConfig | str) -> nn.Module:
    """An untrained encoder for a config or preset name."""
    config = resolve_config(config)
    return ENCODERS.get(config.arch)(config)
