"""Class-incremental scenarios: a class order cut into sessions, with dense labels and few-shot sampling.

Learners only ever see dense ids (``class_order[k]`` -> ``k``), so the scenario is the one place where
dataset class ids are translated, and every result can be mapped back to class names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from earmark.data.dataset import AudioDataset


@dataclass
class Session:
    """One step of a scenario: what is new, what has been seen, and which items to train and test on."""

    index: int
    classes: np.ndarray  # dense ids introduced in this session
    seen_classes: np.ndarray  # dense ids of all classes seen up to and including this session
    train_indices: np.ndarray  # dataset indices of this session's training items (after shot sampling)
    test_indices: np.ndarray  # dataset indices of the test items of all seen classes


def _as_index_array(values: Sequence[int] | np.ndarray, name: str, size: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D array of integer dataset indices, got shape {arr.shape} {arr.dtype}"
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= size:
        raise ValueError(f"{name} has indices outside 0..{size - 1} (min {arr.min()}, max {arr.max()})")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} has {len(arr) - len(np.unique(arr))} duplicate indices")
    return arr


def _session_sizes(n_classes: int, initial_increment: int, increment: int | Sequence[int]) -> list[int]:
    """Sizes of all sessions, session 0 first; raises with the numbers when they do not add up."""
    if initial_increment < 1:
        raise ValueError(f"initial_increment must be >= 1, got {initial_increment}")
    if initial_increment > n_classes:
        raise ValueError(
            f"initial_increment {initial_increment} is larger than the {n_classes} classes in the order"
        )
    rest = n_classes - initial_increment
    if isinstance(increment, int | np.integer):
        inc = int(increment)
        if inc < 1:
            raise ValueError(f"increment must be >= 1, got {inc}")
        if rest % inc:
            raise ValueError(
                f"{n_classes} classes - initial_increment {initial_increment} = {rest} remaining classes, "
                f"which is not a multiple of increment {inc} (remainder {rest % inc})"
            )
        return [initial_increment] + [inc] * (rest // inc)
    incs = [int(x) for x in increment]
    if any(x < 1 for x in incs):
        raise ValueError(f"every increment must be >= 1, got {incs}")
    if initial_increment + sum(incs) != n_classes:
        raise ValueError(
            f"initial_increment {initial_increment} + sum(increment) {sum(incs)} = "
            f"{initial_increment + sum(incs)}, "
            f"but the class order has {n_classes} classes"
        )
    return [initial_increment, *incs]


class ClassIncremental:
    """A class order split into sessions: session 0 learns ``initial_increment`` classes, later ones the rest.

    Each session trains on its new classes only (``shots`` items per class in sessions >= 1 when set,
    ``base_shots`` in session 0) and tests on the test items of every class seen so far. Shot sampling
    depends on (seed, trial, session, class) only, so it is reproducible and each trial draws fresh
    support sets over the same class order.
    """

    def __init__(
        self,
        dataset: AudioDataset,
        train_indices: Sequence[int] | np.ndarray,
        test_indices: Sequence[int] | np.ndarray,
        *,
        initial_increment: int,
        increment: int | Sequence[int],
        class_order: Sequence[int] | np.ndarray | None = None,
        shots: int | None = None,
        base_shots: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        trial: int = 0,
    ) -> None:
        if seed < 0 or trial < 0:
            raise ValueError(f"seed and trial must be >= 0, got seed={seed}, trial={trial}")
        for name, value in (("shots", shots), ("base_shots", base_shots)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (all items), got {value}")
        self.dataset = dataset
        self.train_pool = _as_index_array(train_indices, "train_indices", len(dataset))
        self.test_pool = _as_index_array(test_indices, "test_indices", len(dataset))
        overlap = np.intersect1d(self.train_pool, self.test_pool)
        if len(overlap):
            raise ValueError(
                f"{len(overlap)} items are in both train_indices and test_indices, "
                f"e.g. {overlap[:5].tolist()}"
            )
        self.shots = shots
        self.base_shots = base_shots
        self.seed = int(seed)
        self.trial = int(trial)

        train_targets = dataset.targets[self.train_pool]
        if class_order is None:
            present = np.unique(train_targets)
            order = np.random.default_rng(self.seed).permutation(present)
        else:
            order = np.asarray(class_order)
            if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
                raise ValueError(f"class_order must be a 1-D sequence of integer class ids, got {order!r}")
            order = order.astype(np.int64)
            unknown = sorted({int(c) for c in order if c < 0 or c >= dataset.num_classes})
            if unknown:
                raise ValueError(
                    f"class_order has unknown class ids {unknown}; dataset {dataset.name} has ids "
                    f"0..{dataset.num_classes - 1}"
                )
            values, counts = np.unique(order, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"class_order has duplicate class ids {values[counts > 1].tolist()}")
        if num_classes is not None:
            if not 1 <= num_classes <= len(order):
                raise ValueError(
                    f"num_classes must be in 1..{len(order)} (classes in the order), got {num_classes}"
                )
            order = order[:num_classes]
        if len(order) == 0:
            raise ValueError("the class order is empty: no classes in train_indices")
        self.class_order = order.astype(np.int64)
        names = [dataset.class_names[c] for c in self.class_order]
        if len(set(names)) != len(names):
            raise ValueError(f"class names in the order are not unique: {names}")
        missing = [dataset.class_names[c] for c in self.class_order if not (train_targets == c).any()]
        if missing:
            raise ValueError(f"classes with no items in train_indices: {missing}")

        sizes = _session_sizes(len(self.class_order), int(initial_increment), increment)
        self.initial_increment = sizes[0]
        self.increments = sizes[1:]
        # dataset class id -> dense id, -1 for classes outside the scenario
        self._dense_of = np.full(dataset.num_classes, -1, dtype=np.int64)
        self._dense_of[self.class_order] = np.arange(len(self.class_order))
        self.label_map: dict[str, int] = {name: k for k, name in enumerate(names)}
        self.inverse_label_map: dict[int, str] = dict(enumerate(names))
        bounds = np.cumsum([0, *sizes])
        self.session_classes: list[np.ndarray] = [
            np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(len(sizes))
        ]
        self._sessions = [self._build_session(i) for i in range(len(sizes))]

    def _build_session(self, index: int) -> Session:
        classes = self.session_classes[index]
        seen = np.arange(classes[-1] + 1, dtype=np.int64)
        k = self.base_shots if index == 0 else self.shots
        train_dense = self._dense_of[self.dataset.targets[self.train_pool]]
        parts = []
        for dense in classes:
            items = self.train_pool[train_dense == dense]
            if k is not None:
                original = int(self.class_order[dense])
                if len(items) < k:
                    raise ValueError(
                        f"class {self.dataset.class_names[original]!r} (id {original}) has {len(items)} "
                        f"training items, fewer than the {k} shots asked for in session {index}"
                    )
                rng = np.random.default_rng([self.seed, self.trial, index, original])
                items = rng.choice(items, size=k, replace=False)
            parts.append(items)
        train = np.sort(np.concatenate(parts)).astype(np.int64)
        test_dense = self._dense_of[self.dataset.targets[self.test_pool]]
        test = np.sort(self.test_pool[(test_dense >= 0) & (test_dense <= seen[-1])])
        return Session(
            index=index, classes=classes, seen_classes=seen, train_indices=train, test_indices=test
        )

    def with_trial(self, trial: int) -> ClassIncremental:
        """The same scenario and class order with freshly drawn few-shot support sets (trial ``trial``)."""
        return ClassIncremental(
            self.dataset, self.train_pool, self.test_pool, initial_increment=self.initial_increment,
            increment=list(self.increments), class_order=self.class_order, shots=self.shots,
            base_shots=self.base_shots, seed=self.seed, trial=trial,
        )

    @property
    def nb_classes(self) -> int:
        return len(self.class_order)

    @property
    def nb_sessions(self) -> int:
        return len(self._sessions)

    def dense_targets(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense labels of dataset items; raises for an item whose class is not in the scenario."""
        idx = np.asarray(indices, dtype=np.int64)
        original = self.dataset.targets[idx]
        dense = self._dense_of[original]
        bad = dense < 0
        if bad.any():
            names = sorted({self.dataset.class_names[c] for c in original[bad]})
            raise ValueError(
                f"{int(bad.sum())} items (e.g. index {int(idx[bad][0])}) belong to classes not in this "
                f"scenario: {names}"
            )
        return dense

    def __len__(self) -> int:
        return len(self._sessions)

    def __getitem__(self, i: int) -> Session:
        n = len(self._sessions)
        if not -n <= i < n:
            raise IndexError(f"session {i} out of range for a scenario with {n} sessions")
        return self._sessions[i]

    def __iter__(self) -> Iterator[Session]:
        return iter(self._sessions)

    def to_dict(self) -> dict:
        """A JSON-serializable description, enough to rebuild the scenario from the same dataset."""
        return {
            "dataset": self.dataset.name,
            "class_order": self.class_order.tolist(),
            "class_names": [self.dataset.class_names[c] for c in self.class_order],
            "initial_increment": self.initial_increment,
            "increments": list(self.increments),
            "session_classes": [c.tolist() for c in self.session_classes],
            "shots": self.shots,
            "base_shots": self.base_shots,
            "seed": self.seed,
            "trial": self.trial,
            "label_map": dict(self.label_map),
            "train_items": [len(s.train_indices) for s in self._sessions],
            "test_items": [len(s.test_indices) for s in self._sessions],
        }

    def __repr__(self) -> str:
        return (
            f"ClassIncremental({self.dataset.name}: {self.nb_classes} classes in {len(self)} sessions "
            f"{[self.initial_increment, *self.increments]}, shots={self.shots}, "
            f"base_shots={self.base_shots}, "
            f"seed={self.seed}, trial={self.trial})"
        )
