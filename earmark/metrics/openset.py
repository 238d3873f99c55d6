"""Open-set metrics: how well a "known-ness" score separates known-class clips from unknown ones.

Convention throughout: a higher score means "more likely a class the model knows"; a clip is
accepted as known when its score is >= the threshold and rejected as ``unknown`` otherwise.
"""

from __future__ import annotations

import math

import numpy as np


def _scores(values: object, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} scores must be finite")
    return a


def auroc(known: object, unknown: object) -> float:
    """Area under the ROC curve of known (positive) vs unknown (negative) scores.

    Equals P(score of a random known clip > score of a random unknown clip) + 0.5 P(equal) (the
    Mann-Whitney statistic, ties counted half). NaN when either side is empty.
    """
    k, u = _scores(known, "known"), np.sort(_scores(unknown, "unknown"))
    if len(k) == 0 or len(u) == 0:
        return float("nan")
    below = np.searchsorted(u, k, side="left")
    at_or_below = np.searchsorted(u, k, side="right")
    return float((below + 0.5 * (at_or_below - below)).sum() / (len(k) * len(u)))


def threshold_at_tar(known: object, tar: float = 0.95) -> float:
    """The highest threshold that accepts (score >= threshold) at least a share ``tar`` of the known scores.

    That is the ``ceil(tar * n)``-th largest known score; ties at it make the acceptance rate higher than
    ``tar``, never lower. NaN when there are no known scores.
    """
    if not 0.0 < tar <= 1.0:
        raise ValueError(f"tar must be in (0, 1], got {tar}")
    k = np.sort(_scores(known, "known"))[::-1]
    if len(k) == 0:
        return float("nan")
    rank = max(1, math.ceil(tar * len(k) - 1e-9))  # the fuzz keeps 0.95 * 20 from rounding up to 20.000000004
    return float(k[rank - 1])


def far_at_tar(known: object, unknown: object, tar: float = 0.95) -> float:
    """False-acceptance rate (share of unknown scores >= threshold) at the threshold of ``threshold_at_tar``.

    FAR@95 (``tar=0.95``): the share of unknown clips taken for known ones when 95% of the known clips
    are accepted. NaN when either side is empty.
    """
    u = _scores(unknown, "unknown")
    t = threshold_at_tar(known, tar)
    if len(u) == 0 or math.isnan(t):
        return float("nan")
    return float((u >= t).mean())


def rejection_rates(known: object, unknown: object, threshold: float) -> dict[str, float]:
    """At a fixed threshold: false rejections of known clips and false acceptances of unknown ones (NaN if empty)."""
    k, u = _scores(known, "known"), _scores(unknown, "unknown")
    return {
        "false_rejection": float((k < threshold).mean()) if len(k) else float("nan"),
        "false_acceptance": float((u >= threshold).mean()) if len(u) else float("nan"),
    }


__all__ = ["auroc", "far_at_tar", "rejection_rates", "threshold_at_tar"]
