"""Synthetic audio files for model / service tests: a class is a pitch (harmonic tone) with a little noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


def tone(freq: float, seconds: float = 1.0, seed: int = 0, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f = freq * (1 + 0.02 * rng.standard_normal())
    x = sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3) if f * k < 0.45 * rate)
    x = x * np.minimum(1, 20 * t) + 0.05 * rng.standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def write_class(folder: Path, name: str, freq: float, n: int, seed: int = 0, seconds: float = 1.0) -> list[Path]:
    """``n`` wav files of one class under ``folder/name``."""
    d = folder / name
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = d / f"{name}-{seed}-{i}.wav"
        sf.write(p, tone(freq, seconds, seed=seed * 1000 + i), RATE)
        paths.append(p)
    return paths


FREQS = {"low": 200.0, "mid": 700.0, "high": 1800.0, "whistle": 4500.0}
