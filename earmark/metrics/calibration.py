"""Calibration metrics on predicted probabilities: expected calibration error and negative log-likelihood.

Both take class probabilities ``(n, C)`` (rows summing to 1) and the true column of each row; a row
whose true class is not among the columns (a class the model never learned) has probability 0 for it.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
NLL_FLOOR = 1e-12  # probabilities are clamped here before the log, so a confident miss costs ~27.6 nats, not inf


def _as_arrays(proba: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(proba, dtype=np.float64)
    t = np.asarray(y).reshape(-1)
    if p.ndim != 2:
        raise ValueError(f"proba must be 2-D (n, n_classes), got shape {p.shape}")
    if len(p) != len(t):
        raise ValueError(f"{len(p)} probability rows but {len(t)} labels")
    if len(t) and (t.min() < 0 or t.max() >= p.shape[1]):
        raise ValueError(f"labels must be column indices in 0..{p.shape[1] - 1}")
    return p, t.astype(np.int64)


def calibration_bins(proba: object, y: object, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Reliability table of the top-1 confidence in ``n_bins`` equal-width bins ``(k/B, (k+1)/B]``.

    A confidence of exactly 0 falls in the first bin. Returns per bin: ``count``, ``confidence``
    (mean top-1 probability) and ``accuracy`` (share of rows whose argmax is the true class), NaN in
    empty bins. Ties in the argmax go to the lowest column, as ``numpy.argmax``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, t = _as_arrays(proba, y)
    conf = p.max(axis=1) if p.shape[1] else np.zeros(len(p))
    hit = (p.argmax(axis=1) == t).astype(np.float64) if p.shape[1] else np.zeros(len(p))
    # bin k holds lower_k < conf <= upper_k, with edges np.linspace(0, 1, n_bins + 1) as in Guo et al.'s code
    idx = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], conf, side="left")
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return {"count": count.astype(np.int64), "confidence": confidence, "accuracy": accuracy}


def expected_calibration_error(proba: object, y: object, n_bins: int = ECE_BINS) -> float:
    """ECE: sum over bins of (rows in bin / n) * |accuracy - mean confidence| (Guo et al., 2017); NaN if n = 0."""
    bins = calibration_bins(proba, y, n_bins)
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    full = bins["count"] > 0
    gap = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    return float((bins["count"][full] * gap).sum() / n)


def ece_sampling_floor(proba: object, n_bins: int = ECE_BINS, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these top-1 confidences would still show on this many rows.

    Each draw replaces every row's hit by a Bernoulli(top-1 confidence) outcome and measures the ECE;
    the mean over ``draws`` is the sampling noise floor of the metric for this test-set size (with
    a few hundred rows spread over 15 bins it is several points). NaN if there are no rows.
    """
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0 or p.shape[1] == 0:
        return float("nan")
    conf = p.max(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    idx = np.searchsorted(edges, conf, side="left")
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        hit = (rng.random(len(conf)) < conf).astype(np.float64)
        hits = np.bincount(idx, weights=hit, minlength=n_bins)
        out.append(np.abs(hits - conf_sum).sum() / len(conf))  # sum_b n_b |acc_b - conf_b| / n
    return float(np.mean(out))


def negative_log_likelihood(proba: object, y: object) -> float:
    """Mean ``-log p(true class)``, with p clamped at ``NLL_FLOOR``; NaN if n = 0."""
    p, t = _as_arrays(proba, y)
    if len(t) == 0:
        return float("nan")
    return float(-np.log(np.maximum(p[np.arange(len(t)), t], NLL_FLOOR)).mean())


__all__ = [
    "ECE_BINS",
    "calibration_bins",
    "ece_sampling_floor",
    "expected_calibration_error",
    "negative_log_likelihood",
]
