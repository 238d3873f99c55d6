"""Evaluation loops: a learner through a scenario's sessions, the online protocol and the joint bound.

With a ``checkpoint_dir``, a learner that checkpoints (``can_checkpoint``: the backbone learners)
trains each session with checkpoints in that folder, and after each session its whole state, the
accuracy matrix so far and the fit times go to ``<checkpoint_dir>/sessions.safetensors``. With
``resume`` a later call with the same learner (config and state before the first session), scenario
and inputs restores the sessions done and continues in the session that was interrupted, so the
matrix and the learner end bit-identical to an uninterrupted run on the same machine. A file of
another learner, scenario or data is ignored and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from earmark.checkpoint import fingerprint_differences, load_tensors, prefixed, save_tensors, unprefixed
from earmark.experiments.config import RunConfig
from earmark.learners import AnalyticLearner, IncrementalLearner, joint_ridge
from earmark.learners.analytic import RandomReLUBuffer
from earmark.metrics import AccuracyMatrix
from earmark.scenarios import ClassIncremental, evaluate_online
from earmark.training.supervised import data_digest, state_digest

if TYPE_CHECKING:
    from earmark.calibration import Calibrator

SESSIONS_CHECKPOINT = "sessions.safetensors"
SESSIONS_KIND = "learner-sessions"


def embedded(indices: np.ndarray, row_of: dict[int, int]) -> np.ndarray:
    """Dataset indices that have an embedding (skipped bad files have none)."""
    return np.asarray([i for i in indices if int(i) in row_of], dtype=np.int64)


def evaluate(
    config: RunConfig, learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor,
    row_of: dict[int, int], checkpoint_dir: str | Path | None = None,
) -> tuple[AccuracyMatrix, list[float], dict]:
    """Session by session, or test-then-train over a single-pass stream when ``config.online_batch``.

    ``checkpoint_dir`` (sessions only; the online protocol does not checkpoint): see the module docstring,
    resumed when ``config.resume``.
    """
    if config.online_batch is None:
        matrix, seconds = evaluate_learner(learner, scenario, X, row_of, checkpoint_dir, config.resume)
        return matrix, seconds, {}
    t0 = time.perf_counter()
    result = evaluate_online(learner, scenario, X, row_of, config.online_batch, seed=config.seed)
    seconds = (time.perf_counter() - t0) / max(1, len(scenario))
    online = {"prequential_accuracy": result.prequential_accuracy(), "curve": result.curve.tolist()}
    return result.matrix, [seconds] * len(scenario), online


def evaluate_learner(
    learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int],
    checkpoint_dir: str | Path | None = None, resume: bool = True,
) -> tuple[AccuracyMatrix, list[float]]:
    """Run the sessions in order: fit on each session's data, test on all classes seen so far.

    ``checkpoint_dir`` / ``resume``: checkpoints of a learner that ``can_checkpoint`` (module docstring).
    The caller deletes the folder when it no longer needs it. ``seconds`` of a session restored from
    the checkpoint are the ones measured when it ran.
    """
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds: list[float] = []
    done = 0
    path = Path(checkpoint_dir) / SESSIONS_CHECKPOINT if checkpoint_dir is not None and learner.can_checkpoint else None
    if path is not None:
        fingerprint = sessions_fingerprint(learner, scenario, X, row_of)
        if resume and path.exists():
            restored = load_sessions(path, learner, fingerprint)
            if restored is not None:
                done, matrix, seconds = restored
        learner.checkpoint_dir, learner.resume = path.parent, resume
    try:
        for session in scenario:
            if session.index < done:
                continue
            train, test = embedded(session.train_indices, row_of), embedded(session.test_indices, row_of)
            t0 = time.perf_counter()
            learner.partial_fit(X[[row_of[i] for i in train]], scenario.dense_targets(train))
            seconds.append(time.perf_counter() - t0)
            pred = learner.predict(X[[row_of[i] for i in test]]).cpu().numpy()
            matrix.record(session.index, scenario.dense_targets(test), pred, scenario.session_classes)
            if path is not None:
                save_sessions(path, learner, fingerprint, session.index + 1, matrix, seconds)
                for p in (learner.train_checkpoint, learner.train_checkpoint.with_suffix(".json")):
                    p.unlink(missing_ok=True)  # that session's training checkpoint is not needed any more
    finally:
        if path is not None:
            learner.checkpoint_dir = None
    return matrix, seconds


def sessions_fingerprint(
    learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int]
) -> dict:
    """What a learner's pass through the scenario depends on: its kind, config and state before the first
    session (e.g. the encoder it starts from), the scenario, the rows of ``X`` and labels of every session."""
    rows = []
    for session in scenario:
        train, test = embedded(session.train_indices, row_of), embedded(session.test_indices, row_of)
        rows.append([[row_of[int(i)] for i in idx] + scenario.dense_targets(idx).tolist() for idx in (train, test)])
    return {
        "learner": learner.name,
        "config": learner.config.result_dict(),
        "state": state_digest(learner.state_dict()),
        "scenario": scenario.to_dict(),
        "sessions": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
        "data": data_digest(X),
    }


def save_sessions(
    path: Path, learner: IncrementalLearner, fingerprint: dict, done: int, matrix: AccuracyMatrix, seconds: list[float]
) -> None:
    """The learner's whole state after ``done`` sessions, with the matrix and fit times so far (atomically)."""
    meta = {"kind": SESSIONS_KIND, "fingerprint": fingerprint, "sessions": done, "matrix": matrix.to_dict(),
            "seconds": seconds}
    save_tensors(path, prefixed("learner", learner.state_dict()), meta)


