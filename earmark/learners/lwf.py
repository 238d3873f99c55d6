"""Learning without Forgetting (Li & Hoiem): distil the old model's outputs on new data, no exemplars."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from earmark.learners.backbone import BackboneConfig, BackboneLearner, FrozenModel, kd_loss, new_class_ce
from earmark.learners.base import LEARNERS


@dataclass
class DistillConfig(BackboneConfig):
    """``temperature`` 2 follows LwF and PyCIL; ``distill_weight`` 3 is PyCIL's LwF lambda (its iCaRL uses 1)."""

    temperature: float = 2.0
    distill_weight: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class DistillMixin:
    """Adds KD toward the pre-session model's logits on the old classes (a transient frozen copy)."""

    _old: FrozenModel | None = None

    def _before_session(self, X: Tensor, cols: Tensor) -> None:
        super()._before_session(X, cols)
        self._old = self._frozen_copy() if self.n_old_classes else None

    def _extra_loss(self, x: Tensor, logits: Tensor, embedding: Tensor) -> Tensor | None:
        if self._old is None:
            return None
        return self.config.distill_weight * kd_loss(logits, self._old(x), self.config.temperature)

    def _after_session(self, X: Tensor, cols: Tensor) -> None:
        self._old = None
        super()._after_session(X, cols)


@LEARNERS.register("lwf")
class LwFLearner(DistillMixin, BackboneLearner):
    """Cross-entropy on the new classes' columns + KD (temperature T) toward the old model's old-class logits."""

    Config = DistillConfig
    name = "lwf"

    def _classification_loss(self, logits: Tensor, cols: Tensor) -> Tensor:
        return new_class_ce(logits, cols, self.n_old_classes)
