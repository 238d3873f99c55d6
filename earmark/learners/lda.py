"""Streaming linear discriminant analysis (Deep SLDA; the FSA head): class means and one shared covariance.

The statistics are sums over samples (per-class sums and counts, the Gram, per-class Gram factors), so
any split of the data into batches, any class order and classes that recur give the batch LDA on all
data seen (up to rounding), and a class or a set of samples can be removed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from earmark.learners.base import LEARNERS, IncrementalLearner, LearnerConfig
from earmark.learners.statistics import ClassFactors


@dataclass
class LDAConfig(LearnerConfig):
    """``shrinkage`` (eps): the precision is ``inv((1 - eps) S + eps I)``.

    1e-4 is Deep SLDA's default (Hayes & Kanan, 2020). It keeps the system solvable when there are
    fewer samples than dimensions (few-shot sessions), but how much to shrink depends on the scale
    and spread of the embeddings: it is worth tuning on held-out data (values up to ~1 are sensible).
    """

    shrinkage: float = 1e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")


@LEARNERS.register("lda")
class StreamingLDALearner(IncrementalLearner):
    """Linear discriminant with a shared shrunk covariance: ``score_c(x) = x' w_c + b_c``.

    ``w_c = Lambda mu_c`` and ``b_c = -0.5 mu_c' Lambda mu_c`` with ``Lambda = inv((1 - eps) S + eps I)``;
    ``S`` is the pooled within-class covariance (scatter / number of samples, the maximum-likelihood
    estimate Deep SLDA tracks). Scores are log-likelihoods of a shared-covariance Gaussian up to a
    common constant, so ``predict_proba`` (their softmax) is the posterior under equal class priors.

    State is additive (per-class sums and counts, the Gram ``sum x x'``, per-class Gram factors), and
    the scatter is derived from it: ``S = sum x x' - sum_c s_c s_c' / n_c``. So learning, forgetting a
    class or some samples, and merging are additions and subtractions of the same sums. The weights
    are obtained by a solve (never an explicit inverse) and cached until the next change.
    """

    Config = LDAConfig
    name = "lda"
    can_forget = True
    can_merge = True
    learning_only = ("factors",)  # per-class factors serve forgetting a class only

    def __init__(self, config: LDAConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("class_sums", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("gram", torch.zeros(0, 0, dtype=torch.float64))
        self.factors = ClassFactors()
        self._cache: tuple[Tensor, Tensor] | None = None  # (W (d, C), b (C,)); not state

    # ----------------------------------------------------------------- fitted attributes

    @property
    def means_(self) -> Tensor:
        """Class means ``(n_classes, d)`` in float64, rows in ``classes_`` order (a copy)."""
        self._require_fitted()
        return self.class_sums / self.class_counts.unsqueeze(1).to(torch.float64)

    @property
    def scatter(self) -> Tensor:
        """Pooled within-class scatter ``sum_c sum_i (x_i - mu_c)(x_i - mu_c)'`` (d, d)."""
        counts = self.class_counts.to(torch.float64).unsqueeze(1)
        S = self.gram - (self.class_sums / counts).T @ self.class_sums
        return 0.5 * (S + S.T)

    @property
    def covariance_(self) -> Tensor:
        """Pooled within-class covariance ``(d, d)``: scatter / total count (before shrinkage)."""
        self._require_fitted()
        return self.scatter / self.class_counts.sum().to(torch.float64)

    @property
    def weights_(self) -> Tensor:
        """Discriminant weights ``(d, n_classes)``, columns ``w_c = Lambda mu_c`` (a copy)."""
        return self._weights()[0].clone()

    @property
    def bias_(self) -> Tensor:
        """Discriminant offsets ``(n_classes,)``, ``b_c = -0.5 mu_c' Lambda mu_c`` (a copy)."""
        return self._weights()[1].clone()

    # ----------------------------------------------------------------- hooks

    def _init_state(self, d: int) -> None:
        self.class_sums = torch.zeros(0, d, dtype=torch.float64, device=self.device)
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        self.factors.reset(d)

    def _grow(self, k: int) -> None:
        d = self.class_sums.shape[1]
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(k, d)])
        self.factors.grow(k)

    def _add(self, X: Tensor, cols: Tensor, sign: float) -> None:
        self._cache = None
        X = X.to(torch.float64)
        self.class_sums.index_add_(0, cols, X, alpha=sign)
        G = self.gram + sign * (X.T @ X)
        self.gram = 0.5 * (G + G.T)

    def _update(self, X: Tensor, cols: Tensor) -> None:
        self._add(X, cols, 1.0)
        self.factors.add(X.to(torch.float64), cols)

    def _downdate(self, X: Tensor, cols: Tensor) -> None:
        self._add(X, cols, -1.0)
        self.factors.remove(X.to(torch.float64), cols)

    def _merge(self, other: IncrementalLearner, cols: Tensor) -> None:
        self._cache = None
        self.class_sums.index_add_(0, cols, other.class_sums.to(self.device))
        G = self.gram + other.gram.to(self.device)
        self.gram = 0.5 * (G + G.T)
        self.factors.merge(other.factors, cols)

    def _remove_class(self, col: int) -> None:
        self._cache = None
        F = self.factors.drop(col)
        G = self.gram - F.T @ F
        self.gram = 0.5 * (G + G.T)
        self.class_sums = torch.cat([self.class_sums[:col], self.class_sums[col + 1 :]])

    def _scores(self, X: Tensor) -> Tensor:
        W, b = self._weights()
        return X.to(torch.float64) @ W + b

    def _prepare_scoring(self) -> None:
        self._weights()

    def _weights(self) -> tuple[Tensor, Tensor]:
        self._require_fitted()
        if self._cache is None or self._cache[0].device != self.class_sums.device:
            eps = self.config.shrinkage
            A = (1.0 - eps) * self.covariance_
            A.diagonal().add_(eps)
            M = self.means_.T  # (d, C)
            L, info = torch.linalg.cholesky_ex(A)
            # Without shrinkage S may be singular: then the minimum-norm solution (Deep SLDA uses pinv).
            W = torch.cholesky_solve(M, L) if int(info) == 0 else torch.linalg.pinv(A, hermitian=True) @ M
            b = -0.5 * (M * W).sum(0)
            self._cache = (W, b)
        return self._cache

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_state(self) -> None:
        super()._check_state()
        c, d = self.n_classes_, self.n_features_in_
        if self.is_fitted:
            bad = self.factors.check(c, d)
            shapes = (tuple(self.class_sums.shape), tuple(self.gram.shape))
            if shapes != ((c, d), (d, d)):
                bad.append(f"class_sums, gram shapes {shapes}")
            if bad:
                raise ValueError(f"inconsistent LDA state for {c} classes of width {d}: {'; '.join(bad)}")
            if bool((self.class_counts <= 0).any()):
                raise ValueError("inconsistent LDA state: every class needs a positive count")
        elif self.class_sums.numel() or self.gram.numel() or self.factors.rows.numel():
            raise ValueError("inconsistent LDA state: statistics present but no classes")