def load_sessions(
    path: Path, learner: IncrementalLearner, fingerprint: dict
) -> tuple[int, AccuracyMatrix, list[float]] | None:
    """Inverse of :func:`save_sessions` into ``learner``: (sessions done, matrix, seconds), or None (the
    learner untouched) when the file is of another learner, scenario or data."""
    tensors, meta, _ = load_tensors(path, kind=SESSIONS_KIND)
    if fingerprint_differences(meta.get("fingerprint", {}), fingerprint):
        return None
    learner.load_state_dict({k: v.to(learner.device) for k, v in unprefixed("learner", tensors).items()})
    return int(meta["sessions"]), AccuracyMatrix.from_dict(meta["matrix"]), [float(s) for s in meta["seconds"]]


def evaluate_joint(
    scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int], params: dict
) -> tuple[AccuracyMatrix, list[float]]:
    """The joint upper bound: after each session, one ridge solve on all training data seen so far."""
    ridge = JointRidge(params, X.shape[1])
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds = []
    seen: list[int] = []
    for session in scenario:
        seen.extend(embedded(session.train_indices, row_of).tolist())
        test = embedded(session.test_indices, row_of)
        t0 = time.perf_counter()
        ridge.fit(X[[row_of[i] for i in seen]], scenario.dense_targets(np.asarray(seen)))
        seconds.append(time.perf_counter() - t0)
        pred = ridge.predict(X[[row_of[i] for i in test]])
        matrix.record(session.index, scenario.dense_targets(test), pred, scenario.session_classes)
    return matrix, seconds


class JointRidge:
    """One ridge solve on the analytic learner's random ReLU expansion (same ``params``, same seed)."""

    def __init__(self, params: dict, dim: int) -> None:
        self.cfg = AnalyticLearner.Config(**params)
        self.expand = RandomReLUBuffer(self.cfg.buffer_size, self.cfg.seed)
        self.expand.build(dim)

    def fit(self, X: torch.Tensor, y: np.ndarray) -> JointRidge:
        H = self.expand(X)
        self.classes = np.unique(y)
        Y = torch.as_tensor(y[:, None] == self.classes[None, :], dtype=torch.float64)
        self.W = joint_ridge(H, Y, self.cfg.gamma)
        return self

    def predict(self, X: torch.Tensor) -> np.ndarray:
        return self.classes[(self.expand(X) @ self.W).argmax(1).numpy()]


