"""Calibrated probabilities and open-set rejection for the closed-form learners.

A learner's ``decision_function`` ranks classes, but its softmax is no probability: NCM's cosines
over 0.1, ridge outputs near [0, 1] (analytic, RanPAC), LDA log-likelihoods that grow with the
dimension. Two small, storable pieces fix what the numbers mean:

* ``Calibrator``: one temperature T; calibrated probabilities are ``softmax(scores / T)``. T minimises
  the negative log-likelihood of held-out scores (a 1-D convex problem in 1/T, solved by safeguarded
  Newton on log(1/T) inside a bracket, float64). Temperature scaling never changes the argmax.
* ``UnknownDetector``: a "known-ness" score per clip (``SCORES``; higher = more likely a known class)
  and a threshold below which the prediction is ``unknown``. The threshold is an order statistic of
  the scores of held-out *known-class* clips chosen for a target false-rejection rate (5% by default):
  with n held-out scores it is the ``floor(target * (n + 1))``-th smallest, so a fresh known clip is
  rejected with probability at most the target when held-out and fresh clips are exchangeable
  (the split-conformal argument).

Where held-out scores come from: ``HeldOutCalibration`` keeps a *shadow* copy of the learner that
learns every session except a stratified held-out share of it (20% by default, at least one clip of
each class with two or more clips, never a class's only clip), and a pool of those held-out clips'
embeddings. After each session the shadow scores the pool (all classes seen so far, each clip unseen
by the shadow) and T and the threshold are refitted: one extra ``partial_fit`` per session, as cheap
as the learner itself for the closed-form heads. The real learner learns everything, so its accuracy
is untouched; the calibration it gets is the shadow's (trained on ~80% of the data, so slightly more
cautious than needed). Nothing from a test fold is used.

The Mahalanobis scores need class Gaussians. LDA keeps them; for any other head ``HeldOutCalibration``
keeps a *density*: a streaming LDA over the same embeddings (class sums and counts, the Gram, per-class
factors), which learns, forgets and merges with the head, so the head's own scores stay as they are
while "unknown" is judged by the Gaussians. Two of them, like the learner and its shadow: the density of
everything learned scores new clips, the shadow's density (without the held-out share) scores the pool
for the threshold.

Everything stored is plain floats and tensors: ``to_dict()/from_dict()`` for the calibrator, the
detector and ``OpenSetCalibration`` (both together); ``HeldOutCalibration.state()`` adds the shadow's
``state_dict``, the densities' and the pool.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from earmark.learners.base import ArrayLike, IncrementalLearner
from earmark.learners.lda import LDAConfig, StreamingLDALearner
from earmark.learners.statistics import RidgeStatistics

UNKNOWN = -1  # the label of a rejected prediction
SCORES = ("msp", "energy", "max_score", "mahalanobis", "relative_mahalanobis")
SCORE_HELP = {
    "msp": "maximum calibrated probability (any learner)",
    "energy": "T * logsumexp(scores / T), the negative free energy (any learner)",
    "max_score": "the best raw score: cosine for ncm, ridge output for analytic/ranpac (any learner)",
    "mahalanobis": "minus the smallest squared Mahalanobis distance to a class mean under the shared "
                   "shrunk covariance (lda's own; any other head: a density kept beside it)",
    "relative_mahalanobis": "the mahalanobis score minus the same distance to one Gaussian of all known clips "
                            "(Ren et al. 2021): what is far from every class but also from the data as a whole "
                            "counts less (lda's own Gaussians; any other head: a density kept beside it)",
}
GAUSSIAN_SCORES = ("mahalanobis", "relative_mahalanobis")


def is_gaussian(learner: IncrementalLearner) -> bool:
    """Whether the learner keeps LDA's class Gaussians itself (``means_``, ``covariance_``, ``config.shrinkage``)."""
    return all(hasattr(type(learner), a) for a in ("means_", "covariance_")) and hasattr(learner.config, "shrinkage")


def new_density(shrinkage: float = 1e-4) -> StreamingLDALearner:
    """The class Gaussians kept beside a head that has none, for the Mahalanobis scores.

    Shrinkage 1e-4 (Deep SLDA's default, LDA's here): on the embedded default's session 0 it gave the relative
    score's best AUROC among 1e-4, 1e-2, 0.1 and 0.3 (docs/unknown.md).
    """
    return StreamingLDALearner(LDAConfig(shrinkage=shrinkage))


def _f64(scores: ArrayLike) -> Tensor:
    t = scores.detach() if isinstance(scores, Tensor) else torch.as_tensor(np.asarray(scores))
    if t.ndim != 2:
        raise ValueError(f"scores must be 2-D (n, n_classes), got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.float64)


# --------------------------------------------------------------------------- temperature


def _weights(weights: ArrayLike | None, n: int) -> Tensor:
    """Row weights normalised to sum to 1 (uniform when None), float64."""
    if weights is None:
        return torch.full((n,), 1.0 / max(n, 1), dtype=torch.float64)
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float64).reshape(-1)
    if len(w) != n or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or (n and not float(w.sum()) > 0):
        raise ValueError(f"weights must be {n} finite non-negative numbers, not all zero")
    return w / w.sum() if n else w


def class_balanced_weights(targets: ArrayLike) -> Tensor:
    """Row weights ``1 / (rows of its class)``: every class counts once, as in a test set with equal clips per class.

    Why: the held-out pool has ~6 clips of each base class but one of each 5-shot class, while a test fold has
    as many of either; unweighted, the base classes' calibration would stand in for the few-shot ones'.
    """
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    if len(t) == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].to(torch.float64)


def temperature_nll(
    scores: ArrayLike, targets: ArrayLike, temperature: float, weights: ArrayLike | None = None
) -> float:
    """(Weighted) mean negative log-likelihood of ``softmax(scores / temperature)`` at the target columns."""
    s, t = _f64(scores), torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    z = s / temperature
    return float(((torch.logsumexp(z, 1) - z[torch.arange(len(t)), t]) * _weights(weights, len(t))).sum())


