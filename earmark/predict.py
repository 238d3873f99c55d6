"""Classify audio with a trained run: the saved embedder + a saved learner + the run's label map."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from earmark.audio.stream import iter_windows
from earmark.checkpoint import CheckpointError, load_tensors, read_json
from earmark.encoders.embedder import AudioEmbedder
from earmark.learners import IncrementalLearner, make_learner


@dataclass
class TrainedModel:
    embedder: AudioEmbedder
    learner: IncrementalLearner
    class_names: dict[int, str]  # learner label -> class name


def load_model(run_dir: str | Path, learner: str = "analytic", device: str = "cpu") -> TrainedModel:
    """Load what `earmark demo` / `earmark run` wrote into ``run_dir``."""
    run_dir = Path(run_dir)
    tensors, meta, _ = load_tensors(run_dir / f"learner-{learner}.safetensors", kind="learner")
    model = make_learner(meta["name"], **meta["config"])
    model.load_state_dict(tensors)
    results = run_dir / "results.json"
    if not results.is_file():
        raise CheckpointError(f"{results}: not found (needed for the class names)")
    try:
        label_map = read_json(results, "results")["scenario"]["label_map"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{results}: has no scenario label map ({exc!r})") from None
    embedder = AudioEmbedder.load(run_dir / "embedder.safetensors", device)
    return TrainedModel(embedder, model.to(device).eval(), {int(v): k for k, v in label_map.items()})


@torch.no_grad()
def predict_windows(
    model: TrainedModel, path: str | Path, window: float, hop: float, batch_size: int = 32
) -> Iterator[tuple[float, str, float]]:
    """(start s, class name, probability) per window of a recording of any length."""
    pending: list[tuple[float, np.ndarray]] = []

    def flush() -> Iterator[tuple[float, str, float]]:
        waves = np.stack([w for _, w in pending])
        proba = model.learner.predict_proba(model.embedder.embed(waves))
        best = proba.argmax(1)
        labels = model.learner.classes_[best]
        for (t, _), lab, p in zip(pending, labels.tolist(), proba[torch.arange(len(best)), best].tolist(), strict=True):
            yield t, model.class_names.get(int(lab), str(lab)), float(p)
        pending.clear()

    for item in iter_windows(path, window, hop, model.embedder.audio_config):
        pending.append(item)
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
