"""Class-incremental learners on frozen embeddings, looked up by name in ``LEARNERS``.

Importing the learner modules registers them; ``make_learner("analytic", buffer_size=1024)``
builds one from its name and config overrides.
"""

from earmark.learners.analytic import (
    AnalyticConfig,
    AnalyticLearner,
    RandomReLUBuffer,
    RecursiveRidge,
    joint_ridge,
)
from earmark.learners.base import (
    LEARNERS,
    IncrementalLearner,
    LearnerConfig,
    NotFittedError,
    make_learner,
)
from earmark.learners.ncm import NCMConfig, NCMLearner

__all__ = [
    "LEARNERS",
    "AnalyticConfig",
    "AnalyticLearner",
    "IncrementalLearner",
    "LearnerConfig",
    "NCMConfig",
    "NCMLearner",
    "NotFittedError",
    "RandomReLUBuffer",
    "RecursiveRidge",
    "joint_ridge",
    "make_learner",
]