def fit_temperature(
    scores: ArrayLike, targets: ArrayLike, *, weights: ArrayLike | None = None,
    beta_range: tuple[float, float] = (1e-3, 1e4), tol: float = 1e-10,
) -> float:
    """The temperature T minimising the mean NLL of ``softmax(scores / T)`` at the ``targets`` columns.

    With beta = 1/T the NLL ``mean(logsumexp(beta s) - beta s_y)`` is convex in beta, its derivative
    ``mean(E_p[s] - s_y)`` non-decreasing, so the optimum is where that derivative changes sign. We
    search v = log(beta) inside ``beta * scale`` in ``beta_range`` (``scale`` = the standard deviation
    of the scores, making the bracket unit-free), by Newton steps that fall back on bisection whenever
    they would leave the bracket. Held-out scores that are perfectly separated push beta to the top of
    the bracket (very confident; T = scale / 1e4); scores that carry no information push it to the
    bottom (near-uniform probabilities). Constant scores, or no rows, give T = 1. ``weights``: per-row
    weights of the NLL (e.g. ``class_balanced_weights``); uniform when None.
    """
    s, t = _f64(scores), torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
    if len(s) != len(t):
        raise ValueError(f"{len(s)} score rows but {len(t)} targets")
    if len(t) == 0 or s.shape[1] < 2:
        return 1.0
    if int(t.min()) < 0 or int(t.max()) >= s.shape[1]:
        raise ValueError(f"targets must be column indices in 0..{s.shape[1] - 1}")
    scale = float(s.std())
    if not scale > 0:
        return 1.0
    s_y = s[torch.arange(len(t)), t]
    w = _weights(weights, len(t))

    def derivatives(v: float) -> tuple[float, float]:
        """d/dv and d2/dv2 of NLL(exp(v)): beta f'(beta) and beta f' + beta^2 f''."""
        beta = math.exp(v)
        p = torch.softmax(beta * s, dim=1)
        mean = (p * s).sum(1)
        var = (p * s.square()).sum(1) - mean.square()
        f1 = float(((mean - s_y) * w).sum())
        f2 = float((var.clamp_min(0) * w).sum())
        return beta * f1, beta * f1 + beta * beta * f2

    lo, hi = math.log(beta_range[0] / scale), math.log(beta_range[1] / scale)
    g_lo, _ = derivatives(lo)
    if g_lo >= 0:
        return 1.0 / math.exp(lo)
    g_hi, _ = derivatives(hi)
    if g_hi <= 0:
        return 1.0 / math.exp(hi)
    v = 0.5 * (lo + hi)
    for _ in range(200):
        g1, g2 = derivatives(v)
        if g1 == 0:
            break
        if g1 < 0:
            lo = v
        else:
            hi = v
        step = v - g1 / g2 if g2 > 0 else math.nan
        v_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(v_new - v) < tol or hi - lo < tol:
            v = v_new
            break
        v = v_new
    return 1.0 / math.exp(v)


# --------------------------------------------------------------------------- monotone score transforms

TRANSFORMS = ("identity", "log")
TRANSFORM_HELP = {
    "identity": "the raw scores (cosines, log-likelihoods)",
    "log": "log(s) above floor, continued below it by its tangent (strictly increasing, defined for s <= 0): for "
           "ridge outputs near [0, 1], softmax(log(s) / T) is s^(1/T) renormalised, a power of the regression's "
           "own probability estimate rather than a softmax of it",
}


def transform_scores(scores: ArrayLike, kind: str = "identity", floor: float = 1e-3) -> Tensor:
    """A monotone map of each raw score before the temperature (so the argmax is unchanged), float64."""
    s = _f64(scores)
    if kind == "identity":
        return s
    if kind == "log":  # the tangent at floor below it: no ties among small or negative outputs, argmax kept
        return torch.where(s >= floor, torch.log(s.clamp_min(floor)), math.log(floor) + (s - floor) / floor)
    raise ValueError(f"unknown score transform {kind!r}; choose from {', '.join(TRANSFORMS)}")


# --------------------------------------------------------------------------- top-label recalibration

TOP_LABEL = ("none", "platt", "histogram", "isotonic")


def _logit(p: Tensor) -> Tensor:
    return torch.logit(p.clamp(1e-12, 1.0 - 1e-12))


