"""Joint retraining: keep every clip seen and train on all of them each session (the upper bound).

Memory grows with the data (it is counted in ``nbytes``). Each session continues training the
current network on all data seen so far (a warm start, not a retrain from scratch, to keep CPU time
bounded), so it is the usual "joint" reference rather than an exact one. It is slow: every session
costs as much as training on the whole base session again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from earmark.learners.base import LEARNERS
from earmark.learners.replay import ReplayConfig, ReplayLearner


@dataclass
class JointConfig(ReplayConfig):
    """Replay's config with no budget: every clip is kept (a budget set here is an error)."""

    memory_clips: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_clips is not None or self.memory_bytes is not None:
            raise ValueError("joint keeps every clip: memory_clips / memory_bytes must stay unset (use replay)")


@LEARNERS.register("joint")
class JointLearner(ReplayLearner):
    """Replay with an unbounded memory that stores everything."""

    Config = JointConfig
    name = "joint"
    takes_budget: ClassVar[bool] = False
