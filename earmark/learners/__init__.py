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
from earmark.learners.backbone import BackboneConfig, BackboneLearner, FinetuneLearner, backbone_names
from earmark.learners.base import (
    LEARNERS,
    IncrementalLearner,
    LearnerConfig,
    NotFittedError,
    make_learner,
)
from earmark.learners.dsal import DSALConfig, DSALLearner
from earmark.learners.ewc import EWCConfig, EWCLearner
from earmark.learners.exemplars import ExemplarMemory, herding_order
from earmark.learners.fetril import FeTrILConfig, FeTrILLearner, translate_features
from earmark.learners.fsa import FSAConfig, FSALearner
from earmark.learners.icarl import ICaRLConfig, ICaRLLearner
from earmark.learners.joint import JointConfig, JointLearner
from earmark.learners.lda import LDAConfig, StreamingLDALearner
from earmark.learners.lwf import DistillConfig, LwFLearner
from earmark.learners.ncm import NCMConfig, NCMLearner
from earmark.learners.ranpac import RanPACConfig, RanPACLearner, ridge_solve
from earmark.learners.replay import ReplayConfig, ReplayLearner
from earmark.learners.teen import TEENConfig, TEENLearner, calibrate_prototypes

__all__ = [
    "LEARNERS",
    "BackboneConfig",
    "BackboneLearner",
    "DistillConfig",
    "EWCConfig",
    "EWCLearner",
    "ExemplarMemory",
    "FSAConfig",
    "FSALearner",
    "FinetuneLearner",
    "ICaRLConfig",
    "ICaRLLearner",
    "JointConfig",
    "JointLearner",
    "LwFLearner",
    "ReplayConfig",
    "ReplayLearner",
    "backbone_names",
    "herding_order",
    "AnalyticConfig",
    "AnalyticLearner",
    "DSALConfig",
    "DSALLearner",
    "FeTrILConfig",
    "FeTrILLearner",
    "IncrementalLearner",
    "LDAConfig",
    "LearnerConfig",
    "NCMConfig",
    "NCMLearner",
    "NotFittedError",
    "RanPACConfig",
    "RanPACLearner",
    "RandomReLUBuffer",
    "RecursiveRidge",
    "StreamingLDALearner",
    "TEENConfig",
    "TEENLearner",
    "calibrate_prototypes",
    "joint_ridge",
    "make_learner",
    "ridge_solve",
    "translate_features",
]
