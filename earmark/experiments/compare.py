"""`earmark compare`: several learners on one scenario, the same cached embeddings, R support-set trials.

The class order and the base-session encoder stay fixed (so the encoder is trained once); each trial
redraws the few-shot support sets, which is the protocol of the few-shot audio CIL papers. Every
number comes from the per-trial accuracy matrices; the table shows mean +- std over trials.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from earmark.calibration import default_calibrator
from earmark.experiments.config import RunConfig
from earmark.experiments.evaluate import evaluate, evaluate_joint, evaluate_open_set
from earmark.experiments.prepare import (
    build_learner,
    encoder_summary,
    learner_checkpoints,
    module_bytes,
    prepare,
    remove_learner_checkpoints,
    tuning_check,
)
from earmark.experiments.reference import check_reference, joint_reference, ratio_rows, render_reference
from earmark.experiments.report import jsonable, log, nan_to_none
from earmark.experiments.rundir import RunWriter
from earmark.metrics import format_table
from earmark.plots import JOINT, save_figure

METRICS = {
    "average_incremental_accuracy": "AA",
    "last_accuracy": "last",
    "forgetting": "forgetting",
    "performance_drop": "PD",
    "base_accuracy": "base",
    "novel_accuracy": "novel",
    "harmonic_mean": "HM",
}

ONLINE = {"prequential_accuracy": "prequential"}  # test-then-train accuracy, with --online-batch

# Closed-form heads get per-session calibration and known-vs-future figures (earmark.calibration): their
# shadow refit is as cheap as the learner; gradient-trained learners would double their training time.
OPEN_SET_LEARNERS = ("ncm", "lda", "analytic", "ranpac", "dsal", "teen")
OPEN_SET = {"accuracy": "acc", "ece_raw": "ECE raw", "ece_calibrated": "ECE cal", "nll_raw": "NLL raw",
            "nll_calibrated": "NLL cal", "auroc": "AUROC", "far95": "FAR@95"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    return (float(a.mean()), float(a.std())) if len(a) else (float("nan"), float("nan"))


def compare(config: RunConfig, trials: int = 3) -> dict:
    """Run every learner in ``config.learners`` over ``trials`` support-set draws; write a report."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    t_start = time.perf_counter()
    with RunWriter(config.out) as writer:  # the folder is replaced as a whole when the block ends
        results, per_learner, checkpoints = _compare(config, trials, writer, t_start)
    remove_learner_checkpoints(checkpoints)  # only now: a crash before the folder is in place resumes from them
    print(render_compare(per_learner, trials, config.memory_budget))
    if "reference" in results:
        print("\n" + render_reference(results["reference"]["ratios"], results["reference"]))
    if any(entry.get("open_set_mean") for entry in per_learner.values()):
        print(render_open_set(per_learner))
    return results


