"""Evaluation loops: a learner through a scenario's sessions, the online protocol and the joint bound."""

from __future__ import annotations

import time

import numpy as np
import torch

from earmark.experiments.config import RunConfig
from earmark.learners import AnalyticLearner, IncrementalLearner, joint_ridge
from earmark.learners.analytic import RandomReLUBuffer
from earmark.metrics import AccuracyMatrix
from earmark.scenarios import ClassIncremental, evaluate_online


def embedded(indices: np.ndarray, row_of: dict[int, int]) -> np.ndarray:
    """Dataset indices that have an embedding (skipped bad files have none)."""
    return np.asarray([i for i in indices if int(i) in row_of], dtype=np.int64)


def evaluate(
    config: RunConfig, learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor,
    row_of: dict[int, int],
) -> tuple[AccuracyMatrix, list[float], dict]:
    """Session by session, or test-then-train over a single-pass stream when ``config.online_batch``."""
    if config.online_batch is None:
        matrix, seconds = evaluate_learner(learner, scenario, X, row_of)
        return matrix, seconds, {}
    t0 = time.perf_counter()
    result = evaluate_online(learner, scenario, X, row_of, config.online_batch, seed=config.seed)
    seconds = (time.perf_counter() - t0) / max(1, len(scenario))
    online = {"prequential_accuracy": result.prequential_accuracy(), "curve": result.curve.tolist()}
    return result.matrix, [seconds] * len(scenario), online


def evaluate_learner(
    learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int]
) -> tuple[AccuracyMatrix, list[float]]:
    """Run the sessions in order: fit on each session's data, test on all classes seen so far."""
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds = []
    for session in scenario:
        train, test = embedded(session.train_indices, row_of), embedded(session.test_indices, row_of)
        t0 = time.perf_counter()
        learner.partial_fit(X[[row_of[i] for i in train]], scenario.dense_targets(train))
        seconds.append(time.perf_counter() - t0)
        pred = learner.predict(X[[row_of[i] for i in test]]).cpu().numpy()
        matrix.record(session.index, scenario.dense_targets(test), pred, scenario.session_classes)
    return matrix, seconds


def evaluate_joint(
    scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int], params: dict
) -> tuple[AccuracyMatrix, list[float]]:
    """The joint upper bound: after each session, one ridge solve on all training data seen so far."""
    cfg = AnalyticLearner.Config(**params)
    expand = RandomReLUBuffer(cfg.buffer_size, cfg.seed)  # the analytic learner's expansion, same seed
    expand.build(X.shape[1])
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds = []
    seen: list[int] = []
    for session in scenario:
        seen.extend(embedded(session.train_indices, row_of).tolist())
        test = embedded(session.test_indices, row_of)
        t0 = time.perf_counter()
        y = scenario.dense_targets(np.asarray(seen))
        H = expand(X[[row_of[i] for i in seen]])
        classes = np.unique(y)
        Y = torch.as_tensor(y[:, None] == classes[None, :], dtype=torch.float64)
        W = joint_ridge(H, Y, cfg.gamma)
        seconds.append(time.perf_counter() - t0)
        Ht = expand(X[[row_of[i] for i in test]])
        pred = classes[(Ht @ W).argmax(1).numpy()]
        matrix.record(session.index, scenario.dense_targets(test), pred, scenario.session_classes)
    return matrix, seconds
