"""Audio in: decoding, resampling, pad/crop and log-mel features."""

from earmark.audio.features import FeatureConfig, FeatureNormalizer, LogMel, mel_filterbank
from earmark.audio.io import (
    AudioBytes,
    AudioConfig,
    AudioDecodeError,
    AudioSource,
    AudioTooLongError,
    AudioWarning,
    fix_length,
    load_audio,
    load_batch,
    load_many,
    open_audio,
    source_name,
    to_mono,
)

__all__ = [
    "AudioBytes",
    "AudioConfig",
    "AudioDecodeError",
    "AudioSource",
    "AudioTooLongError",
    "AudioWarning",
    "FeatureConfig",
    "FeatureNormalizer",
    "LogMel",
    "fix_length",
    "load_audio",
    "load_batch",
    "load_many",
    "mel_filterbank",
    "open_audio",
    "source_name",
    "to_mono",
]
