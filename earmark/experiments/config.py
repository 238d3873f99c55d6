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
    # "tune" or "eval": only one of two disjoint parts of the dataset's class ids, cut by a permutation seeded
    # by `class_split_seed` (not by `seed`: every run and seed sees the same parts); `class_split_fraction`
    # of the classes are in "tune". `earmark tune --class-split tune`, then `earmark compare --class-split
    # eval --params params.yaml`: the hyperparameters never see an evaluated class. Within the part the order
    # is seeded by `seed` as usual; not with `class_order`.
    class_split: str | None = None
    class_split_fraction: float = 0.5
    class_split_seed: int = 0
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
    # "joint": also the upper reference, the same recipe with the encoder trained on every class of the
    # scenario (the run `initial` = all classes gives), every learner fitted once on top; reported beside
    # the incremental rows with the ratio incremental last / joint last (earmark.experiments.reference).
    reference: str | None = None
    # Where the learner params came from, filled by the CLI from the tune.json beside a --params file
    # (dataset, root, class names of the tuning scenario); results.json says whether they overlap this run.
    tuned_on: dict | None = None
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
        fields = set(TrainConfig.__dataclass_fields__)
        bad = sorted(set(values["train"]) - fields)
        if bad:
            raise ValueError(f"unknown train option(s): {', '.join(bad)}; known: {', '.join(sorted(fields))}")
        values["train"] = TrainConfig(**values["train"])
    config = RunConfig(**values)
    check_class_split(config)
    return config


def check_class_split(config: RunConfig) -> None:
    if config.class_split is None:
        return
    if config.class_split not in ("tune", "eval"):
        raise ValueError(f"class_split must be 'tune' or 'eval', got {config.class_split!r}")
    if config.class_order is not None:
        raise ValueError("give class_order (--class-order) or class_split (--class-split), not both")
    if not 0.0 < config.class_split_fraction < 1.0:
        raise ValueError(f"class_split_fraction must be in (0, 1), got {config.class_split_fraction}")


def split_classes(num_classes: int, fraction: float = 0.5, seed: int = 0) -> dict[str, list[int]]:
    """The two disjoint parts of class ids 0..num_classes-1: {"tune": round(fraction * n) ids, "eval": the
    rest}, each sorted, cut by a permutation seeded by ``seed`` only."""
    import numpy as np

    order = np.random.default_rng([seed, 0xC1A55]).permutation(num_classes)
    k = min(max(int(round(fraction * num_classes)), 1), num_classes - 1)
    return {"tune": sorted(int(c) for c in order[:k]), "eval": sorted(int(c) for c in order[k:])}