def evaluate_open_set(
    learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int], *,
    holdout: float = 0.2, seed: int = 0, score: str = "msp", target_frr: float = 0.05,
    extra_scores: tuple[str, ...] = (), validation_indices: np.ndarray | None = None,
    calibrator: Calibrator | None = None,
) -> tuple[AccuracyMatrix, list[float], list[dict]]:
    """``evaluate_learner`` (the same fits, the same matrix) plus calibration and unknown detection per session.

    After each session a ``HeldOutCalibration`` (a shadow learner without a held-out share of every
    session's training clips; see ``earmark.calibration``) gives the temperature and the threshold. On
    the test clips of the seen classes: ECE and NLL of the learner's own ``predict_proba`` and of the
    calibrated one (``calibrator``: its settings, plain temperature scaling when None), and of plain
    temperature scaling fitted on the same held-out scores (``ece_temperature``), for comparison. Known vs
    unknown: the seen classes' test clips against the test clips of the classes still to come (the unknown
    sounds of that moment): AUROC and FAR@95 of the known-ness ``score`` (and
    of each of ``extra_scores``), and the false rejections / acceptances at the stored threshold. The
    Mahalanobis kinds read the class Gaussians of an LDA-style learner, or of a density kept beside any other.
    None where there is nothing to measure (no future classes in the last session).
    ``seconds`` times the learner's own ``partial_fit`` only, as ``evaluate_learner``.

    ``validation_indices``: dataset indices of validation clips that no learner trains on; each joins the
    calibration pool in the session that introduces its class, in place of that session's held-out share
    (the shadow learns the whole session then). Why: the base-session encoder is trained
    on the base session's training clips, so a held-out share of those is held out from the learner
    but not from the encoder, and its embeddings are cleaner than test ones (too small a temperature).
    """
    from earmark.calibration import GAUSSIAN_SCORES, Calibrator, HeldOutCalibration, is_gaussian
    from earmark.metrics.calibration import ece_sampling_floor, expected_calibration_error, negative_log_likelihood
    from earmark.metrics.openset import auroc, far_at_tar, rejection_rates

    kinds = [score, *[k for k in extra_scores if k != score]]
    density = not is_gaussian(learner) and any(k in GAUSSIAN_SCORES for k in kinds)  # Gaussians beside the head
    cal = HeldOutCalibration(learner, holdout=holdout, seed=seed, score=score, target_frr=target_frr,
                             calibrator=calibrator, density=density)
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds: list[float] = []
    per_session: list[dict] = []
    everything = embedded(scenario[-1].test_indices, row_of)
    for session in scenario:
        train, test = embedded(session.train_indices, row_of), embedded(session.test_indices, row_of)
        Xtr, ytr = X[[row_of[i] for i in train]], scenario.dense_targets(train)
        t0 = time.perf_counter()
        learner.partial_fit(Xtr, ytr)
        seconds.append(time.perf_counter() - t0)
        extra = None
        if validation_indices is not None and len(validation_indices):
            val = embedded(np.asarray(validation_indices), row_of)
            val = val[np.isin(scenario.dense_targets(val), session.classes)] if len(val) else val
            if len(val):
                extra = (X[[row_of[i] for i in val]], scenario.dense_targets(val))
        calibration = cal.update(Xtr, ytr, held_out=extra)
        Xte, yte = X[[row_of[i] for i in test]], scenario.dense_targets(test)
        scores = learner.decision_function(Xte)
        pred = learner.classes_[scores.argmax(1)].cpu().numpy()
        matrix.record(session.index, yte, pred, scenario.session_classes)
        classes = learner.classes_.cpu().numpy()
        cols = np.argsort(classes)[np.searchsorted(np.sort(classes), yte)]
        raw = learner.predict_proba(Xte).numpy()
        calibrated = calibration.calibrator.proba(scores).numpy()
        pooled = cal.pool_scores()
        plain = Calibrator().fit(pooled[1], pooled[2]) if pooled is not None else Calibrator()
        tempered = plain.proba(scores).numpy()
        future = np.setdiff1d(everything, test)
        Xfu = X[[row_of[i] for i in future]] if len(future) else None
        row: dict = {
            "session": session.index, "classes_seen": int(len(session.seen_classes)),
            "unknown_test_clips": int(len(future)), "accuracy": float(matrix.seen_accuracy()[session.index]),
            "temperature": calibration.calibrator.temperature,
            "ece_raw": expected_calibration_error(raw, cols),
            "ece_calibrated": expected_calibration_error(calibrated, cols),
            "ece_floor": ece_sampling_floor(calibrated),
            "nll_raw": negative_log_likelihood(raw, cols),
            "nll_calibrated": negative_log_likelihood(calibrated, cols),
            "temperature_only": plain.temperature,
            "ece_temperature": expected_calibration_error(tempered, cols),
            "nll_temperature": negative_log_likelihood(tempered, cols),
            "threshold": calibration.detector.to_dict()["threshold"],
        }
        for k, kind in enumerate(kinds):
            known = cal.score(learner, Xte, kind, scores).numpy()
            unknown = cal.score(learner, Xfu, kind).numpy() if Xfu is not None else None
            suffix = "" if k == 0 else f"_{kind}"
            row[f"auroc{suffix}"] = None if unknown is None else auroc(known, unknown)
            row[f"far95{suffix}"] = None if unknown is None else far_at_tar(known, unknown, 0.95)
            if k == 0:
                rates = rejection_rates(known, unknown if unknown is not None else [], calibration.detector.threshold)
                row["false_rejection"] = rates["false_rejection"]
                row["false_acceptance"] = None if unknown is None else rates["false_acceptance"]
        per_session.append(row)
    return matrix, seconds, per_session
