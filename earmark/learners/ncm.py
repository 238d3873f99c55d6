"""Nearest class mean with cosine similarity (SimpleCIL): no training, exact incremental prototypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from earmark.learners.base import LEARNERS, IncrementalLearner, LearnerConfig


@dataclass
class NCMConfig(LearnerConfig):
    """``temperature`` only shapes ``predict_proba``: softmax(cosine / temperature).

    Cosines lie in [-1, 1], so 0.1 spreads logits over [-10, 10]: a clear winner gets most of the
    mass while near-ties stay soft. Predictions (argmax) do not depend on it.
    """

    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@LEARNERS.register("ncm")
class NCMLearner(IncrementalLearner):
    """Class prototype = mean embedding, kept as running float64 sums and counts.

    The means are exact after any batch split and for classes that recur in later sessions.
    Scores are cosine(x, mean_c) in [-1, 1].
    """

    Config = NCMConfig
    name = "ncm"
    can_forget = True
    can_merge = True

    def __init__(self, config: NCMConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("class_sums", torch.zeros(0, 0, dtype=torch.float64))

    @property
    def means_(self) -> Tensor:
        """Class means ``(n_classes, d)`` in float64, rows in ``classes_`` order."""
        self._require_fitted()
        return self.class_sums / self.class_counts.unsqueeze(1).to(self.class_sums.dtype)

    def _init_state(self, d: int) -> None:
        self.class_sums = torch.zeros(0, d, dtype=torch.float64, device=self.device)

    def _grow(self, k: int) -> None:
        d = self.class_sums.shape[1]
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(k, d)])

    def _update(self, X: Tensor, cols: Tensor) -> None:
        self.class_sums.index_add_(0, cols, X.to(torch.float64))

    def _downdate(self, X: Tensor, cols: Tensor) -> None:
        self.class_sums.index_add_(0, cols, X.to(torch.float64), alpha=-1.0)

    def _merge(self, other: IncrementalLearner, cols: Tensor) -> None:
        self.class_sums.index_add_(0, cols, other.class_sums.to(self.device))

    def _remove_class(self, col: int) -> None:
        self.class_sums = torch.cat([self.class_sums[:col], self.class_sums[col + 1 :]])

    def _scores(self, X: Tensor) -> Tensor:
        x = F.normalize(X.to(torch.float64), dim=1)
        return x @ F.normalize(self.means_, dim=1).T

    def _proba_logits(self, scores: Tensor) -> Tensor:
        return scores / self.config.temperature

    def _check_state(self) -> None:
        super()._check_state()
        c, d = self.n_classes_, self.n_features_in_
        if self.is_fitted:
            if self.class_sums.shape != (c, d):
                raise ValueError(
                    f"inconsistent NCM state: class_sums {tuple(self.class_sums.shape)} for {c} classes of width {d}"
                )
            if bool((self.class_counts <= 0).any()):
                raise ValueError("inconsistent NCM state: every class needs a positive count")
        elif self.class_sums.numel():
            raise ValueError("inconsistent NCM state: class statistics present but no classes")
