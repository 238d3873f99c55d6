"""Experience replay: a class-balanced exemplar memory (herding) trained on with each new session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from earmark.learners.backbone import BackboneConfig, BackboneLearner
from earmark.learners.base import LEARNERS
from earmark.learners.exemplars import ExemplarMemory


@dataclass
class ReplayConfig(BackboneConfig):
    """The memory budget, in clips (``memory_clips``, shared by all classes seen) or in bytes.

    ``memory_bytes`` (when set) wins: it is what ``earmark compare --memory-budget`` aligns, and it is
    converted to clips at the stored size of one exemplar (float16 log-mel). 200 clips is iCaRL's
    2,000 scaled to a 100-class CPU demo. ``herding=False`` stores the first samples instead.
    """

    memory_clips: int | None = 200
    memory_bytes: int | None = None
    herding: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("memory_clips", "memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


@LEARNERS.register("replay")
class ReplayLearner(BackboneLearner):
    """Finetune on new data plus stored exemplars of every class seen: forgetting is rehearsed away."""

    Config = ReplayConfig
    name = "replay"
    takes_budget: ClassVar[bool] = True  # `compare --memory-budget` sizes its memory_bytes
    def __init__(self, config: ReplayConfig | None = None) -> None:
        super().__init__(config)
        self.memory = ExemplarMemory()

    def capacity(self, sample_shape: tuple[int, ...]) -> int | None:
        """Total exemplars the budget allows for samples of ``sample_shape`` (None: unlimited)."""
        if self.config.memory_bytes is not None:
            return self.config.memory_bytes // ExemplarMemory.bytes_per_item(sample_shape)
        return self.config.memory_clips

    def _training_set(self, X: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        if not len(self.memory):
            return X, cols
        mx, mc = self.memory.items()
        return torch.cat([X, mx.to(X.device)]), torch.cat([cols, mc.to(cols.device)])

    def _after_session(self, X: Tensor, cols: Tensor) -> None:
        cap = self.capacity(tuple(X.shape[1:]))
        per_class = None if cap is None else cap // self.n_classes_
        self.memory.update(X, cols, per_class, self._embed if self.config.herding else None)
