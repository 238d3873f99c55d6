"""The run's configuration: everything a run depends on, written resolved into results.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from earmark.data import RenderConfig
from earmark.training.supervised import TrainConfig


@dataclass
class RunConfig:
    """Everything a run depends on; written resolved into results.json."""

    root: str | None = None  # a dataset folder; None renders/reuses the embedded default
    dataset: str = "esc50"  # loader name for `root`
    out: str = "runs/demo"
    cache_dir: str | None = None  # default: <data dir>/cache
    num_classes: int | None = None  # None: every class of the dataset
    # Dataset class ids in the order they are learned; a subset restricts the run to those classes
    # (e.g. tune on one half, evaluate on the other). None: a permutation seeded by `seed`.
    class_order: list[int] | None = None
    initial: int = 60
    increment: int = 5
    shots: int | None = 5  # training clips per new class in later sessions; None = all
    test_fold: int = 5
    train_folds: list[int] | None = None  # None: every fold but the test fold (few-shot sets: [1])
    on_error: str = "fail"  # a bad audio file: "fail" with a clear message, or "skip" and report it
    encoder: str | dict = "fast"  # a preset name or EncoderConfig fields
    clip_seconds: float = 2.0  # every clip is cropped or padded to this length
    pretrained: str | None = None  # an `earmark pretrain` checkpoint to start base training from
    learners: list[str] = field(default_factory=lambda: ["ncm", "analytic"])
    # Total bytes each learner may hold (its state, exemplars and the encoder it relies on). Replay-style
    # learners fill what their model leaves with exemplars; the others are reported against it.
    memory_budget: int | None = None
    # "class-incremental" (B/Inc, few-shot with `shots`) or "blurry" (Si-Blurry style: classes recur with
    # uneven counts; `scenario_params` holds num_sessions, disjoint_fraction, blurry_fraction, concentration).
    scenario: str = "class-incremental"
    scenario_params: dict = field(default_factory=dict)
    online_batch: int | None = None  # single pass in batches of this size, test-then-train
    # gamma scales with the embedding's energy: 0.1 (ACIL's default for ImageNet features) overfits
    # these embeddings; see the README for the sweep behind 1000 (DS-AL's streams get the same value).
    learner_params: dict[str, dict] = field(
        default_factory=lambda: {"analytic": {"gamma": 1000.0}, "dsal": {"gamma": 1000.0, "gamma_comp": 1000.0}}
    )
    joint_bound: bool = True
    # The learner of the model directory written to <out>/model (what `earmark predict/learn/forget` use):
    # None picks analytic if it ran, else the first learner on embeddings that ran; "" writes no model.
    model_learner: str | None = None
    seed: int = 0  # one seed for everything: class order, support sets, encoder init and base training
    device: str = "cpu"
    batch_size: int = 64  # for embedding
    retrain: bool = False  # ignore a cached trained encoder
    # Continue an interrupted run from its checkpoints: base training (<cache>/encoders/<key>.partial.*) and the
    # backbone learners' sessions (<cache>/encoders/<key>.sessions/<run key>/, deleted once the run is written).
    resume: bool = True
    progress: bool = True
    render: RenderConfig = field(default_factory=RenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config_file(path: str | Path) -> dict:
    """A YAML file of run options, as a mapping; a missing, corrupt or non-mapping file names itself."""
    from earmark.checkpoint import read_yaml_mapping

    return read_yaml_mapping(path, "config", "run options")


def run_config_from_dict(values: dict) -> RunConfig:
    """Build a RunConfig from plain values (a YAML file, CLI flags); unknown keys are an error."""
    known = set(RunConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown run option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = dict(values)
    if isinstance(values.get("render"), dict):
        values["render"] = RenderConfig(**values["render"])
    if isinstance(values.get("train"), dict):
        values["train"] = TrainConfig(**values["train"])
    return RunConfig(**values)
