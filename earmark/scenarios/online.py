"""The online single-pass protocol: each training item is seen once, in small batches, test-then-train.

Online continual learning (Si-Blurry, G-ACIL) has no epochs and no session-level fitting: the stream is
cut into small shuffled batches and the learner must predict each batch *before* it learns from it.
That prequential ("anytime") accuracy measures how well the learner does at every point of the stream;
the usual per-session :class:`~earmark.metrics.AccuracyMatrix` is still filled after each session.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from earmark.learners import IncrementalLearner
from earmark.metrics import AccuracyMatrix
from earmark.scenarios.class_incremental import ClassIncremental, Session


class StreamBatch(NamedTuple):
    """One online batch: dataset indices, the session it belongs to, and its position in that session."""

    indices: np.ndarray
    session: int
    step: int


def online_stream(source: Session | Iterable[Session], batch_size: int, seed: int = 0) -> Iterator[StreamBatch]:
    """Each session's training items once, shuffled within the session, in batches of ``batch_size``.

    Sessions keep their order (the stream is non-stationary by design); the last batch of a session
    may be smaller. The shuffle depends on (seed, session index) only, so it is reproducible.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sessions = [source] if isinstance(source, Session) else list(source)
    for session in sessions:
        rng = np.random.default_rng([seed, session.index])
        items = rng.permutation(np.asarray(session.train_indices, dtype=np.int64))
        for step, start in enumerate(range(0, len(items), batch_size)):
            yield StreamBatch(items[start : start + batch_size], session.index, step)


@dataclass
class OnlineResult:
    """The per-session accuracy matrix and the prequential record of the stream, one entry per batch."""

    matrix: AccuracyMatrix
    batch_correct: np.ndarray  # correct test-then-train predictions per batch
    batch_sizes: np.ndarray  # items per batch (embedded ones only)
    batch_sessions: np.ndarray  # session of each batch

    @property
    def curve(self) -> np.ndarray:
        """Cumulative prequential accuracy after each batch (all items predicted so far)."""
        return self.batch_correct.cumsum() / np.maximum(self.batch_sizes.cumsum(), 1)

    def prequential_accuracy(self) -> float:
        """Share of stream items predicted correctly before the learner saw them."""
        total = int(self.batch_sizes.sum())
        return float(self.batch_correct.sum() / total) if total else float("nan")

    def to_dict(self) -> dict:
        return {
            "accuracy_matrix": self.matrix.to_dict(),
            "batch_correct": self.batch_correct.tolist(),
            "batch_sizes": self.batch_sizes.tolist(),
            "batch_sessions": self.batch_sessions.tolist(),
            "prequential_accuracy": self.prequential_accuracy(),
        }


def _rows(indices: np.ndarray, row_of: dict[int, int]) -> tuple[np.ndarray, list[int]]:
    """The indices that have an embedding (skipped bad files have none) and their rows of X."""
    kept = np.asarray([i for i in indices if int(i) in row_of], dtype=np.int64)
    return kept, [row_of[int(i)] for i in kept]


@torch.no_grad()
def evaluate_online(
    learner: IncrementalLearner,
    scenario: ClassIncremental,
    X: torch.Tensor,
    row_of: dict[int, int],
    batch_size: int,
    seed: int = 0,
) -> OnlineResult:
    """Test-then-train over the single-pass stream; after each session, test on all seen classes.

    A batch is predicted before ``partial_fit`` sees it; before the first fit nothing can be predicted
    and the batch counts as wrong. Works with any scenario whose sessions follow :class:`Session`,
    including :class:`~earmark.scenarios.BlurryIncremental` with recurring classes.
    """
    matrix = AccuracyMatrix.empty(len(scenario))
    correct, sizes, sessions = [], [], []
    for session in scenario:
        for batch in online_stream(session, batch_size, seed):
            idx, rows = _rows(batch.indices, row_of)
            if not len(idx):
                continue
            y = scenario.dense_targets(idx)
            xb = X[rows]
            pred = learner.predict(xb).cpu().numpy() if learner.is_fitted else np.full(len(y), -1)
            correct.append(int((pred == y).sum()))
            sizes.append(len(y))
            sessions.append(session.index)
            learner.partial_fit(xb, y)
        test, rows = _rows(session.test_indices, row_of)
        y_test = scenario.dense_targets(test)
        pred = learner.predict(X[rows]).cpu().numpy() if learner.is_fitted and len(test) else np.full(len(test), -1)
        matrix.record(session.index, y_test, pred, scenario.session_classes)
    return OnlineResult(
        matrix=matrix,
        batch_correct=np.asarray(correct, dtype=np.int64),
        batch_sizes=np.asarray(sizes, dtype=np.int64),
        batch_sessions=np.asarray(sessions, dtype=np.int64),
    )
