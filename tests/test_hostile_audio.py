"""A corpus of bad and odd inputs: each gives its expected error, or decodes to what is really there."""

import struct

import numpy as np
import pytest
import soundfile as sf

from earmark.audio import AudioConfig, AudioDecodeError, load_audio
from earmark.audio.stream import iter_windows

TONE = (0.3 * np.sin(np.arange(32000) / 5)).astype(np.float32)


def _wav_bytes(tmp_path):
    p = tmp_path / "ok.wav"
    sf.write(p, TONE, 16000)
    return p.read_bytes()


def truncated_data(tmp_path, p):
    p.write_bytes(_wav_bytes(tmp_path)[: 44 + 32000])  # header intact, half the samples


def truncated_header(tmp_path, p):
    p.write_bytes(_wav_bytes(tmp_path)[:30])


def huge_size_claim(tmp_path, p):
    b = bytearray(_wav_bytes(tmp_path))
    i = b.find(b"data")
    b[i + 4 : i + 8] = struct.pack("<I", 0xFFFFFF00)  # the header claims ~4 GB of samples
    p.write_bytes(bytes(b))


def zero_rate(tmp_path, p):
    b = bytearray(_wav_bytes(tmp_path))
    b[24:28] = struct.pack("<I", 0)
    p.write_bytes(bytes(b))


ERRORS = {
    "zero-length file": (lambda t, p: p.write_bytes(b""), "cannot be decoded"),
    "text file named .wav": (lambda t, p: p.write_text("RIFF? no, just text\n" * 20), "cannot be decoded"),
    "truncated header": (truncated_header, "cannot be decoded"),
    "0 Hz sample rate": (zero_rate, "cannot be decoded"),
    "absurd sample rate": (lambda t, p: sf.write(p, TONE, 1_000_000, subtype="FLOAT"), "sample rate 1000000 Hz"),
    "all NaN": (lambda t, p: sf.write(p, np.full(800, np.nan, np.float32), 16000, subtype="FLOAT"), "no finite"),
    "inf samples": (lambda t, p: sf.write(p, np.r_[TONE, np.inf].astype(np.float32), 16000, subtype="FLOAT"),
                    "NaN or infinite"),
    "too many channels": (lambda t, p: sf.write(p, np.zeros((100, 128), np.float32), 16000), "128 channels"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_raises_named_error(tmp_path, case):
    make, reason = ERRORS[case]
    p = tmp_path / f"{case} ünïcode.wav"
    make(tmp_path, p)
    with pytest.raises(AudioDecodeError) as info:
        load_audio(p)
    assert reason in info.value.reason
    assert info.value.path == p and str(p) in str(info.value)


def test_truncated_data_decodes_what_is_there(tmp_path):
    p = tmp_path / "trunc.wav"
    truncated_data(tmp_path, p)
    x = load_audio(p, AudioConfig(clip_seconds=2.0))
    assert np.allclose(x[:16000], TONE[:16000], atol=1e-4)  # the half that exists
    assert not x[16000:].any()  # the missing half is padding, not garbage


def test_huge_size_claim_reads_only_real_samples(tmp_path):
    p = tmp_path / "huge.wav"
    huge_size_claim(tmp_path, p)
    x = load_audio(p, AudioConfig(clip_seconds=3.0))
    assert np.allclose(x[:32000], TONE, atol=1e-4) and not x[32000:].any()
    assert sum(len(w) for _, w in iter_windows(p, 1.0, 1.0)) == 32000  # streaming stops at the real end


@pytest.mark.parametrize(
    "subtype, channels, atol",
    [("PCM_U8", 1, 1e-2), ("FLOAT", 1, 1e-6), ("PCM_24", 1, 1e-5), ("PCM_16", 8, 1e-4), ("PCM_16", 32, 1e-4)],
)
def test_odd_but_valid_formats_decode(tmp_path, subtype, channels, atol):
    p = tmp_path / f"{subtype}-{channels}ch with space.wav"
    sf.write(p, np.tile(TONE[:, None], (1, channels)) if channels > 1 else TONE, 16000, subtype=subtype)
    x = load_audio(p)
    assert np.allclose(x, TONE, atol=atol)


def test_all_zero_audio_is_valid_silence(tmp_path):
    p = tmp_path / "silence.wav"
    sf.write(p, np.zeros(16000, np.float32), 16000)
    x = load_audio(p)
    assert x.shape == (32000,) and not x.any()


def test_ten_millisecond_clip_is_padded(tmp_path):
    p = tmp_path / "blip.flac"
    sf.write(p, TONE[:160], 16000)
    x = load_audio(p)
    assert np.allclose(x[:160], TONE[:160], atol=1e-4) and not x[160:].any()
