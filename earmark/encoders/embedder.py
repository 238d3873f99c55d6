"""An audio embedder: waveform -> log-mel -> normalized -> encoder embedding, saved as one checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from earmark.audio import AudioConfig, FeatureConfig, FeatureNormalizer, LogMel
from earmark.checkpoint import load_tensors, prefixed, save_tensors, unprefixed
from earmark.encoders.config import EncoderConfig
from earmark.encoders.mamba import build_encoder


class AudioEmbedder(nn.Module):
    """The frozen feature extractor that every incremental learner reads from."""

    def __init__(
        self,
        encoder_config: EncoderConfig | str = "fast",
        audio_config: AudioConfig | None = None,
        feature_config: FeatureConfig | None = None,
    ) -> None:
        super().__init__()
        self.audio_config = audio_config or AudioConfig()
        self.feature_config = feature_config or FeatureConfig(sample_rate=self.audio_config.sample_rate)
        if self.feature_config.sample_rate != self.audio_config.sample_rate:
            raise ValueError("feature and audio sample rates differ")
        self.logmel = LogMel(self.feature_config)
        self.normalizer = FeatureNormalizer()
        self.encoder = build_encoder(encoder_config)
        self.digest: str | None = None  # sha256 of the checkpoint this was loaded from or saved to

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def features(self, wave: Tensor | np.ndarray) -> Tensor:
        """Normalized log-mel (batch, n_mels, frames) from waveforms (batch, samples)."""
        device = self.normalizer.mean.device
        wave = torch.as_tensor(wave, dtype=torch.float32, device=device)
        return self.normalizer(self.logmel(wave))

    def forward(self, wave: Tensor | np.ndarray) -> Tensor:
        return self.encoder(self.features(wave))

    def pin_batch_invariant(self) -> None:
        """Pin the scan implementation so a clip's embedding has the same bits whatever batch it is in.

        ``auto`` picks the scan by the batch's size (a chunked scan for small steps), and two scans
        round differently; the product needs one embedding per clip (the journal's digest proves it),
        so every mixer left on ``auto`` gets one scan whose rows are independent: the numba kernel where it
        runs (CPU, numba installed, not forced off with ``EARMARK_SCAN=torch``), else the sequential one.
        Done once, not around each call, so that threads sharing a frozen embedder never see it half-switched.
        """
        import os

        from earmark.encoders.scan import SCAN_ENV, numba_kernel

        on_cpu = self.normalizer.mean.device.type == "cpu"
        numba_ok = on_cpu and os.environ.get(SCAN_ENV, "").strip().lower() != "torch" and numba_kernel() is not None
        impl = "numba" if numba_ok else "sequential"
        for m in self.encoder.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and getattr(cfg, "scan_impl", None) == "auto":
                m.config = dataclasses.replace(cfg, scan_impl=impl)

    @torch.no_grad()
    def embed(self, wave: Tensor | np.ndarray) -> Tensor:
        was_training = self.training
        if not was_training:  # the usual case: walking ~100 submodules to set eval costs more than a small batch
            return self(wave).float()
        self.eval()
        try:
            return self(wave).float()
        finally:
            self.train(was_training)

    def describe(self) -> dict:
        return {
            "kind": "embedder",
            "encoder_config": self.encoder.config.to_dict(),
            "audio_config": self.audio_config.to_dict(),
            "feature_config": self.feature_config.to_dict(),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything a checkpoint holds: encoder and normalizer tensors, prefixed."""
        return prefixed("encoder", self.encoder.state_dict()) | prefixed("normalizer", self.normalizer.state_dict())

    def save(self, path: str | Path) -> str:
        self.digest = save_tensors(path, self.state_tensors(), self.describe())
        return self.digest

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> AudioEmbedder:
        tensors, meta, digest = load_tensors(path, kind="embedder")
        model = cls(
            EncoderConfig.from_dict(meta["encoder_config"]),
            AudioConfig(**meta["audio_config"]),
            FeatureConfig.from_dict(meta["feature_config"]),
        )
        model.encoder.load_state_dict(unprefixed("encoder", tensors))
        model.normalizer.load_state_dict(unprefixed("normalizer", tensors))
        model.digest = digest
        return model.to(map_location).eval()