def _compare(config: RunConfig, trials: int, writer: RunWriter, t_start: float) -> tuple[dict, dict, Path]:
    check_reference(config)  # before any work
    prep = prepare(config, embed_train_pool=trials > 1, writer=writer)
    checkpoints = learner_checkpoints(config, prep)
    scenario, row_of = prep.scenario, prep.row_of
    per_learner: dict[str, dict] = {}
    encoder_bytes = module_bytes(prep.embedder.encoder)
    for name in config.learners:
        runs = []
        for trial in range(trials):
            learner = build_learner(config, name, encoder_bytes)
            inputs = prep.inputs_for(learner)
            open_set = None
            if config.online_batch is None and name in OPEN_SET_LEARNERS and learner.input_ndim == 2:
                matrix, seconds, open_set = evaluate_open_set(learner, scenario.with_trial(trial), inputs, row_of,
                                                              seed=config.seed, calibrator=default_calibrator(learner))
                online = {}
            else:
                matrix, seconds, online = evaluate(config, learner, scenario.with_trial(trial), inputs, row_of,
                                                   checkpoints / f"{name}-trial{trial}")
            runs.append({"trial": trial, "matrix": matrix, "seconds": seconds, "nbytes": prep.total_bytes(learner),
                         "online": online, "open_set": open_set})
        per_learner[name] = _entry(runs, config)
        log(f"{name}: AA {100 * per_learner[name]['mean']['average_incremental_accuracy'][0]:.1f}", config.progress)
    if config.joint_bound and config.online_batch is None:  # the row `run` prints: one ridge on all data seen
        params = config.learner_params.get("analytic", {})
        runs = [evaluate_joint(scenario.with_trial(trial), prep.X, row_of, params) for trial in range(trials)]
        per_learner[JOINT] = _entry([{"trial": k, "matrix": m, "seconds": sec, "nbytes": None, "online": {},
                                      "open_set": None} for k, (m, sec) in enumerate(runs)], config)
    reference = joint_reference(config, prep, writer) if config.reference else None
    results = {
        "config": jsonable(asdict(config)),
        "trials": trials,
        "memory_budget": config.memory_budget,
        "scenario": scenario.to_dict(),
        "encoder": encoder_summary(prep),
        "learners": nan_to_none(per_learner),
        "seconds": time.perf_counter() - t_start,
    }
    tuning = tuning_check(config, scenario)
    if tuning is not None:
        results["tuning"] = tuning
    if reference is not None:
        incremental = {name: {k: tuple(entry["mean"][k]) for k in ("last_accuracy", "novel_accuracy")}
                       for name, entry in per_learner.items()}
        results["reference"] = {**reference, "ratios": nan_to_none(ratio_rows(incremental, reference))}
        buf = io.StringIO()
        ratios = csv.DictWriter(buf, fieldnames=list(results["reference"]["ratios"][0]))
        ratios.writeheader()
        ratios.writerows(results["reference"]["ratios"])
        writer.write_text("reference.csv", buf.getvalue())
    writer.write_text("results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    rows = table_rows(per_learner, config.memory_budget)
    buf = io.StringIO()
    table = csv.DictWriter(buf, fieldnames=list(rows[0]))
    table.writeheader()
    table.writerows(rows)
    writer.write_text("compare.csv", buf.getvalue())
    plot_compare(results, writer.folder)
    return results, per_learner, checkpoints


def _entry(runs: list[dict], config: RunConfig) -> dict:
    """One learner's trials and their mean +- std (nbytes None: not a learner that holds state, the bound)."""
    sizes = [r["nbytes"] for r in runs if r["nbytes"] is not None]
    return {
        "trials": [
            {"trial": r["trial"], "accuracy_matrix": r["matrix"].to_dict(),
             "seen_accuracy": r["matrix"].seen_accuracy().tolist(),
             "metrics": nan_to_none(r["matrix"].summary()), "fit_seconds": r["seconds"],
             "nbytes": r["nbytes"], **r["online"], **({"open_set": r["open_set"]} if r["open_set"] else {})}
            for r in runs
        ],
        "open_set_mean": open_set_mean([r["open_set"] for r in runs]),
        "mean": {k: _mean_std([r["matrix"].summary()[k] for r in runs]) for k in METRICS}
        | ({"prequential_accuracy": _mean_std([r["online"]["prequential_accuracy"] for r in runs])}
           if config.online_batch else {}),
        "seen_accuracy_mean": np.mean([r["matrix"].seen_accuracy() for r in runs], axis=0).tolist(),
        "nbytes": int(max(sizes)) if sizes else None,
        "seconds_per_session": float(np.mean([np.mean(r["seconds"]) for r in runs])),
    }


def open_set_mean(trials: list[list[dict] | None]) -> list[dict] | None:
    """Per session, the mean over trials of each open-set figure (None where undefined, e.g. the last session)."""
    if not trials or trials[0] is None:
        return None
    out = []
    for rows in zip(*trials, strict=True):
        mean = {"session": rows[0]["session"], "classes_seen": rows[0]["classes_seen"]}
        for key in OPEN_SET:
            values = [r.get(key) for r in rows if r.get(key) is not None]
            mean[key] = float(np.mean(values)) if values else None
        out.append(mean)
    return out


def render_open_set(per_learner: dict[str, dict]) -> str:
    """Per learner and session: accuracy, ECE / NLL before and after calibration, known-vs-future AUROC, FAR@95."""
    rows = []
    for name, entry in per_learner.items():
        for r in entry.get("open_set_mean") or []:
            rows.append({"learner": name, "session": r["session"], "classes": r["classes_seen"]}
                        | {label: r[key] for key, label in OPEN_SET.items()})
    return "\n".join([
        "Calibration (ECE over 15 bins, NLL; raw softmax vs the learner family's calibrator fitted on held-out",
        "training clips) and",
        "unknown detection (max calibrated probability; seen classes' test clips vs the classes still to come):",
        format_table(rows, ["learner", "session", "classes", *OPEN_SET.values()]),
    ])


def table_rows(per_learner: dict[str, dict], budget: int | None = None) -> list[dict]:
    rows = []
    for name, entry in per_learner.items():
        row: dict = {"learner": name}
        for key, label in (METRICS | ONLINE).items():
            if key not in entry["mean"]:
                continue
            m, s = entry["mean"][key]
            row[label] = "-" if m is None or np.isnan(m) else f"{100 * m:.1f} +- {100 * s:.1f}"
        over = budget is not None and entry["nbytes"] is not None and entry["nbytes"] > budget
        row["memory bytes"] = "-" if entry["nbytes"] is None else f"{entry['nbytes']}{' (over budget)' if over else ''}"
        row["s/session"] = f"{entry['seconds_per_session']:.3f}"
        rows.append(row)
    return rows


def render_compare(per_learner: dict[str, dict], trials: int, budget: int | None = None) -> str:
    rows = table_rows(per_learner, budget)
    note = f"; memory budget {budget} bytes" if budget is not None else ""
    return "\n".join([
        f"Learners compared over {trials} support-set trial(s){note}; accuracy in %, mean +- std;",
        "memory = learner state + exemplars + the encoder it uses, in bytes:",
        format_table(rows, list(rows[0])),
    ])


def plot_compare(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.cumsum([len(c) for c in results["scenario"]["session_classes"]])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for name, entry in results["learners"].items():
        ax1.plot(sizes, 100 * np.asarray(entry["seen_accuracy_mean"]), marker="o", label=name)
        aa = entry["mean"]["average_incremental_accuracy"][0]
        if entry["nbytes"] is None:  # the joint ridge bound holds no learner state of its own
            continue
        ax2.scatter(entry["nbytes"], 100 * aa)
        ax2.annotate(name, (entry["nbytes"], 100 * aa), textcoords="offset points", xytext=(4, 4))
    ax1.set_xlabel("classes seen")
    ax1.set_ylabel("accuracy on seen classes (%)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    if results.get("memory_budget"):
        ax2.axvline(results["memory_budget"], color="grey", linestyle=":", label="budget")
    ax2.set_xscale("log")
    ax2.set_xlabel("memory: state + exemplars + encoder (bytes)")
    ax2.set_ylabel("average incremental accuracy (%)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "compare.png")
    plt.close(fig)


__all__ = ["compare", "render_compare", "render_open_set"]
