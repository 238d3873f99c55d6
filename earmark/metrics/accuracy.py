"""The accuracy matrix of a class-incremental run, and every metric derived from it.

Only two integer tables are stored -- correct and total test predictions per (session, class group) --
so all metrics are item-weighted where they pool groups and can be recomputed from a results file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _ratio(num: float | np.ndarray, den: float | np.ndarray) -> float | np.ndarray:
    """num / den with NaN where den is 0 (nothing evaluated means unknown, not 0)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


@dataclass
class AccuracyMatrix:
    """Correct and evaluated test predictions after session i on the classes introduced in session j.

    ``correct[i, j]`` and ``counts[i, j]`` are zero for j > i: classes not yet introduced are never tested.
    A test prediction naming a class not yet seen is simply wrong.
    """

    correct: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        self.correct = np.asarray(self.correct, dtype=np.int64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        shape = self.counts.shape
        if self.correct.shape != shape or len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
            raise ValueError(
                f"correct {self.correct.shape} and counts {shape} must be the same (T, T) shape, T >= 1"
            )
        if (self.correct < 0).any() or (self.correct > self.counts).any():
            raise ValueError("correct must satisfy 0 <= correct <= counts element-wise")
        upper = np.triu(np.ones(shape, dtype=bool), k=1)
        if self.counts[upper].any():
            raise ValueError("counts above the diagonal must be 0: groups are only tested once introduced")

    @classmethod
    def empty(cls, num_sessions: int) -> AccuracyMatrix:
        """A matrix to fill session by session with :meth:`record`."""
        if num_sessions < 1:
            raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
        z = np.zeros((num_sessions, num_sessions), dtype=np.int64)
        return cls(z, z.copy())

    @property
    def num_sessions(self) -> int:
        return self.counts.shape[0]

    def _index(self, i: int) -> int:
        T = self.num_sessions
        if not -T <= i < T:
            raise IndexError(f"session {i} out of range for {T} sessions")
        return i % T

    def record(
        self, i: int, y_true: np.ndarray, y_pred: np.ndarray, session_classes: list[np.ndarray]
    ) -> AccuracyMatrix:
        """Fill row i from the test labels and predictions after session i (replacing any earlier row i).

        ``session_classes[j]`` are the (dense) labels introduced in session j; every true label must belong
        to a group j <= i, since only seen classes are tested.
        """
        i = self._index(i)
        if len(session_classes) != self.num_sessions:
            raise ValueError(
                f"{len(session_classes)} session class groups for a {self.num_sessions}-session matrix"
            )
        y_true = np.asarray(y_true).reshape(-1)
        y_pred = np.asarray(y_pred).reshape(-1)
        if len(y_true) != len(y_pred):
            raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
        group_of = {}
        for j, classes in enumerate(session_classes):
            for c in np.asarray(classes).reshape(-1).tolist():
                if c in group_of:
                    raise ValueError(f"class {c} is in session groups {group_of[c]} and {j}")
                group_of[c] = j
        unknown = sorted({c for c in y_true.tolist() if c not in group_of})
        if unknown:
            raise ValueError(f"true labels {unknown[:10]} belong to no session group")
        groups = np.array([group_of[c] for c in y_true.tolist()], dtype=np.int64)
        if (groups > i).any():
            later = sorted(set(groups[groups > i].tolist()))
            raise ValueError(f"after session {i}, test labels from later groups {later}")
        hit = (y_true == y_pred).astype(np.int64)
        self.counts[i] = np.bincount(groups, minlength=self.num_sessions)
        self.correct[i] = np.bincount(groups, weights=hit, minlength=self.num_sessions).astype(np.int64)
        return self

    @classmethod
    def from_predictions(
        cls,
        y_true_per_session: list[np.ndarray],
        y_pred_per_session: list[np.ndarray],
        session_classes: list[np.ndarray],
    ) -> AccuracyMatrix:
        """Build the whole matrix from each session's test labels and predictions."""
        T = len(session_classes)
        if len(y_true_per_session) != T or len(y_pred_per_session) != T:
            raise ValueError(
                f"{len(y_true_per_session)} label and {len(y_pred_per_session)} prediction arrays "
                f"for {T} sessions"
            )
        m = cls.empty(T)
        for i in range(T):
            m.record(i, y_true_per_session[i], y_pred_per_session[i], session_classes)
        return m

    @property
    def matrix(self) -> np.ndarray:
        """A[i, j]: accuracy after session i on the classes introduced in session j; NaN for j > i."""
        return _ratio(self.correct, self.counts)

    def seen_accuracy(self) -> np.ndarray:
        """Accuracy after each session on all seen classes, weighted by test items (not by groups)."""
        return _ratio(self.correct.sum(1), self.counts.sum(1))

    def average_incremental_accuracy(self) -> float:
        """Mean of the per-session seen accuracy, session 0 included."""
        return float(np.mean(self.seen_accuracy()))

    def last_accuracy(self) -> float:
        return float(self.seen_accuracy()[-1])

    def performance_drop(self) -> float:
        """Seen accuracy after session 0 minus after the last session (PD)."""
        acc = self.seen_accuracy()
        return float(acc[0] - acc[-1])

    def forgetting(self) -> float:
        """Mean over groups j < T-1 of (best A[i, j] for j <= i < T-1) - A[T-1, j].

        The best is taken before the final session and includes the session a group was learned in;
        the group learned in the final session has nothing to forget and is left out. NaN when T == 1
        (or when a needed cell was never evaluated).
        """
        T = self.num_sessions
        if T == 1:
            return float("nan")
        A = self.matrix
        drops = [np.max(A[j : T - 1, j]) - A[T - 1, j] for j in range(T - 1)]
        return float(np.mean(drops))

    def backward_transfer(self) -> float:
        """Mean over groups j < T-1 of A[T-1, j] - A[j, j] (Lopez-Paz & Ranzato 2017). NaN when T == 1."""
        T = self.num_sessions
        if T == 1:
            return float("nan")
        A = self.matrix
        return float(np.mean([A[T - 1, j] - A[j, j] for j in range(T - 1)]))

    def base_accuracy(self, i: int = -1) -> float:
        """Accuracy after session i on the base (session 0) classes."""
        return float(self.matrix[self._index(i), 0])

    def novel_accuracy(self, i: int = -1) -> float:
        """Accuracy after session i on classes of sessions 1..i, item-weighted; NaN after session 0."""
        i = self._index(i)
        return _ratio(self.correct[i, 1 : i + 1].sum(), self.counts[i, 1 : i + 1].sum())

    def harmonic_mean(self, i: int = -1) -> float:
        """Harmonic mean of base and novel accuracy after session i, 0 when both are 0."""
        a, b = self.base_accuracy(i), self.novel_accuracy(i)
        if np.isnan(a) or np.isnan(b):
            return float("nan")
        return 0.0 if a + b == 0 else float(2 * a * b / (a + b))

    def summary(self) -> dict[str, float]:
        """Every scalar metric under a stable name (fractions in [0, 1]; NaN where undefined)."""
        return {
            "average_incremental_accuracy": self.average_incremental_accuracy(),
            "last_accuracy": self.last_accuracy(),
            "performance_drop": self.performance_drop(),
            "forgetting": self.forgetting(),
            "backward_transfer": self.backward_transfer(),
            "base_accuracy": self.base_accuracy(),
            "novel_accuracy": self.novel_accuracy(),
            "harmonic_mean": self.harmonic_mean(),
        }

    def to_dict(self) -> dict:
        return {"correct": self.correct.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> AccuracyMatrix:
        return cls(np.asarray(d["correct"], dtype=np.int64), np.asarray(d["counts"], dtype=np.int64))
