"""Log-mel filterbank features in torch, batched, Kaldi-style as AST / SSAST / AuM use them.

Version 2 (the default) matches ``torchaudio.compliance.kaldi.fbank`` as those models call it
(``window_type="hanning"``, ``dither=0``, ``num_mel_bins=128``, other arguments at their Kaldi
defaults): per frame the DC offset removed, then pre-emphasis 0.97 (the first sample against
itself, as Kaldi), a symmetric Hann window, zero-padding to a power of two (512), the power
spectrum, triangular filters on the mel scale 1127 ln(1 + f / 700) from 20 Hz to Nyquist (the
Nyquist bin weighted 0), the log with a float32-eps floor; only whole frames (snip_edges).
Version 1, what earmark computed before, is the same without pre-emphasis; checkpoints saved
without a ``version`` in their feature config are version 1 and keep it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureConfig:
    """Kaldi fbank: 25 ms Hann window, 10 ms hop, 128 mel bins, no dither, DC offset removed, and
    (version 2) pre-emphasis 0.97. See the module docstring."""

    sample_rate: int = 16000
    n_mels: int = 128
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 512
    f_min: float = 20.0
    f_max: float | None = None  # None = Nyquist
    log_floor: float = 1.1920928955078125e-07  # float32 eps, as Kaldi
    version: int = 2  # 1: no pre-emphasis (checkpoints saved before version 2)

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"feature config version must be 1 or 2, got {self.version}")

    @property
    def preemphasis(self) -> float:
        """Kaldi's pre-emphasis coefficient (version 2); 0 = none (version 1)."""
        return 0.97 if self.version >= 2 else 0.0

    @property
    def win_length(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    def num_frames(self, num_samples: int) -> int:
        """Frames with Kaldi's snip_edges: only whole windows."""
        if num_samples < self.win_length:
            return 1
        return 1 + (num_samples - self.win_length) // self.hop_length

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureConfig:
        """A saved config; one without ``version`` predates it and is version 1."""
        return cls(**{"version": 1, **d})


def _mel(f: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(f / 700.0)


def mel_filterbank(config: FeatureConfig) -> Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, equally spaced on the Kaldi mel scale."""
    f_max = config.f_max or config.sample_rate / 2
    n_bins = config.n_fft // 2 + 1
    freqs = torch.linspace(0, config.sample_rate / 2, n_bins, dtype=torch.float64)
    mel_pts = torch.linspace(
        float(_mel(torch.tensor(config.f_min))),
        float(_mel(torch.tensor(f_max))),
        config.n_mels + 2,
        dtype=torch.float64,
    )
    m = _mel(freqs)[None, :]
    left, center, right = mel_pts[:-2, None], mel_pts[1:-1, None], mel_pts[2:, None]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    return torch.clamp(torch.minimum(up, down), min=0.0).to(torch.float32)


def prepare_frames(frames: Tensor, config: FeatureConfig) -> Tensor:
    """Kaldi's per-frame steps before the window: remove the DC offset, then pre-emphasis (version 2).

    Pre-emphasis is ``x[i] - k x[i - 1]`` within the frame and ``x[0] - k x[0]`` for the first sample.
    Shared by :class:`LogMel` and the ONNX export's DFT front end, so the two cannot drift apart.
    """
    frames = frames - frames.mean(dim=-1, keepdim=True)
    if config.preemphasis:
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = frames - config.preemphasis * prev
    return frames


class LogMel(nn.Module):
    """Waveforms (batch, samples) -> log-mel (batch, n_mels, frames)."""

    def __init__(self, config: FeatureConfig | None = None) -> None:
        super().__init__()
        self.config = config or FeatureConfig()
        c = self.config
        if c.win_length > c.n_fft:
            raise ValueError(f"window of {c.win_length} samples does not fit n_fft={c.n_fft}")
        self.register_buffer("window", torch.hann_window(c.win_length, periodic=False), persistent=False)
        self.register_buffer("fbank", mel_filterbank(c), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        if wave.ndim == 1:
            wave = wave[None]
        c = self.config
        wave = wave.to(self.window.dtype)
        if wave.shape[-1] < c.win_length:
            wave = nn.functional.pad(wave, (0, c.win_length - wave.shape[-1]))
        frames = prepare_frames(wave.unfold(-1, c.win_length, c.hop_length), c)  # (B, T, win)
        spec = torch.fft.rfft(frames * self.window, n=c.n_fft).abs().pow(2)  # (B, T, bins)
        mel = spec @ self.fbank.T  # (B, T, n_mels)
        return torch.log(mel.clamp_min(c.log_floor)).transpose(1, 2).contiguous()


class FeatureNormalizer(nn.Module):
    """Dataset-level (x - mean) / (2 * std), as AST; the constants are saved with the model."""

    def __init__(self, mean: float = 0.0, std: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    @torch.no_grad()
    def fit(self, features: Tensor) -> FeatureNormalizer:
        """Set the constants from a stack of log-mel features (any shape)."""
        x = features.double()
        self.mean.fill_(float(x.mean()))
        self.std.fill_(max(float(x.std()), 1e-8))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / (2.0 * self.std)


def frames_for_seconds(seconds: float, config: FeatureConfig | None = None) -> int:
    config = config or FeatureConfig()
    return config.num_frames(int(math.floor(seconds * config.sample_rate)))
