"""Base-session augmentations of normalized log-mel batches, beside SpecAugment and mixup (supervised.py).

Every function takes the batch (batch, n_mels, frames) and a seeded ``torch.Generator`` and draws only
from it (never from the global RNG), so a training stays bit-reproducible given its seed; none
modifies its input. They run on the CPU generator before the batch moves to the training device.

The features are normalized log-mel: ``x = (log P - mean) / (2 * std)`` with the normalizer's dataset
constants (``FeatureScale``), where ``P`` is mel power. Operations on the sound itself are done where
they are exact: a gain is a constant in log power; mixing in noise or another clip adds powers
(``logaddexp`` of the log powers). Label-mixing augmentations (CutMix, virtual classes) return the new
soft targets with the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

LN10_OVER_10 = math.log(10.0) / 10.0  # one dB in natural-log power


@dataclass(frozen=True)
class FeatureScale:
    """The feature normalizer's constants: natural-log mel power = mean + 2 * std * x.

    The default (0, 0.5) reads the features as log power as they are (no normalizer).
    """

    mean: float = 0.0
    std: float = 0.5

    def to_log_power(self, x: Tensor) -> Tensor:
        return self.mean + 2.0 * self.std * x

    def from_log_power(self, r: Tensor) -> Tensor:
        return (r - self.mean) / (2.0 * self.std)

    @property
    def per_db(self) -> float:
        """How far one dB of gain moves a normalized feature."""
        return LN10_OVER_10 / (2.0 * self.std)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def beta_draw(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from ``gen`` (torch's Beta sampler only reads the global RNG)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def random_crop(x: Tensor, frames: int, gen: torch.Generator) -> Tensor:
    """A window of ``frames`` frames from each clip, at a random start per clip; clips no longer than
    that are returned whole. The batch comes out ``frames`` long (the encoder reads any length)."""
    b, _, total = x.shape
    if frames <= 0 or frames >= total:
        return x.clone()
    starts = (torch.rand(b, generator=gen) * (total - frames + 1)).long().clamp_max(total - frames)
    idx = starts[:, None] + torch.arange(frames)[None, :]  # (b, frames)
    return torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1).to(x.device))


def time_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Each clip moved by a random whole number of frames in [-max_shift, max_shift], zero-filled (the
    normalized features' neutral value); the length stays the same."""
    b, _, total = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b,), generator=gen)
    src = torch.arange(total)[None, :] - shifts[:, None]  # output frame t reads input frame t - shift
    valid = (src >= 0) & (src < total)
    idx = src.clamp(0, total - 1)
    out = torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1).to(x.device))
    return out * valid[:, None, :].to(out.dtype).to(x.device)


def random_gain(x: Tensor, max_db: float, scale: FeatureScale, gen: torch.Generator) -> Tensor:
    """Each clip louder or quieter by a gain uniform in [-max_db, max_db] dB (a constant in log power)."""
    gains = _uniform(x.shape[0], -max_db, max_db, gen).to(x.dtype)
    return x + (gains * scale.per_db).to(x.device)[:, None, None]


def _log_mean_power(r: Tensor) -> Tensor:
    """log of the mean power of each clip (over bands and frames), from its log powers ``r``."""
    return torch.logsumexp(r.flatten(1), dim=1) - math.log(r.shape[1] * r.shape[2])


def add_noise(
    x: Tensor, prob: float, snr_min_db: float, snr_max_db: float, scale: FeatureScale, gen: torch.Generator
) -> Tensor:
    """With probability ``prob`` per clip, white noise added at a signal-to-noise ratio uniform in
    [snr_min_db, snr_max_db] (against the clip's mean power). The noise is flat across bands and
    frames with the exponential power fluctuation of a noise periodogram; powers add."""
    b = x.shape[0]
    chosen = torch.rand(b, generator=gen) < prob
    snr = _uniform(b, snr_min_db, snr_max_db, gen)
    fluct = (-torch.log1p(-torch.rand(x.shape, generator=gen))).clamp_min(1e-12)  # Exp(1) power draws
    r = scale.to_log_power(x)
    level = _log_mean_power(r).cpu() - snr * LN10_OVER_10  # log noise power per element
    noise = (level[:, None, None] + fluct.log()).to(x.dtype).to(x.device)
    mixed = scale.from_log_power(torch.logaddexp(r, noise))
    return torch.where(chosen.to(x.device)[:, None, None], mixed, x)


