"""Long recordings in fixed windows, read block by block: memory stays flat whatever the file length."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import soundfile as sf
import soxr

from earmark.audio.io import AudioConfig, AudioDecodeError, AudioSource, open_audio, source_name, to_mono


def iter_windows(
    source: AudioSource,
    window_seconds: float,
    hop_seconds: float,
    config: AudioConfig | None = None,
    block_seconds: float = 30.0,
    max_seconds: float | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (start time in s, mono float32 window at the model rate); the last window is zero-padded.

    The file is decoded ``block_seconds`` at a time and resampled with a streaming soxr resampler,
    so only one block plus one window is ever held in memory. ``max_seconds``: refuse a longer file
    (:class:`AudioTooLongError`) from its header.
    """
    config = config or AudioConfig()
    if window_seconds <= 0 or hop_seconds <= 0:
        raise ValueError("window and hop must be positive")
    path = source_name(source)
    fh = open_audio(source, config, max_seconds=max_seconds)
    rate = fh.samplerate
    sr = config.sample_rate
    win, hop = int(round(window_seconds * sr)), int(round(hop_seconds * sr))
    resampler = soxr.ResampleStream(rate, sr, 1, dtype="float32", quality=config.resample_quality)
    buf = np.zeros(0, dtype=np.float32)
    start = 0  # index (at the model rate) of buf[0]
    emitted = False
    try:
        with fh:
            block = max(1, int(block_seconds * rate))
            while True:
                data = fh.read(block, dtype="float32", always_2d=False)
                last = len(data) < block
                if len(data):
                    x = to_mono(data)
                    if not np.isfinite(x).all():
                        raise AudioDecodeError(path, f"NaN or infinite samples near {start / sr + len(buf) / sr:.1f} s")
                    buf = np.concatenate([buf, resampler.resample_chunk(x, last=last)])
                elif last:
                    buf = np.concatenate([buf, resampler.resample_chunk(np.zeros(0, np.float32), last=True)])
                while len(buf) >= win:
                    yield start / sr, buf[:win].copy()
                    emitted = True
                    buf, start = buf[hop:], start + hop
                if last:
                    break
    except sf.LibsndfileError as exc:
        raise AudioDecodeError(path, f"cannot be decoded ({exc})") from exc
    if len(buf) and (not emitted or len(buf) > win - hop):
        yield start / sr, np.pad(buf, (0, win - len(buf)))
    elif not emitted:
        raise AudioDecodeError(path, "contains no samples")
