"""The joint reference (``--reference joint``): the same recipe with the encoder trained on all classes.

What separates an incremental result from training on everything at once, when the heads are exact
(``analytic`` equals the joint ridge on the same embeddings), is the encoder: trained on the base
classes only, it describes the later classes less well. The reference measures that gap. It is the
run that ``--initial <all classes>`` gives: the scenario's classes (the same class order, the same
folds, training clips and test clips) in one session, so the encoder is trained on every training clip
of every class and each head is fitted once on all of them; its accuracy on the test clips of all
classes is the upper reference for the incremental run's last accuracy, and ``ratio`` = incremental
last / joint last per head. Base and novel accuracy split the same test clips by the incremental
scenario's base and later classes.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from earmark.experiments.config import RunConfig
from earmark.experiments.evaluate import JointRidge, embedded
from earmark.experiments.prepare import Prepared, build_learner, encoder_summary, module_bytes, prepare
from earmark.experiments.report import log, nan_to_none
from earmark.experiments.rundir import RunWriter
from earmark.metrics import AccuracyMatrix, format_table
from earmark.plots import JOINT

REFERENCES = ("joint",)
FOLDER = "reference"  # the reference's embedder (and skipped.csv) inside the run folder


def check_reference(config: RunConfig) -> None:
    if config.reference is not None and config.reference not in REFERENCES:
        raise ValueError(f"unknown reference {config.reference!r}; choose one of {', '.join(REFERENCES)}")


def reference_config(config: RunConfig, prep: Prepared) -> RunConfig:
    """The all-classes run of ``config``: its scenario's class order in a single class-incremental session."""
    order = [int(c) for c in prep.scenario.class_order]
    return replace(config, class_order=order, num_classes=None, initial=len(order), scenario="class-incremental",
                   scenario_params={}, online_batch=None, class_split=None, reference=None)


def joint_reference(config: RunConfig, prep: Prepared, writer: RunWriter | None = None) -> dict:
    """Train the encoder on every class of ``prep``'s scenario, fit each of ``config.learners`` (and the
    joint ridge when ``config.joint_bound``) once on all training clips, test on all test clips.

    Returns ``{"kind", "scenario", "encoder", "learners": {name: {"last_accuracy", "base_accuracy",
    "novel_accuracy", "fit_seconds", "nbytes", "accuracy_matrix"}}, "timings"}``; the accuracy matrix
    has the incremental scenario's sessions, with only its last row filled.
    """
    check_reference(config)
    ref_config = reference_config(config, prep)
    log(f"joint reference: the same recipe with the encoder trained on all {len(ref_config.class_order)} classes",
        config.progress)
    t = time.perf_counter()
    ref = prepare(ref_config, writer=writer, folder=FOLDER)
    timings = {"prepare": time.perf_counter() - t, **{f"prepare:{k}": v for k, v in ref.timings.items()}}
    groups = prep.scenario.session_classes
    encoder_bytes = module_bytes(ref.embedder.encoder)
    learners: dict[str, dict] = {}
    for name in config.learners:
        learner = build_learner(config, name, encoder_bytes)
        t = time.perf_counter()
        inputs = ref.inputs_for(learner)
        matrix, seconds = _fit_once(learner.partial_fit, learner.predict, ref, inputs, groups)
        timings[f"learner:{name}"] = time.perf_counter() - t
        learners[name] = _entry(matrix, seconds, ref.total_bytes(learner))
    if config.joint_bound:
        ridge = JointRidge(config.learner_params.get("analytic", {}), ref.X.shape[1])
        t = time.perf_counter()
        matrix, seconds = _fit_once(ridge.fit, ridge.predict, ref, ref.X, groups)
        timings[f"learner:{JOINT}"] = time.perf_counter() - t
        learners[JOINT] = _entry(matrix, seconds, None)
    return {"kind": "joint", "scenario": ref.scenario.to_dict(), "encoder": encoder_summary(ref),
            "learners": learners, "timings": timings}


def _fit_once(fit, predict, ref: Prepared, X, groups: list[np.ndarray]) -> tuple[AccuracyMatrix, float]:
    scenario, row_of = ref.scenario, ref.row_of
    session = scenario[0]
    train, test = embedded(session.train_indices, row_of), embedded(session.test_indices, row_of)
    t0 = time.perf_counter()
    fit(X[[row_of[i] for i in train]], scenario.dense_targets(train))
    seconds = time.perf_counter() - t0
    pred = predict(X[[row_of[i] for i in test]])
    pred = pred.cpu().numpy() if hasattr(pred, "cpu") else np.asarray(pred)
    matrix = AccuracyMatrix.empty(len(groups))
    matrix.record(len(groups) - 1, scenario.dense_targets(test), pred, groups)
    return matrix, seconds


def _entry(matrix: AccuracyMatrix, seconds: float, nbytes: int | None) -> dict:
    return nan_to_none({"last_accuracy": matrix.last_accuracy(), "base_accuracy": matrix.base_accuracy(),
                        "novel_accuracy": matrix.novel_accuracy(), "fit_seconds": seconds, "nbytes": nbytes,
                        "accuracy_matrix": matrix.to_dict()})


def ratio_rows(incremental: dict[str, dict], reference: dict) -> list[dict]:
    """Per head: incremental last and novel (mean, std over trials) beside the joint reference's, and
    ``ratio`` = incremental last / joint last (its std: the incremental std over the same joint figure).

    ``incremental``: name -> {"last_accuracy": (mean, std), "novel_accuracy": (mean, std)}; std None for
    a single run.
    """
    rows = []
    for name, inc in incremental.items():
        ref = reference["learners"].get(name)
        if ref is None:
            continue
        last, last_std = inc["last_accuracy"]
        joint = ref["last_accuracy"]
        ok = joint not in (None, 0) and last is not None and last == last
        rows.append({
            "learner": name, "last": last, "last_std": last_std, "joint_last": joint,
            "ratio": last / joint if ok else None,
            "ratio_std": last_std / joint if ok and last_std is not None else None,
            "novel": inc["novel_accuracy"][0], "novel_std": inc["novel_accuracy"][1],
            "joint_novel": ref["novel_accuracy"], "joint_base": ref["base_accuracy"],
        })
    return rows


def render_reference(rows: list[dict], reference: dict) -> str:
    def pct(v, s=None):
        if v is None or v != v:
            return "-"
        return f"{100 * v:.1f}" if s is None or s != s else f"{100 * v:.1f} +- {100 * s:.1f}"

    def ratio(r):
        if r["ratio"] is None:
            return "-"
        return f"{r['ratio']:.3f}" + (f" +- {r['ratio_std']:.3f}" if r["ratio_std"] is not None else "")

    table = [{"learner": r["learner"], "last": pct(r["last"], r["last_std"]), "joint last": pct(r["joint_last"]),
              "ratio": ratio(r),
              "novel": pct(r["novel"], r["novel_std"]), "joint novel": pct(r["joint_novel"]),
              "joint base": pct(r["joint_base"])} for r in rows]
    n = len(reference["scenario"]["class_order"])
    return "\n".join([
        f"Joint reference (--reference joint): the same recipe with the encoder trained on all {n} classes' "
        "training clips,",
        "each head fitted once on all of them, tested on the same test clips (%); ratio = incremental last / "
        "joint last;",
        "novel / base: the incremental scenario's later / base classes:",
        format_table(table, ["learner", "last", "joint last", "ratio", "novel", "joint novel", "joint base"]),
    ])


__all__ = ["REFERENCES", "joint_reference", "ratio_rows", "reference_config", "render_reference"]
