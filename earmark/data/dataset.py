"""The one dataset object every loader returns: file paths, integer targets with names, and folds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class AudioDataset:
    """A labelled set of audio files.

    ``targets[i]`` is an index into ``class_names``; ``folds[i]`` is the item's fold (or split id).
    Loaders keep the dataset's own class ids so nothing is relabelled silently; scenarios build
    their own dense label map on top.
    """

    name: str
    root: Path
    paths: list[Path]
    targets: np.ndarray
    class_names: list[str]
    folds: np.ndarray
    meta: dict = field(default_factory=dict)
    # (path, reason) of entries the loader passed over (dangling links, directories with audio names)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.folds = np.asarray(self.folds, dtype=np.int64)
        n = len(self.paths)
        if len(self.targets) != n or len(self.folds) != n:
            raise ValueError(
                f"dataset {self.name}: {n} paths, {len(self.targets)} targets, {len(self.folds)} folds"
            )
        if n and (self.targets.min() < 0 or self.targets.max() >= len(self.class_names)):
            raise ValueError(f"dataset {self.name}: targets outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, test_fold: int) -> tuple[np.ndarray, np.ndarray]:
        """Train and test item indices for a held-out fold."""
        if test_fold not in set(self.folds.tolist()):
            raise ValueError(f"dataset {self.name} has no fold {test_fold}; folds: {sorted(set(self.folds))}")
        test = np.flatnonzero(self.folds == test_fold)
        train = np.flatnonzero(self.folds != test_fold)
        return train, test

    def subset(self, indices: np.ndarray) -> AudioDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return AudioDataset(
            name=self.name,
            root=self.root,
            paths=[self.paths[i] for i in idx],
            targets=self.targets[idx],
            class_names=list(self.class_names),
            folds=self.folds[idx],
            meta=dict(self.meta),
        )
