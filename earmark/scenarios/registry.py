"""Scenarios by name: each factory cuts a dataset's train / test indices into sessions."""

from __future__ import annotations

from typing import Any

import numpy as np

from earmark.data import AudioDataset
from earmark.registry import Registry
from earmark.scenarios.blurry import BlurryIncremental
from earmark.scenarios.class_incremental import ClassIncremental

SCENARIOS: Registry = Registry("scenario")


@SCENARIOS.register("class-incremental")
def class_incremental(
    dataset: AudioDataset, train: np.ndarray, test: np.ndarray, *, initial: int, increment: int,
    shots: int | None, seed: int, num_classes: int | None, class_order: list[int] | None,
    params: dict[str, Any] | None = None,
) -> ClassIncremental:
    """B/Inc sessions (few-shot when ``shots`` is set); takes no extra params."""
    if params:
        raise ValueError(f"scenario_params are for the blurry scenario, got {params}")
    return ClassIncremental(
        dataset, train, test, initial_increment=initial, increment=increment, shots=shots, seed=seed,
        num_classes=num_classes, class_order=class_order,
    )


@SCENARIOS.register("blurry")
def blurry(
    dataset: AudioDataset, train: np.ndarray, test: np.ndarray, *, initial: int, increment: int,
    shots: int | None, seed: int, num_classes: int | None, class_order: list[int] | None,
    params: dict[str, Any] | None = None,
) -> BlurryIncremental:
    """Si-Blurry-style sessions; the session count defaults to what initial/increment would give."""
    params = dict(params or {})
    if "num_sessions" not in params:
        n = num_classes or (len(class_order) if class_order else dataset.num_classes)
        params["num_sessions"] = 1 + max(0, -(-(n - initial) // increment))
    return BlurryIncremental(dataset, train, test, seed=seed, num_classes=num_classes, class_order=class_order,
                             **params)
