"""Decoding audio files into mono float32 waveforms at the model rate.

Every failure is raised as :class:`AudioDecodeError`, which names the file and the reason, so a
caller can fail clearly or skip and report without parsing library-specific messages.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioDecodeError(ValueError):
    """A file could not be turned into usable audio."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class AudioTooLongError(AudioDecodeError):
    """A file longer than the caller accepts (e.g. a service's limit), refused from its header alone."""


class AudioWarning(UserWarning):
    """A file decoded, but not as its header says or shorter than a usable clip (the message names it).

    Collect them with ``warnings.catch_warnings(record=True)``, or make them errors with
    ``warnings.simplefilter("error", AudioWarning)``.
    """


# libsndfile's log line for a chunk whose size the header overstates: "data : 64000 (should be 32000)".
_SHOULD_BE = re.compile(r"^\s*data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


@dataclass(frozen=True)
class AudioConfig:
    """How files become model input: rate, clip length and what counts as an absurd file."""

    sample_rate: int = 16000
    clip_seconds: float | None = 2.0  # None keeps the whole file
    min_rate: int = 1000
    max_rate: int = 768000
    max_channels: int = 64
    resample_quality: str = "HQ"
    min_seconds: float = 0.05  # shorter files decode (zero-padded) with an AudioWarning

    @property
    def clip_samples(self) -> int | None:
        return None if self.clip_seconds is None else int(round(self.clip_seconds * self.sample_rate))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class AudioBytes:
    """An audio file held in memory (an upload), with the name that messages call it by.

    Why: a service that writes every small upload to a temp file, opens it twice and removes it spends more
    CPU on the file system than on decoding; the decoders read these straight from memory.
    """

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


AudioSource = str | Path | AudioBytes


def source_name(source: AudioSource) -> Path:
    """What errors and warnings call a source: its path, or an in-memory clip's name."""
    return Path(source.name) if isinstance(source, AudioBytes) else Path(source)


def open_audio(
    source: AudioSource, config: AudioConfig, stacklevel: int = 3, max_seconds: float | None = None
) -> sf.SoundFile:
    """Open a file (or in-memory clip) once and check its header against ``config`` (and ``max_seconds``,
    :class:`AudioTooLongError`); the caller closes it."""
    path = source_name(source)
    if not isinstance(source, AudioBytes):
        if not path.exists():
            raise AudioDecodeError(path, "file does not exist")
        if path.is_dir():
            raise AudioDecodeError(path, "is a directory, not an audio file")
    handle = io.BytesIO(source.data) if isinstance(source, AudioBytes) else str(path)
    try:
        fh = sf.SoundFile(handle)
    except Exception as exc:  # soundfile raises several types for undecodable input
        said = str(exc).replace(repr(handle), repr(str(path))) if isinstance(source, AudioBytes) else str(exc)
        raise AudioDecodeError(path, f"cannot be decoded ({said})") from exc
    try:
        _check_header(fh, path, config, stacklevel + 1)
        if max_seconds is not None and fh.frames > max_seconds * fh.samplerate:
            raise AudioTooLongError(path, f"{fh.frames / fh.samplerate:.1f} s long; the limit is {max_seconds:g} s")
    except BaseException:
        fh.close()
        raise
    return fh


def _check_header(fh: sf.SoundFile, path: Path, config: AudioConfig, stacklevel: int) -> None:
    if not config.min_rate <= fh.samplerate <= config.max_rate:
        raise AudioDecodeError(
            path, f"sample rate {fh.samplerate} Hz is outside {config.min_rate}..{config.max_rate} Hz"
        )
    if not 1 <= fh.channels <= config.max_channels:
        raise AudioDecodeError(path, f"{fh.channels} channels (at most {config.max_channels} accepted)")
    m = _SHOULD_BE.search(getattr(fh, "extra_info", "") or "")
    if m and int(m.group(1)) > int(m.group(2)):
        claimed, there = int(m.group(1)), int(m.group(2))
        warnings.warn(
            f"{path}: truncated: the header claims {claimed} bytes of audio data, the file holds {there} "
            f"({fh.frames} frames, {fh.frames / fh.samplerate:.3f} s, decoded; the rest is missing)",
            AudioWarning, stacklevel=stacklevel,
        )
    if config.min_seconds and 0 < fh.frames / fh.samplerate < config.min_seconds:
        warnings.warn(
            f"{path}: only {1000 * fh.frames / fh.samplerate:.1f} ms of audio (minimum "
            f"{1000 * config.min_seconds:.0f} ms, AudioConfig.min_seconds); decoded and zero-padded",
            AudioWarning, stacklevel=stacklevel,
        )


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average channels; soundfile returns (frames, channels) for multichannel files."""
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(x: np.ndarray, rate: int, target: int, quality: str = "HQ") -> np.ndarray:
    if rate == target:
        return x
    return soxr.resample(x, rate, target, quality=quality).astype(np.float32, copy=False)


def fix_length(x: np.ndarray, n: int) -> np.ndarray:
    """Crop from the start or zero-pad at the end to exactly ``n`` samples."""
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)))


def load_audio(path: AudioSource, config: AudioConfig | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Decode, downmix, resample and pad/crop one file (or in-memory clip) to a float32 waveform.

    ``max_seconds``: refuse a longer file (:class:`AudioTooLongError`) before reading its samples."""
    config = config or AudioConfig()
    name = source_name(path)
    with open_audio(path, config, max_seconds=max_seconds) as fh:
        rate, frames = fh.samplerate, fh.frames
        stop = None
        if config.clip_samples is not None:
            # Read only what the clip needs (plus resampler slack): long files never load whole.
            stop = int(np.ceil(config.clip_samples * rate / config.sample_rate)) + 64
        try:
            x = fh.read(-1 if stop is None else stop, dtype="float32", always_2d=False)
        except Exception as exc:
            raise AudioDecodeError(name, f"cannot be decoded ({exc})") from exc
    if x.size == 0:
        raise AudioDecodeError(name, "contains no samples")
    expected = frames if stop is None else min(stop, frames)
    if len(x) < expected:
        warnings.warn(f"{name}: truncated: {len(x)} of the {expected} frames the header announces could be read",
                      AudioWarning, stacklevel=2)
    x = to_mono(x)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int((~finite).sum())
        if bad == len(x):
            raise AudioDecodeError(name, "has no finite samples")
        raise AudioDecodeError(name, f"{bad} of {len(x)} samples are NaN or infinite")
    x = resample(x, rate, config.sample_rate, config.resample_quality)
    if config.clip_samples is not None:
        x = fix_length(x, config.clip_samples)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_batch(paths: list[str | Path], config: AudioConfig | None = None) -> np.ndarray:
    """Stack equal-length clips into (batch, samples); needs a fixed clip length."""
    config = config or AudioConfig()
    if config.clip_samples is None:
        raise ValueError("load_batch needs AudioConfig.clip_seconds to stack clips")
    return np.stack([load_audio(p, config) for p in paths]) if paths else np.zeros((0, config.clip_samples))


def load_many(
    paths: list[str | Path], config: AudioConfig | None = None, on_error: str = "fail"
) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
    """Decode several files; returns (waveforms, positions decoded, skipped (path, reason)).

    ``on_error="fail"`` raises the first :class:`AudioDecodeError`; ``"skip"`` records it and goes on.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    waves, kept, skipped = [], [], []
    for k, path in enumerate(paths):
        try:
            waves.append(load_audio(path, config))
            kept.append(k)
        except AudioDecodeError as exc:
            if on_error == "fail":
                raise
            skipped.append((str(path), exc.reason))
    return waves, kept, skipped
