import math

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
    mel_filterbank,
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
        (
            lambda p: sf.write(p, np.r_[np.zeros(10), np.inf].astype(np.float32), 16000, subtype="FLOAT"),
            "NaN or infinite",
        ),
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


def _reference_signal() -> torch.Tensor:
    """0.25 s at 16 kHz: two sines, a chirp, a DC offset and LCG noise - pure arithmetic, so the
    same samples on every machine and torch version."""
    t = torch.arange(4000, dtype=torch.float64) / 16000
    x = 0.5 * torch.sin(2 * math.pi * 440 * t) + 0.25 * torch.sin(2 * math.pi * 3000 * t + 0.3)
    x = x + 0.1 * torch.sin(2 * math.pi * (100 + 2000 * t) * t) + 0.05
    n = torch.arange(4000, dtype=torch.int64)
    noise = ((n * 1103515245 + 12345) % 2**31).double() / 2**31 - 0.5
    return (x + 0.02 * noise).float()


# (mel bin, frame) -> log-mel value, computed once (torch 2.13, CPU) and pinned as the regression
# reference. Version 2 = torchaudio.compliance.kaldi.fbank as AST / SSAST / AuM call it
# (window_type="hanning", dither=0, 128 bins; pre-emphasis 0.97 and DC removal by default);
# version 1 = earmark before pre-emphasis was added.
REFERENCE_POINTS = [(0, 0), (10, 5), (40, 11), (64, 20), (100, 3), (127, 22)]
REFERENCE = {
    2: ([-8.39523, -8.62596, -6.05536, -7.68752, -6.44241, 0.6852], -6.15455),
    1: ([-0.58599, -4.6479, -3.93156, -6.89901, -7.26274, -0.66896], -5.05432),
}


@pytest.mark.parametrize("version", [2, 1])
def test_logmel_reference_values(version: int) -> None:
    feats = LogMel(FeatureConfig(version=version))(_reference_signal())[0]
    assert feats.shape == (128, 23)
    values, mean = REFERENCE[version]
    got = [feats[i, j].item() for i, j in REFERENCE_POINTS]
    assert got == pytest.approx(values, abs=2e-4)
    assert feats.mean().item() == pytest.approx(mean, abs=2e-4)


def test_preemphasis_is_kaldis() -> None:
    """Version 2 differs from version 1 exactly by x[i] - 0.97 x[i - 1] within each DC-free frame
    (x[0] - 0.97 x[0]), before the window: rebuilt here from the version-1 pipeline's steps."""
    cfg = FeatureConfig()
    assert cfg.version == 2 and cfg.preemphasis == 0.97 and FeatureConfig(version=1).preemphasis == 0.0
    wave = _reference_signal()[None]
    frames = wave.unfold(-1, cfg.win_length, cfg.hop_length)
    frames = frames - frames.mean(-1, keepdim=True)
    shifted = torch.cat([frames[..., :1], frames[..., :-1]], -1)
    frames = (frames - 0.97 * shifted) * torch.hann_window(cfg.win_length, periodic=False)
    power = torch.fft.rfft(frames, n=cfg.n_fft).abs().pow(2)
    expected = torch.log((power @ mel_filterbank(cfg).T).clamp_min(cfg.log_floor)).transpose(1, 2)
    assert torch.allclose(LogMel(cfg)(wave), expected, atol=1e-5)
    with pytest.raises(ValueError, match="version"):
        FeatureConfig(version=3)


def test_old_feature_config_loads_as_version_1(tmp_path) -> None:
    """A checkpoint saved before the version field (its feature config has no "version") loads as
    version 1 and gives the features it was trained on; new ones save and load version 2."""
    from earmark.checkpoint import load_tensors, save_tensors
    from earmark.encoders import EncoderConfig
    from earmark.encoders.embedder import AudioEmbedder

    embedder = AudioEmbedder(EncoderConfig(embed_dim=32, depth=1, d_state=4, max_frames=64))
    new = tmp_path / "new.safetensors"
    embedder.save(new)
    assert AudioEmbedder.load(new).feature_config.version == 2
    tensors, meta, _ = load_tensors(new, kind="embedder")
    del meta["feature_config"]["version"]
    old = tmp_path / "old.safetensors"
    save_tensors(old, tensors, meta)
    loaded = AudioEmbedder.load(old)
    assert loaded.feature_config.version == 1
    wave = _reference_signal()
    feats = loaded.logmel(wave)[0]
    values, _ = REFERENCE[1]
    assert [feats[i, j].item() for i, j in REFERENCE_POINTS] == pytest.approx(values, abs=2e-4)


def test_in_memory_clip_decodes_like_its_file_and_errors_name_it(tmp_path):
    from earmark.audio import AudioBytes
    from earmark.audio.stream import iter_windows

    p = tmp_path / "tone.flac"
    sf.write(p, _tone(22050, 1.5, channels=2), 22050)
    clip = AudioBytes("upload.flac", p.read_bytes())
    cfg = AudioConfig(clip_seconds=1.0)
    assert np.array_equal(load_audio(clip, cfg), load_audio(p, cfg))
    from_file = list(iter_windows(p, 0.5, 0.25, cfg))
    from_memory = list(iter_windows(clip, 0.5, 0.25, cfg))
    assert [t for t, _ in from_memory] == [t for t, _ in from_file]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(from_memory, from_file, strict=True))
    with pytest.raises(AudioDecodeError, match=r"^broken\.wav: cannot be decoded") as info:
        load_audio(AudioBytes("broken.wav", b"RIFF not really a wave file"))
    assert info.value.path.name == "broken.wav"


def test_a_file_over_max_seconds_is_refused_from_its_header(tmp_path):
    from earmark.audio import AudioTooLongError
    from earmark.audio.stream import iter_windows

    p = tmp_path / "long.wav"
    sf.write(p, _tone(16000, 3.0), 16000)
    assert load_audio(p, AudioConfig(clip_seconds=1.0), max_seconds=3.0).shape == (16000,)
    with pytest.raises(AudioTooLongError, match=r"long\.wav: 3\.0 s long; the limit is 2 s"):
        load_audio(p, AudioConfig(clip_seconds=1.0), max_seconds=2.0)
    with pytest.raises(AudioTooLongError):
        next(iter_windows(p, 1.0, 1.0, AudioConfig(), max_seconds=2.5))
    assert len(list(iter_windows(p, 1.0, 1.0, AudioConfig(), max_seconds=3.0))) == 3