def _pav(x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted isotonic (non-decreasing) regression of y on x by pool-adjacent-violators: (knots, values)."""
    order = torch.argsort(x, stable=True)
    xs, ys, ws = x[order].tolist(), y[order].tolist(), w[order].tolist()
    blocks: list[list[float]] = []  # [weighted sum, weight, x of the block's first row, x of its last]
    for xi, yi, wi in zip(xs, ys, ws, strict=True):
        blocks.append([yi * wi, wi, xi, xi])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] >= blocks[-1][0] * blocks[-2][1]:
            last = blocks.pop()
            blocks[-1][0] += last[0]
            blocks[-1][1] += last[1]
            blocks[-1][3] = last[3]
    knots, values = [], []
    for total, weight, lo, hi in blocks:  # each block a flat step from its first x to its last
        v = total / weight if weight > 0 else 0.0
        knots += [lo, hi] if hi > lo else [lo]
        values += [v, v] if hi > lo else [v]
    return torch.tensor(knots, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)


@dataclass
class TopLabelMap:
    """A monotone map of the top-1 confidence onto the held-out hit rate ("top-label calibration").

    Gupta & Ramdas (2021): calibrating only what ECE and a user read, the best class's probability,
    takes far fewer held-out clips than calibrating every class's. ``kind``: ``none`` (identity),
    ``platt`` (``sigmoid(a logit(p) + b)``, 2 floats), ``histogram`` (equal-mass bins of the held-out
    confidences, each mapped to its bin's hit rate; ``knots`` = the upper bin edges but the last,
    ``values`` = one rate per bin) or ``isotonic`` (pool-adjacent-violators, linear between ``knots``).
    Fitted by weighted maximum likelihood / weighted averages of hits.
    """

    kind: str = "none"
    a: float = 1.0
    b: float = 0.0
    bins: int = 10
    knots: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in TOP_LABEL:
            raise ValueError(f"unknown top-label map {self.kind!r}; choose from {', '.join(TOP_LABEL)}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")

    def fit(self, confidence: ArrayLike, hit: ArrayLike, weights: ArrayLike | None = None) -> TopLabelMap:
        """Fit on held-out top-1 confidences ``(n,)`` and whether that top-1 was right ``(n,)``; returns self."""
        p = torch.as_tensor(np.asarray(confidence), dtype=torch.float64).reshape(-1)
        h = torch.as_tensor(np.asarray(hit), dtype=torch.float64).reshape(-1)
        w = _weights(weights, len(p))
        if self.kind == "none" or len(p) == 0:
            return self
        if self.kind == "platt":
            self.a, self.b = _fit_platt(_logit(p), h, w)
        elif self.kind == "histogram":
            order = torch.argsort(p, stable=True)
            ps, hs, ws = p[order], h[order], w[order]
            cum = torch.cumsum(ws, 0)
            cuts = torch.searchsorted(cum, torch.arange(1, self.bins, dtype=torch.float64) / self.bins * cum[-1])
            bounds = sorted({0, *cuts.tolist(), len(ps)})
            knots, values = [], []
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                values.append(float((hs[lo:hi] * ws[lo:hi]).sum() / ws[lo:hi].sum().clamp_min(1e-300)))
                knots.append(float(ps[hi - 1]))
            self.knots, self.values = knots[:-1], values
        else:
            knots, values = _pav(p, h, w)
            self.knots, self.values = knots.tolist(), values.tolist()
        return self

    def __call__(self, confidence: Tensor) -> Tensor:
        """The recalibrated confidence, float64, same shape."""
        p = confidence.to(torch.float64)
        if self.kind == "none":
            return p
        if self.kind == "platt":
            return torch.sigmoid(self.a * _logit(p) + self.b)
        if not self.values:
            return p
        knots, values = torch.tensor(self.knots, dtype=torch.float64), torch.tensor(self.values, dtype=torch.float64)
        if self.kind == "histogram":
            return values[torch.searchsorted(knots, p, side="left")]
        return _interp(p, knots, values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": float(self.a), "b": float(self.b), "bins": int(self.bins),
                "knots": [float(v) for v in self.knots], "values": [float(v) for v in self.values]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TopLabelMap:
        return cls(kind=d["kind"], a=float(d.get("a", 1.0)), b=float(d.get("b", 0.0)), bins=int(d.get("bins", 10)),
                   knots=[float(v) for v in d.get("knots", [])], values=[float(v) for v in d.get("values", [])])


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """``numpy.interp`` in torch: linear between knots, constant beyond them."""
    if len(xp) == 1:
        return torch.full_like(x, float(fp[0]))
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp_min(1e-300), torch.ones_like(x))
    return torch.where(x <= xp[0], fp[0], torch.where(x >= xp[-1], fp[-1], y0 + t.clamp(0, 1) * (y1 - y0)))


def _fit_platt(z: Tensor, hit: Tensor, w: Tensor, iters: int = 100) -> tuple[float, float]:
    """Weighted logistic regression of ``hit`` on ``z`` (Newton, 2 parameters, a tiny ridge keeps it finite).

    In numpy with the 2 x 2 Newton system in closed form: it is refitted after every learn, and a hundred
    iterations of small torch ops (where the hits are separable and the fit creeps) cost milliseconds.
    """
    zn, hn, wn = (t.detach().cpu().numpy().astype(np.float64) for t in (z, hit, w))
    a, b, ridge = 1.0, 0.0, 1e-6
    for _ in range(iters):
        with np.errstate(over="ignore"):
            q = 1.0 / (1.0 + np.exp(-(a * zn + b)))
        r, s = wn * (q - hn), wn * q * (1.0 - q)
        ga, gb = float(r @ zn) + ridge * a, float(r.sum()) + ridge * b
        haa, hab, hbb = float(s @ (zn * zn)) + ridge, float(s @ zn), float(s.sum()) + ridge
        det = haa * hbb - hab * hab
        if not (math.isfinite(det) and det > 0):
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if max(abs(da), abs(db)) < 1e-10:
            break
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:  # no monotone fit: keep the confidences
        return 1.0, 0.0
    return a, b


def recalibrate_top(proba: Tensor, top_map: TopLabelMap) -> Tensor:
    """Rows of ``proba`` with the top-1 probability replaced by ``top_map``'s and the rest rescaled to fill 1.

    The other classes keep their ratios. The new top-1 is kept above the runner-up (by 1e-6, which float32
    still resolves) so the argmax never changes (a row where it would keeps its old probabilities). Float64,
    rows summing to 1.
    """
    p = proba.to(torch.float64)
    if top_map.kind == "none" or p.shape[1] < 2 or len(p) == 0:
        return p
    rows = torch.arange(len(p))
    p1, top = p.max(1)
    q1 = top_map(p1).clamp(0.0, 1.0)
    rest = p.clone()
    rest[rows, top] = 0.0
    mass = rest.sum(1, keepdim=True)
    uniform = torch.full_like(rest, 1.0 / (p.shape[1] - 1))
    uniform[rows, top] = 0.0
    rest = torch.where(mass > 0, rest / mass.clamp_min(1e-300), uniform)  # saturated rows: spread it evenly
    share = rest.max(1).values  # q1 > (1 - q1) * share: the top stays on top, by a margin float32 keeps
    q1 = torch.minimum(torch.maximum(q1, share / (1.0 + share) + 1e-6), torch.ones_like(q1))
    out = rest * (1.0 - q1).unsqueeze(1)
    out[rows, top] = q1
    kept = out.argmax(1) == top
    return torch.where(kept.unsqueeze(1), out, p)


# --------------------------------------------------------------------------- the calibrator


@dataclass
class Calibrator:
    """A learner's raw scores (``decision_function``) to probabilities: ``top(softmax(transform(scores) / T))``.

    ``transform``: a monotone map of each score (``TRANSFORMS``); T: fitted by NLL; ``top_label``: a monotone
    recalibration of the top-1 probability (``TopLabelMap``), the rest rescaled; ``balanced``: every held-out
    class weighs the same in both fits. All three keep the argmax. The defaults are plain temperature scaling.
    """

    temperature: float = 1.0
    n_samples: int = 0  # held-out rows it was fitted on (0: not fitted, T = 1)
    transform: str = "identity"
    floor: float = 1e-3  # the clip of the log transform
    top_label: TopLabelMap = field(default_factory=TopLabelMap)
    balanced: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown score transform {self.transform!r}; choose from {', '.join(TRANSFORMS)}")
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"floor must be a finite number > 0, got {self.floor}")

    def fit(self, scores: ArrayLike, targets: ArrayLike) -> Calibrator:
        """Fit T (and the top-label map) on held-out raw scores ``(n, C)`` and their true columns ``(n,)``."""
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        w = class_balanced_weights(t) if self.balanced else None
        z = transform_scores(scores, self.transform, self.floor)
        self.temperature = fit_temperature(z, t, weights=w)
        self.n_samples = len(t)
        if self.top_label.kind != "none" and len(t):
            p = torch.softmax(z / self.temperature, dim=1)
            conf, best = p.max(1)
            self.top_label.fit(conf, (best == t).to(torch.float64), w)
        return self

    def logits(self, scores: ArrayLike) -> Tensor:
        """``transform(scores) / T`` in float64 (before the top-label map)."""
        return transform_scores(scores, self.transform, self.floor) / self.temperature

    def proba(self, scores: ArrayLike) -> Tensor:
        """Calibrated probabilities, float32 rows summing to 1."""
        return recalibrate_top(torch.softmax(self.logits(scores), dim=1), self.top_label).float()

    def predict_proba(self, learner: IncrementalLearner, X: ArrayLike) -> Tensor:
        """Calibrated ``predict_proba`` of ``learner`` on ``X`` (columns in ``learner.classes_`` order)."""
        return self.proba(learner.decision_function(X))

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature), "n_samples": int(self.n_samples),
                "transform": self.transform, "floor": float(self.floor), "top_label": self.top_label.to_dict(),
                "balanced": bool(self.balanced)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        """From ``to_dict``; a dict from before the transform and the top-label map is plain temperature scaling."""
        top = TopLabelMap.from_dict(d["top_label"]) if "top_label" in d else TopLabelMap()
        return cls(temperature=float(d["temperature"]), n_samples=int(d.get("n_samples", 0)),
                   transform=d.get("transform", "identity"), floor=float(d.get("floor", 1e-3)), top_label=top,
                   balanced=bool(d.get("balanced", False)))

    def unfitted(self) -> Calibrator:
        """A fresh calibrator with these settings (transform, floor, top-label kind and bins, balance)."""
        return Calibrator(transform=self.transform, floor=self.floor, balanced=self.balanced,
                          top_label=TopLabelMap(kind=self.top_label.kind, bins=self.top_label.bins))


# --------------------------------------------------------------------------- known-ness scores


def _whiten(cov: Tensor, eps: float) -> Tensor:
    """The Cholesky factor L of ``(1 - eps) cov + eps I`` (a tiny ridge where that is singular), float64."""
    A = (1.0 - eps) * cov
    A.diagonal().add_(eps)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:  # singular without shrinkage: a tiny ridge, like the pinv LDA falls back on
        A.diagonal().add_(1e-10 * float(A.diagonal().mean().clamp_min(1e-300)))
        L = torch.linalg.cholesky(A)
    return L


def background_distances(learner: IncrementalLearner, X: ArrayLike) -> Tensor:
    """Squared Mahalanobis distance ``(n,)`` to one Gaussian of every learned clip, shrunk like the class model.

    Its mean is the count-weighted mean of the class means; its covariance the within-class one plus the
    between-class scatter of the means: both from LDA's sums, no clip kept.
    """
    x = learner._as_features(X).to(device="cpu", dtype=torch.float64)
    means = learner.means_.to(device="cpu", dtype=torch.float64)
    w = learner.class_counts.to(device="cpu", dtype=torch.float64)
    w = w / w.sum()
    mu = w @ means
    between = (means - mu).T @ ((means - mu) * w.unsqueeze(1))
    L = _whiten(learner.covariance_.to(device="cpu", dtype=torch.float64) + between, float(learner.config.shrinkage))
    return torch.linalg.solve_triangular(L, (x - mu).T, upper=False).T.square().sum(1)


def mahalanobis_distances(learner: IncrementalLearner, X: ArrayLike) -> Tensor:
    """Squared Mahalanobis distances ``(n, C)`` to the class means under LDA's shrunk shared covariance.

    Uses the learner's ``means_``, ``covariance_`` and ``config.shrinkage`` (the ``lda`` learner);
    ``(1 - eps) S + eps I`` is factored once by Cholesky and both sides whitened.
    """
    if not is_gaussian(learner):
        raise TypeError(
            f"the mahalanobis score needs an LDA-style learner (means_, covariance_, config.shrinkage); "
            f"{type(learner).__name__} has none"
        )
    x = learner._as_features(X).to(device="cpu", dtype=torch.float64)
    means = learner.means_.to(device="cpu", dtype=torch.float64)
    L = _whiten(learner.covariance_.to(device="cpu", dtype=torch.float64), float(learner.config.shrinkage))
    zx = torch.linalg.solve_triangular(L, x.T, upper=False).T
    zm = torch.linalg.solve_triangular(L, means.T, upper=False).T
    return torch.cdist(zx, zm).square()


def default_score(learner: IncrementalLearner) -> str:
    """The known-ness score a product model uses for this learner family.

    ``relative_mahalanobis`` for LDA-style learners, ``max_score`` (the best cosine) for the prototype heads
    (ncm, teen), ``energy`` otherwise. Why not ``msp`` everywhere: when held-out clips are well separated
    the fitted temperature is tiny and the best probability saturates at 1.0 for known and never-seen
    sounds alike (measured on separable synthetic data: AUROC 0.50 with msp, 1.00 with these scores). On
    the embedded default's near-unknowns the relative Mahalanobis score was the best for lda (AUROC 0.69
    at session 0 against 0.58 for the plain one at lda's shrinkage 1e-4); the others are within a few
    points of each other (docs/unknown.md).
    """
    if is_gaussian(learner):
        return "relative_mahalanobis"
    return "max_score" if learner.name in ("ncm", "teen") else "energy"


def default_calibrator(learner: IncrementalLearner) -> Calibrator:
    """The (unfitted) calibrator a product model uses for this learner family.

    Every family: class-balanced fits (the pool holds ~6 clips of each base class, one of each 5-shot class).
    All but the prototype heads (ncm, teen) add a Platt map of the top-1 confidence: one temperature leaves
    the shape of LDA's and the ridge heads' confidences wrong, and the map fixed it on clean held-out clips
    (mean ECE 0.10 -> 0.05 on the embedded default with a validation fold), while for ncm it only added
    noise. The log transform did not beat the identity for the ridge heads there (docs/unknown.md).
    """
    prototype = learner.name in ("ncm", "teen")
    return Calibrator(balanced=True, top_label=TopLabelMap("none" if prototype else "platt"))


def known_score_from(scores: ArrayLike, kind: str = "msp", temperature: float = 1.0) -> Tensor:
    """Known-ness ``(n,)`` float64 from raw scores ``(n, C)`` for the score-based kinds (not mahalanobis)."""
    s = _f64(scores)
    if kind == "msp":
        return torch.softmax(s / temperature, dim=1).max(1).values
    if kind == "energy":
        return temperature * torch.logsumexp(s / temperature, dim=1)
    if kind == "max_score":
        return s.max(1).values
    if kind in ("mahalanobis", "relative_mahalanobis"):
        raise ValueError(f"the {kind} score needs the embeddings: use known_score(learner, X, ...)")
    raise ValueError(f"unknown score kind {kind!r}; choose from {', '.join(SCORES)}")


def known_score(
    learner: IncrementalLearner, X: ArrayLike, kind: str = "msp", calibrator: Calibrator | None = None,
    scores: Tensor | None = None, density: IncrementalLearner | None = None,
) -> Tensor:
    """Known-ness of each row of ``X`` under ``learner`` (higher = more likely a known class), float64 ``(n,)``.

    ``scores``: the learner's ``decision_function(X)`` when already computed. With a ``calibrator``, ``msp`` is
    its calibrated top-1 probability and ``energy`` uses its transformed scores and temperature. ``density``:
    the class Gaussians the Mahalanobis kinds read (default: the learner's own, an LDA-style learner's).
    """
    if kind in GAUSSIAN_SCORES:
        gauss = learner if density is None else density
        nearest = mahalanobis_distances(gauss, X).min(1).values  # first: its TypeError off LDA-style learners
        return -nearest if kind == "mahalanobis" else background_distances(gauss, X) - nearest
    if scores is None:
        scores = learner.decision_function(X)
    if calibrator is not None and kind == "msp":
        return calibrator.proba(scores).to(torch.float64).max(1).values
    if calibrator is not None and kind == "energy":
        return calibrator.temperature * torch.logsumexp(calibrator.logits(scores), dim=1)
    return known_score_from(scores, kind, 1.0)


@dataclass
class UnknownDetector:
    """Rejects a prediction as ``unknown`` when its known-ness score is below ``threshold``.

    ``fit`` sets the threshold from held-out known-class scores for the false-rejection rate
    ``target_frr``. Unfitted (``threshold = -inf``) it rejects nothing.
    """

    score: str = "msp"
    target_frr: float = 0.05
    threshold: float = -math.inf
    n_samples: int = 0

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown score kind {self.score!r}; choose from {', '.join(SCORES)}")
        if not 0.0 <= self.target_frr < 1.0:
            raise ValueError(f"target_frr must be in [0, 1), got {self.target_frr}")
        if math.isnan(self.threshold):
            raise ValueError("threshold must not be NaN")

    def fit(self, known_scores: ArrayLike) -> UnknownDetector:
        """Threshold = the ``floor(target_frr * (n + 1))``-th smallest of n held-out known scores.

        A fresh exchangeable known clip then falls strictly below it with probability at most
        ``target_frr`` (split conformal); with too few scores for that (``target_frr * (n + 1) < 1``)
        nothing is rejected.
        """
        k = np.sort(np.asarray(known_scores, dtype=np.float64).reshape(-1))
        if not np.isfinite(k).all():
            raise ValueError("known scores must be finite")
        j = math.floor(self.target_frr * (len(k) + 1) + 1e-9)
        self.threshold = float(k[j - 1]) if j >= 1 else -math.inf
        self.n_samples = len(k)
        return self

    def reject(self, scores: ArrayLike, threshold: float | None = None) -> Tensor:
        """Boolean ``(n,)``: True where the known-ness score is below the threshold (``threshold`` overrides)."""
        thr = self.threshold if threshold is None else float(threshold)
        return torch.as_tensor(np.asarray(scores, dtype=np.float64)).reshape(-1) < thr

    def to_dict(self) -> dict[str, Any]:
        thr = self.threshold
        return {"score": self.score, "target_frr": float(self.target_frr),
                "threshold": None if thr == -math.inf else float(thr), "n_samples": int(self.n_samples)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnknownDetector:
        thr = d.get("threshold")
        return cls(score=d["score"], target_frr=float(d["target_frr"]),
                   threshold=-math.inf if thr is None else float(thr), n_samples=int(d.get("n_samples", 0)))


@dataclass
class OpenSetPrediction:
    """Predictions with rejection: ``labels`` holds ``UNKNOWN`` (-1) where ``rejected``."""

    labels: Tensor  # (n,) long: learner labels, UNKNOWN where rejected
    best: Tensor  # (n,) long: the best known label, rejected or not
    proba: Tensor  # (n, C) float32 calibrated probabilities, columns in classes_ order
    score: Tensor  # (n,) float64 known-ness score
    rejected: Tensor  # (n,) bool
    threshold: float


@dataclass
class OpenSetCalibration:
    """A calibrator and an unknown detector, stored together (``to_dict`` is JSON-able)."""

    calibrator: Calibrator = field(default_factory=Calibrator)
    detector: UnknownDetector = field(default_factory=UnknownDetector)

    def proba(self, learner: IncrementalLearner, X: ArrayLike) -> Tensor:
        return self.calibrator.predict_proba(learner, X)

    def score(
        self, learner: IncrementalLearner, X: ArrayLike, scores: Tensor | None = None,
        density: IncrementalLearner | None = None,
    ) -> Tensor:
        return known_score(learner, X, self.detector.score, self.calibrator, scores, density)

    @torch.no_grad()
    def predict(
        self, learner: IncrementalLearner, X: ArrayLike, threshold: float | None = None, reject_unknown: bool = True,
        density: IncrementalLearner | None = None,
    ) -> OpenSetPrediction:
        """Calibrated probabilities, the best label, and ``UNKNOWN`` where the known-ness score is too low.

        ``threshold``: None uses the stored one, a float overrides it for this call;
        ``reject_unknown=False`` never rejects (the scores are still returned). ``density``: see ``known_score``.
        """
        scores = learner.decision_function(X)
        proba = self.calibrator.proba(scores)
        best = learner.classes_[scores.argmax(1)].cpu()
        score = self.score(learner, X, scores, density)
        thr = self.detector.threshold if threshold is None else float(threshold)
        rejected = self.detector.reject(score, thr) if reject_unknown else torch.zeros(len(best), dtype=torch.bool)
        labels = torch.where(rejected, torch.full_like(best, UNKNOWN), best)
        return OpenSetPrediction(labels, best, proba, score, rejected, thr if reject_unknown else -math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {"calibrator": self.calibrator.to_dict(), "detector": self.detector.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenSetCalibration:
        return cls(Calibrator.from_dict(d["calibrator"]), UnknownDetector.from_dict(d["detector"]))


# --------------------------------------------------------------------------- held-out fitting


def stratified_holdout(y: ArrayLike, fraction: float = 0.2, seed: int = 0, step: int = 0) -> tuple[Tensor, Tensor]:
    """Row indices (fit, held_out) of a per-class split of labels ``y``.

    A class with n >= 2 rows holds out ``max(1, round(fraction * n))`` of them but never all but none;
    a class with a single row keeps it for fitting. Seeded by (seed, step), reproducible.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(y).reshape(-1)
    rng = np.random.default_rng([int(seed), int(step)])
    fit, held = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(len(rows))]
        k = 0 if len(rows) < 2 else min(max(1, round(fraction * len(rows))), len(rows) - 1)
        held.append(rows[:k])
        fit.append(rows[k:])
    def rows_of(parts: list[np.ndarray]) -> Tensor:
        return torch.as_tensor(np.sort(np.concatenate(parts)) if parts else np.zeros(0), dtype=torch.long)

    return rows_of(fit), rows_of(held)


