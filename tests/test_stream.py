import numpy as np
import pytest
import soundfile as sf

from earmark.audio import AudioConfig, AudioDecodeError, load_audio
from earmark.audio.stream import iter_windows


@pytest.mark.parametrize("rate", [16000, 44100])
def test_windows_match_whole_file_decoding(tmp_path, rate):
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(int(rate * 5.5))).astype(np.float32)
    p = tmp_path / "long.wav"
    sf.write(p, x, rate, subtype="FLOAT")
    whole = load_audio(p, AudioConfig(clip_seconds=None))
    wins = list(iter_windows(p, 2.0, 1.0, block_seconds=0.7))  # blocks smaller than a window
    assert [t for t, _ in wins] == [0.0, 1.0, 2.0, 3.0, 4.0]  # the last 0.5 s is covered by the window at 4 s
    for t, w in wins:
        ref = whole[int(t * 16000) : int(t * 16000) + 32000]
        ref = np.pad(ref, (0, 32000 - len(ref)))
        inner = slice(100, len(ref) - 100) if rate != 16000 else slice(None)
        assert np.allclose(w[inner], ref[inner], atol=2e-3), t


def test_short_file_gives_one_padded_window(tmp_path):
    p = tmp_path / "short.wav"
    sf.write(p, np.ones(160, np.float32) * 0.5, 16000)  # 10 ms
    wins = list(iter_windows(p, 2.0, 1.0))
    assert len(wins) == 1 and wins[0][1].shape == (32000,)
    assert np.allclose(wins[0][1][:160], 0.5) and not wins[0][1][160:].any()


def test_stream_errors(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("text")
    with pytest.raises(AudioDecodeError, match="bad.wav"):
        list(iter_windows(bad, 1.0, 1.0))
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.r_[np.zeros(40000), np.nan].astype(np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="NaN or infinite"):
        list(iter_windows(nan, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        list(iter_windows(nan, 0.0, 1.0))


def test_three_hour_file_streams_in_flat_memory(tmp_path):
    """A 3-hour recording (8 kHz, 8-bit: 86 MB on disk, 691 MB as float32 at 16 kHz) is windowed with
    bounded memory, and the clip loader reads only the clip it needs."""
    import tracemalloc

    rate, seconds = 8000, 3 * 3600
    path = tmp_path / "three hours.wav"
    block = (np.sin(np.arange(rate * 60) * 2 * np.pi * 440 / rate) * 0.5).astype(np.float32)
    with sf.SoundFile(str(path), "w", samplerate=rate, channels=1, subtype="PCM_U8") as fh:
        for _ in range(seconds // 60):
            fh.write(block)
    assert sf.info(str(path)).duration == seconds
    tracemalloc.start()
    try:
        clip = load_audio(path, AudioConfig(clip_seconds=2.0))
        n_windows = sum(1 for _ in iter_windows(path, 600.0, 600.0, block_seconds=30.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert clip.shape == (32000,)
    assert n_windows == 18
    # one 600 s window at 16 kHz is 38 MB of float32; the whole file would be 691 MB
    assert peak < 150 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"
