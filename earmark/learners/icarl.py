"""iCaRL (Rebuffi et al.): herding exemplars + distillation, classified by nearest mean of exemplars."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from earmark.learners.base import LEARNERS
from earmark.learners.lwf import DistillConfig, DistillMixin
from earmark.learners.replay import ReplayConfig, ReplayLearner


@dataclass
class ICaRLConfig(ReplayConfig, DistillConfig):
    """Replay's budget and herding plus LwF's temperature; cross-entropy + KD (weight 1) as in PyCIL's iCaRL."""

    distill_weight: float = 1.0


@LEARNERS.register("icarl")
class ICaRLLearner(DistillMixin, ReplayLearner):
    """Scores are cosine similarities to each class's exemplar mean (NME), recomputed after each session.

    The means use the exemplars and, for the session's own classes, all of the session's data, in
    the encoder's current embedding (L2-normalized, as iCaRL does).
    """

    Config = ICaRLConfig
    name = "icarl"

    def __init__(self, config: ICaRLConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("class_means", torch.zeros(0, self.encoder.embed_dim))

    def _after_session(self, X: Tensor, cols: Tensor) -> None:
        super()._after_session(X, cols)
        mx, mc = self.memory.items()
        emb = F.normalize(self._embed(torch.cat([mx.to(X.device), X])), dim=1)
        c_all = torch.cat([mc.to(cols.device), cols])
        means = torch.zeros(self.n_classes_, emb.shape[1], device=emb.device)
        for c in range(self.n_classes_):
            # The session's own classes use all their data; the others only their exemplars.
            rows = c_all == c
            if bool((cols == c).any()):
                rows[: len(mc)] = False
            if bool(rows.any()):
                means[c] = emb[rows].mean(0)
        self.class_means = F.normalize(means, dim=1)

    def _scores(self, X: Tensor) -> Tensor:
        return (F.normalize(self._embed(X), dim=1) @ self.class_means.T).double()

    def _check_state(self) -> None:
        super()._check_state()
        if self.class_means.shape != (self.n_classes_, self.encoder.embed_dim):
            raise ValueError(f"class_means has shape {tuple(self.class_means.shape)}")
