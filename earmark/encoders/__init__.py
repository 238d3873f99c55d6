"""Audio encoders: log-mel patches -> clip embedding; configs and presets by name."""

from earmark.encoders.ast import ASTEncoder as ASTEncoder  # registers arch "ast"
from earmark.encoders.config import ENCODER_CONFIGS, ENCODERS, EncoderConfig, build_encoder, resolve_config
from earmark.encoders.mamba import MambaEncoder
from earmark.encoders.scan import SCAN_IMPLS, selective_scan

__all__ = [
    "ENCODERS",
    "ENCODER_CONFIGS",
    "SCAN_IMPLS",
    "EncoderConfig",
    "MambaEncoder",
    "build_encoder",
    "resolve_config",
    "selective_scan",
]
