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
