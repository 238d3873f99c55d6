"""Audio in: decoding, resampling, pad/crop and log-mel features."""

from earmark.audio.features import FeatureConfig, FeatureNormalizer, LogMel, mel_filterbank
from earmark.audio.io import (
    AudioConfig,
    AudioDecodeError,
    AudioWarning,
    fix_length,
    load_audio,
    load_batch,
    load_many,
    to_mono,
)

__all__ = [
    "AudioConfig",
    "AudioDecodeError",
    "AudioWarning",
    "FeatureConfig",
    "FeatureNormalizer",
    "LogMel",
    "fix_length",
    "load_audio",
    "load_batch",
    "load_many",
    "mel_filterbank",
    "to_mono",
]