def mix_clips(
    x: Tensor, prob: float, snr_min_db: float, snr_max_db: float, scale: FeatureScale, gen: torch.Generator
) -> Tensor:
    """With probability ``prob`` per clip, another clip of the batch mixed in underneath as background,
    at a signal-to-background ratio uniform in [snr_min_db, snr_max_db]; the clip keeps its label
    (the foreground dominates). Powers add. A batch of one clip is returned unchanged."""
    b = x.shape[0]
    chosen = torch.rand(b, generator=gen) < prob
    snr = _uniform(b, snr_min_db, snr_max_db, gen)
    partner = torch.randperm(b, generator=gen)
    if b < 2:
        return x.clone()
    chosen &= partner != torch.arange(b)
    r = scale.to_log_power(x)
    p = _log_mean_power(r)
    shift = (p - p[partner.to(x.device)]).cpu() - snr * LN10_OVER_10  # background gain in log power
    background = r[partner.to(x.device)] + shift.to(x.dtype).to(x.device)[:, None, None]
    mixed = scale.from_log_power(torch.logaddexp(r, background))
    return torch.where(chosen.to(x.device)[:, None, None], mixed, x)


def cutmix(x: Tensor, target: Tensor, alpha: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """CutMix on spectrograms: one band x time box (area share 1 - lam, lam ~ Beta(alpha, alpha), the
    box's sides sqrt(1 - lam) of the bands and of the frames, clipped at the edges) pasted from a
    permutation of the batch into every clip; targets mixed by the share of the area actually kept."""
    b, m, t = x.shape
    lam = beta_draw(alpha, gen)
    perm = torch.randperm(b, generator=gen)
    side = math.sqrt(1.0 - lam)
    cm, ct = int(round(m * side)), int(round(t * side))
    centre = torch.rand(2, generator=gen)
    m0 = int(min(max(round(float(centre[0]) * m - cm / 2), 0), m - cm))
    t0 = int(min(max(round(float(centre[1]) * t - ct / 2), 0), t - ct))
    out = x.clone()
    p = perm.to(x.device)
    out[:, m0 : m0 + cm, t0 : t0 + ct] = x[p][:, m0 : m0 + cm, t0 : t0 + ct]
    kept = 1.0 - (cm * ct) / (m * t)
    return out, kept * target + (1.0 - kept) * target[perm.to(target.device)]


def virtual_pair_class(a: Tensor, b: Tensor, num_classes: int, virtual_classes: int) -> Tensor:
    """The virtual class id (num_classes .. num_classes + virtual_classes - 1) of each unordered pair of
    different real classes (a, b): their triangular pair index, modulo the number of virtual classes."""
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    pair = hi * (hi - 1) // 2 + lo
    return num_classes + pair % virtual_classes


def virtual_mix(
    x: Tensor, y: Tensor, num_classes: int, virtual_classes: int, prob: float, spread: float,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward-compatible virtual classes (after FACT's instance mixing): with probability ``prob`` per
    clip, the clip is mixed with a clip of another class of the batch (weight uniform in
    0.5 +- ``spread``) and labelled with that class pair's virtual class (:func:`virtual_pair_class`).
    Returns (batch, labels over num_classes + virtual_classes, which clips became virtual); pairs of
    the same class stay real."""
    bsz = x.shape[0]
    chosen = torch.rand(bsz, generator=gen) < prob
    lam = _uniform(bsz, 0.5 - spread, 0.5 + spread, gen).to(x.dtype)
    partner = torch.randperm(bsz, generator=gen)
    y_cpu = y.cpu()
    chosen &= y_cpu != y_cpu[partner]
    p = partner.to(x.device)
    w = lam.to(x.device)[:, None, None]
    mixed = w * x + (1 - w) * x[p]
    out = torch.where(chosen.to(x.device)[:, None, None], mixed, x)
    labels = torch.where(chosen, virtual_pair_class(y_cpu, y_cpu[partner], num_classes, virtual_classes), y_cpu)
    return out, labels.to(y.device), chosen.to(y.device)
