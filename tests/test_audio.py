import numpy as np
import pytest
import soundfile as sf
import torch

from earmark.audio import (
    AudioConfig,
    AudioDecodeError,
    FeatureConfig,
    FeatureNormalizer,
    LogMel,
    load_audio,
    load_batch,
)


def _tone(sr: int, seconds: float, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_resample_downmix_and_pad(tmp_path):
    p = tmp_path / "stereo 44k ü.wav"
    sf.write(p, _tone(44100, 1.0, channels=2), 44100)
    x = load_audio(p, AudioConfig(clip_seconds=2.0))
    assert x.dtype == np.float32 and x.shape == (32000,)
    assert np.abs(x[:15000]).max() > 0.4  # the tone survived resampling
    assert np.all(x[16100:] == 0)  # padded with zeros after the 1 s of audio


def test_crop_and_whole_file(tmp_path):
    p = tmp_path / "long.flac"
    sf.write(p, _tone(16000, 3.0), 16000)
    assert load_audio(p, AudioConfig(clip_seconds=1.0)).shape == (16000,)
    assert load_audio(p, AudioConfig(clip_seconds=None)).shape == (48000,)


def test_ogg_decodes(tmp_path):
    p = tmp_path / "a.ogg"
    sf.write(p, _tone(22050, 0.5), 22050, format="OGG", subtype="VORBIS")
    x = load_audio(p, AudioConfig(clip_seconds=0.5))
    assert x.shape == (8000,) and np.abs(x).max() > 0.3


def test_downmix_averages_channels(tmp_path):
    p = tmp_path / "lr.wav"
    data = np.zeros((1600, 2), dtype=np.float32)
    data[:, 0] = 0.5
    sf.write(p, data, 16000, subtype="FLOAT")
    x = load_audio(p, AudioConfig(clip_seconds=0.1))
    assert np.allclose(x, 0.25)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "cannot be decoded"),
        (lambda p: p.write_text("this is not audio, just text"), "cannot be decoded"),
        (lambda p: sf.write(p, np.zeros((0,), np.float32), 16000), "no samples"),
        (lambda p: sf.write(p, np.full(1000, np.nan, np.float32), 16000, subtype="FLOAT"), "no finite samples"),
        (lambda p: sf.write(p, np.r_[np.zeros(10), np.inf].astype(np.float32), 16000, subtype="FLOAT"),
         "NaN or infinite"),
        (lambda p: sf.write(p, np.zeros(1000, np.float32), 100), "sample rate 100 Hz"),
        (lambda p: sf.write(p, np.zeros((100, 80), np.float32), 16000), "80 channels"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, make, reason):
    p = tmp_path / "bad.wav"
    make(p)
    with pytest.raises(AudioDecodeError) as info:
        load_audio(p)
    assert reason in str(info.value)
    assert str(p) in str(info.value)  # the message names the file
    assert isinstance(info.value, ValueError)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(AudioDecodeError, match="directory"):
        load_audio(tmp_path)


def test_load_batch_stacks(tmp_path):
    paths = []
    for i, sr in enumerate([8000, 16000, 48000]):
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], _tone(sr, 0.3), sr)
    batch = load_batch(paths, AudioConfig(clip_seconds=0.25))
    assert batch.shape == (3, 4000)
    with pytest.raises(ValueError, match="clip_seconds"):
        load_batch(paths, AudioConfig(clip_seconds=None))


def test_logmel_shape_frames_and_peak_bin():
    cfg = FeatureConfig()
    mel = LogMel(cfg)
    wave = torch.from_numpy(np.stack([_tone(16000, 2.0, 1000.0), _tone(16000, 2.0, 4000.0)]))
    feats = mel(wave)
    assert feats.shape == (2, 128, cfg.num_frames(32000)) == (2, 128, 198)
    peak = feats.mean(-1).argmax(-1)
    assert peak[1] > peak[0] + 20  # the higher tone lands in a higher mel bin
    # batched equals one by one
    assert torch.allclose(mel(wave[:1]), feats[:1], atol=1e-5)


def test_logmel_short_input_and_silence_is_finite():
    feats = LogMel()(torch.zeros(1, 100))
    assert feats.shape == (1, 128, 1) and torch.isfinite(feats).all()


def test_normalizer_fit_gives_half_unit_std():
    x = torch.randn(10, 128, 50) * 3 + 7
    norm = FeatureNormalizer().fit(x)
    y = norm(x)
    assert abs(float(y.mean())) < 1e-4
    assert abs(float(y.std()) - 0.5) < 1e-3
    state = norm.state_dict()
    assert set(state) == {"mean", "std"}
    fresh = FeatureNormalizer()
    fresh.load_state_dict(state)
    assert torch.allclose(fresh(x), y)


def test_mp3_decodes(tmp_path):
    p = tmp_path / "a.mp3"
    sf.write(p, _tone(16000, 1.0), 16000, format="MP3")
    x = load_audio(p, AudioConfig(clip_seconds=1.0))
    assert x.shape == (16000,) and np.abs(x).max() > 0.3


def test_load_many_fails_or_skips_and_reports(tmp_path):
    from earmark.audio import load_many

    good = tmp_path / "good.wav"
    sf.write(good, _tone(16000, 0.1), 16000)
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    waves, kept, skipped = load_many([good, bad, good], AudioConfig(clip_seconds=0.1), on_error="skip")
    assert len(waves) == 2 and kept == [0, 2]
    assert skipped == [(str(bad), skipped[0][1])] and "cannot be decoded" in skipped[0][1]
    with pytest.raises(AudioDecodeError, match="bad.wav"):
        load_many([good, bad], AudioConfig(clip_seconds=0.1))
    with pytest.raises(ValueError, match="on_error"):
        load_many([good], on_error="ignore")
