"""Streaming linear discriminant analysis (Deep SLDA; the FSA head): class means and one shared covariance.

The statistics are updated exactly: per-class running means and counts, and the pooled within-class
scatter merged with Chan et al.'s parallel update, so any split of the data into batches, any class
order and classes that recur give the batch LDA on all data seen (up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from earmark.learners.base import LEARNERS, IncrementalLearner, LearnerConfig


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
    The weights are obtained by a solve (never an explicit inverse) and cached until the next update.
    """

    Config = LDAConfig
    name = "lda"

    def __init__(self, config: LDAConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("class_means", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("class_counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("scatter", torch.zeros(0, 0, dtype=torch.float64))
        self._cache: tuple[Tensor, Tensor] | None = None  # (W (d, C), b (C,)); not state

    # ----------------------------------------------------------------- fitted attributes

    @property
    def means_(self) -> Tensor:
        """Class means ``(n_classes, d)`` in float64, rows in ``classes_`` order (a copy)."""
        self._require_fitted()
        return self.class_means.clone()

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
        self.class_means = torch.zeros(0, d, dtype=torch.float64, device=self.device)
        self.class_counts = torch.zeros(0, dtype=torch.long, device=self.device)
        self.scatter = torch.zeros(d, d, dtype=torch.float64, device=self.device)

    def _grow(self, k: int) -> None:
        d = self.class_means.shape[1]
        self.class_means = torch.cat([self.class_means, self.class_means.new_zeros(k, d)])
        self.class_counts = torch.cat([self.class_counts, self.class_counts.new_zeros(k)])

    def _update(self, X: Tensor, cols: Tensor) -> None:
        self._cache = None
        X = X.to(torch.float64)
        n_b = torch.bincount(cols, minlength=self.n_classes_)
        present = torch.nonzero(n_b).squeeze(1)
        sums = torch.zeros_like(self.class_means).index_add_(0, cols, X)
        nb = n_b[present].to(torch.float64)
        batch_means = sums[present] / nb.unsqueeze(1)
        # The batch's own within-class scatter, around its per-class batch means.
        row_mean = torch.zeros_like(self.class_means)
        row_mean[present] = batch_means
        centred = X - row_mean[cols]
        scatter_b = centred.T @ centred
        # Chan's merge: M = M_a + M_b + n_a n_b / (n_a + n_b) * delta delta' per class (0 for new classes).
        na = self.class_counts[present].to(torch.float64)
        n = na + nb
        delta = batch_means - self.class_means[present]
        correction = (delta * (na * nb / n).unsqueeze(1)).T @ delta
        S = self.scatter + scatter_b + correction
        self.scatter = 0.5 * (S + S.T)
        self.class_means[present] += delta * (nb / n).unsqueeze(1)
        self.class_counts += n_b

    def _scores(self, X: Tensor) -> Tensor:
        W, b = self._weights()
        return X.to(torch.float64) @ W + b

    def _weights(self) -> tuple[Tensor, Tensor]:
        self._require_fitted()
        if self._cache is None or self._cache[0].device != self.class_means.device:
            eps = self.config.shrinkage
            A = (1.0 - eps) * self.covariance_
            A.diagonal().add_(eps)
            M = self.class_means.T  # (d, C)
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
            shapes = (tuple(self.class_means.shape), tuple(self.class_counts.shape), tuple(self.scatter.shape))
            if shapes != ((c, d), (c,), (d, d)):
                raise ValueError(
                    f"inconsistent LDA state: class_means, class_counts, scatter shapes {shapes} "
                    f"for {c} classes of width {d}"
                )
            if bool((self.class_counts <= 0).any()):
                raise ValueError("inconsistent LDA state: every class needs a positive count")
        elif self.class_means.numel() or self.class_counts.numel() or self.scatter.numel():
            raise ValueError("inconsistent LDA state: statistics present but no classes")
