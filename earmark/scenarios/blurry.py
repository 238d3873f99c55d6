"""Generalized ("blurry") class-incremental streams in the style of Si-Blurry (Moon et al., ICCV 2023).

Real streams do not introduce each class once and never again: classes recur across sessions, sessions
differ in how many classes and items they hold, and some classes still occur in one session only.
``BlurryIncremental`` builds such a split while keeping the :class:`Session` contract the harness and
metrics rely on, so an :class:`~earmark.metrics.AccuracyMatrix` still groups test items by the session
that *introduced* (first showed) their class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from earmark.data.dataset import AudioDataset
from earmark.scenarios.class_incremental import ClassIncremental, Session, _as_index_array


class BlurryIncremental(ClassIncremental):
    """Classes spread over ``num_sessions`` sessions with recurrence and uneven sizes.

    Construction, all seeded:

    1. The class order (``class_order`` or a permutation seeded by ``seed``) is cut into ``num_sessions``
       contiguous chunks of uneven sizes (1 + a multinomial draw over Dirichlet(``concentration``)
       weights; lower concentration means more uneven); a class's chunk is its *home* session.
    2. ``round(disjoint_fraction * C)`` classes, drawn at random, are *disjoint* (Si-Blurry's N%): all
       their training items stay in their home session. The others are *blurry*.
    3. For each blurry class, ``floor(blurry_fraction * n)`` of its n training items (Si-Blurry's M%)
       move to other sessions drawn uniformly, so about that share of a session's blurry-class items
       belongs to classes homed elsewhere. The first class of each home chunk is an *anchor* whose items
       only move to later sessions, which guarantees that every session introduces at least one class.

    Dense ids follow first appearance (session, then position in the order), so ``class_order[k]`` is
    the k-th class introduced and ``session_classes`` are contiguous ranges as in ``ClassIncremental``.
    ``Session.classes`` are the classes first seen in that session; ``train_indices`` may hold items of
    classes introduced earlier (or, for a recurring class, later sessions hold more of its items).
    Every training item is used in exactly one session; there is no shot sampling. ``trial`` redraws
    which items move (same order, homes and disjoint classes), which may change first appearances.
    """

    def __init__(
        self,
        dataset: AudioDataset,
        train_indices: Sequence[int] | np.ndarray,
        test_indices: Sequence[int] | np.ndarray,
        *,
        num_sessions: int,
        disjoint_fraction: float = 0.5,
        blurry_fraction: float = 0.1,
        concentration: float = 1.0,
        class_order: Sequence[int] | np.ndarray | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        trial: int = 0,
    ) -> None:
        if not 0.0 <= disjoint_fraction <= 1.0:
            raise ValueError(f"disjoint_fraction must be in [0, 1], got {disjoint_fraction}")
        if not 0.0 <= blurry_fraction < 1.0:
            raise ValueError(f"blurry_fraction must be in [0, 1), got {blurry_fraction}")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        n_classes = self._count_classes(dataset, train_indices, class_order, num_classes)
        if not 1 <= num_sessions <= n_classes:
            raise ValueError(f"num_sessions must be in 1..{n_classes} (classes in the order), got {num_sessions}")
        # The parent validates pools and order and sets up the label bookkeeping for a one-session split;
        # the blurry sessions then replace its sessions and relabel classes by first appearance.
        super().__init__(
            dataset, train_indices, test_indices, initial_increment=n_classes, increment=[],
            class_order=class_order, seed=seed, num_classes=num_classes, trial=trial,
        )
        self.num_sessions = int(num_sessions)
        self.disjoint_fraction = float(disjoint_fraction)
        self.blurry_fraction = float(blurry_fraction)
        self.concentration = float(concentration)
        self.source_order = self.class_order.copy()  # before relabelling; rebuilds the same scenario
        self._build_blurry()

    @staticmethod
    def _count_classes(
        dataset: AudioDataset,
        train_indices: Sequence[int] | np.ndarray,
        class_order: Sequence[int] | np.ndarray | None,
        num_classes: int | None,
    ) -> int:
        """Classes the parent will keep; invalid input is reported by the parent's checks."""
        if class_order is None:
            pool = _as_index_array(train_indices, "train_indices", len(dataset))
            n = len(np.unique(dataset.targets[pool]))
        else:
            n = len(np.asarray(class_order).reshape(-1))
        return min(n, num_classes) if num_classes is not None and num_classes >= 1 else n

    def _build_blurry(self) -> None:
        C, T, order = len(self.source_order), self.num_sessions, self.source_order
        rng = np.random.default_rng([self.seed, 0x5B1])  # the structure: same for every trial
        weights = rng.dirichlet(np.full(T, self.concentration))
        chunk = 1 + rng.multinomial(C - T, weights)
        home = np.repeat(np.arange(T), chunk)  # home session of order[k]
        anchor = np.zeros(C, dtype=bool)
        anchor[np.cumsum([0, *chunk[:-1]])] = True
        disjoint = np.zeros(C, dtype=bool)
        disjoint[rng.choice(C, size=int(round(self.disjoint_fraction * C)), replace=False)] = True

        item_rng = np.random.default_rng([self.seed, self.trial, 0x5B2])
        targets = self.dataset.targets[self.train_pool]
        session_of = np.full(len(self.train_pool), -1, dtype=np.int64)
        for k, c in enumerate(order):
            pos = np.flatnonzero(targets == c)
            session_of[pos] = home[k]
            if disjoint[k] or self.blurry_fraction == 0:
                continue
            dest = np.arange(home[k] + 1, T) if anchor[k] else np.delete(np.arange(T), home[k])
            n_move = int(np.floor(self.blurry_fraction * len(pos)))
            if n_move == 0 or len(dest) == 0:
                continue
            moved = item_rng.choice(pos, size=n_move, replace=False)
            session_of[moved] = item_rng.choice(dest, size=n_move)

        first = np.array([session_of[targets == c].min() for c in order])
        relabel = np.lexsort((np.arange(C), first))  # by first session, then by order
        self.class_order = order[relabel]
        self.home_sessions = home[relabel]
        self.disjoint_classes = np.flatnonzero(disjoint[relabel]).astype(np.int64)  # dense ids
        names = [self.dataset.class_names[c] for c in self.class_order]
        self._dense_of = np.full(self.dataset.num_classes, -1, dtype=np.int64)
        self._dense_of[self.class_order] = np.arange(C)
        self.label_map = {name: k for k, name in enumerate(names)}
        self.inverse_label_map = dict(enumerate(names))
        sizes = np.bincount(first, minlength=T)
        bounds = np.cumsum([0, *sizes])
        self.session_classes = [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(T)]
        self.initial_increment, self.increments = int(sizes[0]), [int(s) for s in sizes[1:]]

        test_dense = self._dense_of[self.dataset.targets[self.test_pool]]
        self._sessions = []
        for i in range(T):
            seen = np.arange(bounds[i + 1], dtype=np.int64)
            test = np.sort(self.test_pool[(test_dense >= 0) & (test_dense < bounds[i + 1])])
            train = np.sort(self.train_pool[session_of == i]).astype(np.int64)
            self._sessions.append(
                Session(index=i, classes=self.session_classes[i], seen_classes=seen, train_indices=train,
                        test_indices=test)
            )

    def with_trial(self, trial: int) -> BlurryIncremental:
        """Same order, homes and disjoint classes, with a fresh draw of which items move (trial ``trial``)."""
        return BlurryIncremental(
            self.dataset, self.train_pool, self.test_pool, num_sessions=self.num_sessions,
            disjoint_fraction=self.disjoint_fraction, blurry_fraction=self.blurry_fraction,
            concentration=self.concentration, class_order=self.source_order, seed=self.seed, trial=trial,
        )

    def session_class_counts(self) -> list[int]:
        """Number of distinct classes in each session's training items (new and recurring)."""
        return [len(np.unique(self.dense_targets(s.train_indices))) for s in self._sessions]

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(
            kind="blurry", num_sessions=self.num_sessions, disjoint_fraction=self.disjoint_fraction,
            blurry_fraction=self.blurry_fraction, concentration=self.concentration,
            source_order=self.source_order.tolist(), home_sessions=self.home_sessions.tolist(),
            disjoint_classes=self.disjoint_classes.tolist(), session_class_counts=self.session_class_counts(),
        )
        return d

    def __repr__(self) -> str:
        return (
            f"BlurryIncremental({self.dataset.name}: {self.nb_classes} classes in {len(self)} sessions "
            f"introducing {[len(c) for c in self.session_classes]}, disjoint_fraction={self.disjoint_fraction}, "
            f"blurry_fraction={self.blurry_fraction}, seed={self.seed}, trial={self.trial})"
        )
