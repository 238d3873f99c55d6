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

from earmark.checkpoint import atomic_write_text
from earmark.learners import make_learner
from earmark.metrics import format_table
from earmark.pipeline import RunConfig, _jsonable, _log, _nan_to_none, encoder_summary, evaluate_learner, prepare

METRICS = {
    "average_incremental_accuracy": "AA",
    "last_accuracy": "last",
    "forgetting": "forgetting",
    "performance_drop": "PD",
    "base_accuracy": "base",
    "novel_accuracy": "novel",
    "harmonic_mean": "HM",
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    return (float(a.mean()), float(a.std())) if len(a) else (float("nan"), float("nan"))


def compare(config: RunConfig, trials: int = 3) -> dict:
    """Run every learner in ``config.learners`` over ``trials`` support-set draws; write a report."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    t_start = time.perf_counter()
    out = Path(config.out)
    prep = prepare(config, embed_train_pool=trials > 1)
    scenario, X, row_of = prep.scenario, prep.X, prep.row_of
    per_learner: dict[str, dict] = {}
    for name in config.learners:
        runs = []
        for trial in range(trials):
            learner = make_learner(name, **config.learner_params.get(name, {}))
            matrix, seconds = evaluate_learner(learner, scenario.with_trial(trial), X, row_of)
            runs.append({"trial": trial, "matrix": matrix, "seconds": seconds, "nbytes": learner.nbytes()})
        per_learner[name] = {
            "trials": [
                {"trial": r["trial"], "accuracy_matrix": r["matrix"].to_dict(),
                 "seen_accuracy": r["matrix"].seen_accuracy().tolist(),
                 "metrics": _nan_to_none(r["matrix"].summary()), "fit_seconds": r["seconds"],
                 "nbytes": r["nbytes"]}
                for r in runs
            ],
            "mean": {k: _mean_std([r["matrix"].summary()[k] for r in runs]) for k in METRICS},
            "seen_accuracy_mean": np.mean([r["matrix"].seen_accuracy() for r in runs], axis=0).tolist(),
            "nbytes": int(max(r["nbytes"] for r in runs)),
            "seconds_per_session": float(np.mean([np.mean(r["seconds"]) for r in runs])),
        }
        _log(f"{name}: AA {100 * per_learner[name]['mean']['average_incremental_accuracy'][0]:.1f}", config.progress)
    results = {
        "config": _jsonable(asdict(config)),
        "trials": trials,
        "scenario": scenario.to_dict(),
        "encoder": encoder_summary(prep),
        "learners": _nan_to_none(per_learner),
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(out / "compare.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    rows = table_rows(per_learner)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "compare.csv", buf.getvalue())
    plot_compare(results, out)
    print(render_compare(per_learner, trials))
    return results


def table_rows(per_learner: dict[str, dict]) -> list[dict]:
    rows = []
    for name, entry in per_learner.items():
        row: dict = {"learner": name}
        for key, label in METRICS.items():
            m, s = entry["mean"][key]
            row[label] = "-" if m is None or np.isnan(m) else f"{100 * m:.1f} +- {100 * s:.1f}"
        row["memory bytes"] = entry["nbytes"]
        row["s/session"] = f"{entry['seconds_per_session']:.3f}"
        rows.append(row)
    return rows


def render_compare(per_learner: dict[str, dict], trials: int) -> str:
    rows = table_rows(per_learner)
    return "\n".join([
        f"Learners compared over {trials} support-set trial(s); accuracy in %, mean +- std:",
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
        ax2.scatter(entry["nbytes"], 100 * aa)
        ax2.annotate(name, (entry["nbytes"], 100 * aa), textcoords="offset points", xytext=(4, 4))
    ax1.set_xlabel("classes seen")
    ax1.set_ylabel("accuracy on seen classes (%)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("learner memory (bytes)")
    ax2.set_ylabel("average incremental accuracy (%)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)


__all__ = ["compare", "render_compare"]