class HeldOutCalibration:
    """Fits an ``OpenSetCalibration`` session by session from a shadow learner and a held-out pool.

    ``learner``: the (unfitted) learner to shadow; it is deep-copied, never modified. Call
    ``update(X, y)`` with each session's training data (in addition to the real learner's own
    ``partial_fit(X, y)``): the shadow learns the session minus its held-out share, the held-out clips
    join the pool (at most ``max_per_class`` per class are kept), then T is refitted on the shadow's
    pool scores and the threshold on the pool's calibrated known-ness scores.

    ``density``: keep class Gaussians beside a learner that has none (see the module docstring); None (the
    default) keeps them exactly when ``score`` is a Mahalanobis kind and the learner is not LDA-style.
    """

    def __init__(
        self, learner: IncrementalLearner, *, holdout: float = 0.2, seed: int = 0, score: str = "msp",
        target_frr: float = 0.05, max_per_class: int | None = 50, calibrator: Calibrator | None = None,
        density: bool | None = None,
    ) -> None:
        if learner.is_fitted:
            raise ValueError("HeldOutCalibration shadows a learner from its first session: pass it unfitted")
        self.shadow = copy.deepcopy(learner)
        for part in self.shadow.modules():  # its scores only feed T and the threshold: no 1e-11 error probe
            if isinstance(part, RidgeStatistics):
                part.solver.probe = False
        self.holdout = holdout
        self.seed = seed
        self.max_per_class = max_per_class
        template = Calibrator() if calibrator is None else calibrator.unfitted()
        self.calibration = OpenSetCalibration(template, UnknownDetector(score=score, target_frr=target_frr))
        self.pool_X = torch.zeros(0, 0)
        self.pool_y = torch.zeros(0, dtype=torch.long)
        self.steps = 0
        self.last_held_out = torch.zeros(0, dtype=torch.long)  # rows of the last update's X that were held out
        if density is None:
            density = score in GAUSSIAN_SCORES and not is_gaussian(learner)
        if density and is_gaussian(learner):
            raise ValueError(f"{learner.name} keeps its own class Gaussians: it needs no density beside it")
        if not density and score in GAUSSIAN_SCORES and not is_gaussian(learner):
            raise ValueError(f"the {score} score on {learner.name} needs the density beside it (density=True)")
        # Class Gaussians of everything learned (scores new clips) and of what the shadow learned (the pool).
        self.density = new_density() if density else None
        self.shadow_density = new_density() if density else None

    @torch.no_grad()
    def update(
        self, X: ArrayLike, y: ArrayLike, held_out: tuple[ArrayLike, ArrayLike] | None = None
    ) -> OpenSetCalibration:
        """Learn a session: the shadow fits ``X, y`` minus the held-out share, which joins the pool; refit.

        ``held_out``: validation clips ``(X_val, y_val)`` of classes known by now that neither learner trains
        on (e.g. a validation fold kept out of the encoder's training too). They join the pool *instead of*
        a held-out share of this session: the shadow then learns all of ``X`` (it equals the learner here).
        """
        Xt = torch.as_tensor(np.asarray(X)) if not isinstance(X, Tensor) else X.detach()
        yt = torch.as_tensor(np.asarray(y)).reshape(-1).long() if not isinstance(y, Tensor) else y.detach().long()
        if held_out is None:
            fit, held = stratified_holdout(yt.cpu().numpy(), self.holdout, self.seed, self.steps)
        else:
            fit, held = torch.arange(len(yt)), torch.zeros(0, dtype=torch.long)
        self.steps += 1
        self.last_held_out = held
        if len(fit):
            self.shadow.partial_fit(Xt[fit], yt[fit])
        if self.density is not None and len(yt):
            self.density.partial_fit(Xt, yt)
            if len(fit):
                self.shadow_density.partial_fit(Xt[fit], yt[fit])
        if len(held):
            Xh = Xt[held].to(device="cpu", dtype=torch.float32)
            self.pool_X = Xh if self.pool_X.numel() == 0 else torch.cat([self.pool_X, Xh])
            self.pool_y = torch.cat([self.pool_y, yt[held].cpu()])
        if held_out is not None:
            Xv = torch.as_tensor(np.asarray(held_out[0]), dtype=torch.float32)
            yv = torch.as_tensor(np.asarray(held_out[1])).reshape(-1).long()
            self.pool_X = Xv if self.pool_X.numel() == 0 else torch.cat([self.pool_X, Xv])
            self.pool_y = torch.cat([self.pool_y, yv])
        self._cap_pool()
        self.refit()
        return self.calibration

    def _cap_pool(self) -> None:
        if self.max_per_class is None:
            return
        keep = []
        for c in torch.unique(self.pool_y):
            rows = torch.nonzero(self.pool_y == c).squeeze(1)
            keep.append(rows[-self.max_per_class:])  # the most recent held-out clips of each class
        idx = torch.sort(torch.cat(keep)).values
        self.pool_X, self.pool_y = self.pool_X[idx], self.pool_y[idx]

    @torch.no_grad()
    def forget(self, X: ArrayLike | None = None, y: ArrayLike | None = None, label: int | None = None) -> None:
        """Remove a class (``label``) or clips ``(X, y)`` exactly: equal pool rows go, the rest leave the shadow.

        Needs a learner that can forget (``forget_class`` / ``forget_samples``) for what the shadow learned.
        Then refits.
        """
        if label is not None:
            keep = self.pool_y != int(label)
            self.pool_X, self.pool_y = self.pool_X[keep], self.pool_y[keep]
            for part in (self.shadow, self.density, self.shadow_density):
                if part is not None and part.is_fitted and int(label) in part.classes_.tolist():
                    part.forget_class(int(label))
        if X is not None:
            Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32) if not isinstance(X, Tensor) else X.float().cpu()
            yt = torch.as_tensor(np.asarray(y)).reshape(-1).long()
            in_pool = torch.zeros(len(Xt), dtype=torch.bool)
            keep = torch.ones(len(self.pool_y), dtype=torch.bool)
            for r in range(len(Xt)):
                hit = torch.nonzero(keep & (self.pool_y == yt[r]) & (self.pool_X == Xt[r]).all(1)).squeeze(1)
                if len(hit):
                    keep[hit[0]] = False
                    in_pool[r] = True
            self.pool_X, self.pool_y = self.pool_X[keep], self.pool_y[keep]
            if self.density is not None:
                self.density.forget_samples(Xt, yt)  # it learned every clip, held out or not
            if bool((~in_pool).any()):
                self.shadow.forget_samples(Xt[~in_pool], yt[~in_pool])
                if self.shadow_density is not None:
                    self.shadow_density.forget_samples(Xt[~in_pool], yt[~in_pool])
        self.refit()

    @torch.no_grad()
    def merge(self, other: HeldOutCalibration, mapping: dict[int, int], *, solve: bool = True) -> None:
        """Fold in another model's calibration (its labels renamed by ``mapping``): shadows merge, pools join.

        ``solve=False`` defers the shadow's solve and the refit to a later merge with ``solve=True``.
        """
        if (self.density is None) != (other.density is None):
            raise ValueError("cannot merge a calibration with class densities and one without")
        if other.shadow.is_fitted:
            self.shadow.merge(other.shadow.relabeled(mapping), solve=solve)
        for mine, theirs in ((self.density, other.density), (self.shadow_density, other.shadow_density)):
            if theirs is not None and theirs.is_fitted:
                mine.merge(theirs.relabeled(mapping), solve=solve)
        if len(other.pool_y):
            y = torch.as_tensor([mapping[int(c)] for c in other.pool_y.tolist()], dtype=torch.long)
            self.pool_X = other.pool_X.clone() if self.pool_X.numel() == 0 else torch.cat([self.pool_X, other.pool_X])
            self.pool_y = torch.cat([self.pool_y, y])
        self._cap_pool()
        if solve:
            self.shadow.refresh()
            self.refit()

    def frozen(self) -> HeldOutCalibration:
        """A read-only copy for predicting: the fitted calibration, and a frozen shadow (no statistics).

        The pool's tensors are shared: they are replaced on change, never written in place.
        """
        out = copy.copy(self)
        out.shadow = self.shadow.frozen()
        if self.density is not None:
            out.density, out.shadow_density = self.density.frozen(), self.shadow_density.frozen()
        out.calibration = copy.deepcopy(self.calibration)
        return out

    @torch.no_grad()
    def predict(
        self, learner: IncrementalLearner, X: ArrayLike, threshold: float | None = None, reject_unknown: bool = True,
    ) -> OpenSetPrediction:
        """``OpenSetCalibration.predict`` for the learner this calibration follows, with its density."""
        return self.calibration.predict(learner, X, threshold, reject_unknown, self.density)

    def score(self, learner: IncrementalLearner, X: ArrayLike, kind: str | None = None,
              scores: Tensor | None = None) -> Tensor:
        """Known-ness of ``X`` under ``learner`` (the stored score kind, or ``kind``), with this density."""
        kind = self.calibration.detector.score if kind is None else kind
        return known_score(learner, X, kind, self.calibration.calibrator, scores, self.density)

    @torch.no_grad()
    def pool_scores(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(pool embeddings, the shadow's raw scores of them, their true columns), or None with nothing to score.

        Pool clips of a class the shadow no longer has (forgotten from it) are left out.
        """
        if not len(self.pool_y) or not self.shadow.is_fitted:
            return None
        classes = self.shadow.classes_.cpu()
        usable = torch.isin(self.pool_y, classes)
        if not bool(usable.any()):
            return None
        pool_X, pool_y = self.pool_X[usable], self.pool_y[usable]
        cols = torch.argsort(classes)[torch.searchsorted(torch.sort(classes).values, pool_y)]
        return pool_X, self.shadow.decision_function(pool_X), cols

    @torch.no_grad()
    def refit(self) -> OpenSetCalibration:
        """Refit the calibrator and the threshold on the shadow's scores of the pool (no-op while it is empty)."""
        pooled = self.pool_scores()
        if pooled is None:
            return self.calibration
        pool_X, scores, cols = pooled
        self.calibration.calibrator.fit(scores, cols)
        known = known_score(self.shadow, pool_X, self.calibration.detector.score,
                            self.calibration.calibrator, scores, self.shadow_density)
        self.calibration.detector.fit(known)
        return self.calibration

    def nbytes(self) -> int:
        """Bytes of the tensors ``state()`` saves, counted without building them (a model's info asks after
        every change, and a state dict would fold the shadow's pending statistics each time)."""
        densities = sum(d.nbytes() for d in (self.density, self.shadow_density) if d is not None)
        return self.shadow.nbytes() + densities + sum(t.numel() * t.element_size() for t in (self.pool_X, self.pool_y))

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON-able meta) to save beside a model: the shadow's state, the pool, the calibration."""
        tensors = {f"shadow.{k}": v for k, v in self.shadow.state_dict().items()}
        tensors |= {"pool_X": self.pool_X.contiguous(), "pool_y": self.pool_y.contiguous()}
        density = None
        if self.density is not None:
            for prefix, part in (("density.", self.density), ("shadow_density.", self.shadow_density)):
                tensors |= {prefix + k: v for k, v in part.state_dict().items()}
            density = {"shrinkage": float(self.density.config.shrinkage)}
        meta = {"holdout": self.holdout, "seed": self.seed, "max_per_class": self.max_per_class,
                "steps": self.steps, "calibration": self.calibration.to_dict(), "density": density}
        return tensors, meta

    @classmethod
    def from_state(
        cls, learner: IncrementalLearner, tensors: dict[str, Tensor], meta: dict[str, Any]
    ) -> HeldOutCalibration:
        """Rebuild from ``state()``; ``learner``: an unfitted learner of the same config (the shadow's shell)."""
        cal = OpenSetCalibration.from_dict(meta["calibration"])
        density = meta.get("density")  # absent in calibrations saved before densities: none
        out = cls(learner, holdout=meta["holdout"], seed=meta["seed"], score=cal.detector.score,
                  target_frr=cal.detector.target_frr, max_per_class=meta["max_per_class"], calibrator=cal.calibrator,
                  density=density is not None)
        out.shadow.load_state_dict({k[len("shadow."):]: v for k, v in tensors.items() if k.startswith("shadow.")})
        if density is not None:
            for prefix in ("density.", "shadow_density."):
                part = new_density(float(density["shrinkage"]))
                part.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                setattr(out, prefix[:-1], part)
        out.pool_X, out.pool_y = tensors["pool_X"], tensors["pool_y"].long()
        out.steps = int(meta["steps"])
        out.calibration = cal
        return out


__all__ = [
    "SCORES",
    "UNKNOWN",
    "Calibrator",
    "HeldOutCalibration",
    "OpenSetCalibration",
    "OpenSetPrediction",
    "TopLabelMap",
    "UnknownDetector",
    "background_distances",
    "class_balanced_weights",
    "default_calibrator",
    "default_score",
    "fit_temperature",
    "is_gaussian",
    "known_score",
    "known_score_from",
    "mahalanobis_distances",
    "new_density",
    "recalibrate_top",
    "stratified_holdout",
    "temperature_nll",
    "transform_scores",
]
