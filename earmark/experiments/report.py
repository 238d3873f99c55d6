"""Reports of a run: the per-session table, the summary metrics and JSON-safe values."""

from __future__ import annotations

import json

import numpy as np
from tqdm.auto import tqdm

from earmark.metrics import format_table


def log(msg: str, progress: bool) -> None:
    """A line that does not break a progress bar (plain print without bars)."""
    if progress:
        tqdm.write(msg)
    else:
        print(msg, flush=True)


def nan_to_none(value: object) -> object:
    """JSON has no NaN: undefined metrics (e.g. forgetting after one session) become null."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    return value


def jsonable(obj: object) -> object:
    return json.loads(json.dumps(obj, default=str))


def render_report(results: dict) -> str:
    """The per-session table and the summary metrics, as printed by `earmark demo`."""
    names = list(results["learners"])
    scen = results["scenario"]
    sizes = np.cumsum([len(c) for c in scen["session_classes"]])
    rows = []
    for i, n_seen in enumerate(sizes):
        row = {"session": i, "classes": int(n_seen)}
        for name in names:
            row[name] = f"{100 * results['learners'][name]['seen_accuracy'][i]:.1f}"
        rows.append(row)
    lines = ["Accuracy (%) on all classes seen so far, after each session:",
             format_table(rows, ["session", "classes", *names]), ""]
    labels = {
        "average_incremental_accuracy": "AA", "last_accuracy": "last", "performance_drop": "PD",
        "forgetting": "forgetting", "backward_transfer": "BWT", "base_accuracy": "base",
        "novel_accuracy": "novel", "harmonic_mean": "HM",
    }
    summary = []
    for name in names:
        entry = results["learners"][name]
        row = {"learner": name}
        for key, label in labels.items():
            v = entry["metrics"].get(key)
            row[label] = "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"
        row["memory"] = human_bytes(entry["nbytes"]) if entry.get("nbytes") is not None else "-"
        if "prequential_accuracy" in entry:
            row["prequential"] = f"{100 * entry['prequential_accuracy']:.1f}"
        row["fit s"] = f"{sum(entry['fit_seconds']):.2f}"
        summary.append(row)
    lines += [
        "Summary (%): AA = average incremental accuracy (session 0 included), last = final accuracy,",
        "PD = performance drop (first - last), forgetting = mean over earlier class groups of",
        "best earlier accuracy - final accuracy, BWT = backward transfer, HM = harmonic mean of base/novel.",
        format_table(summary, ["learner", *labels.values(), "memory", "fit s"]
                     + (["prequential"] if any("prequential" in r for r in summary) else [])),
        "",
    ]
    if "reference" in results:
        from earmark.experiments.reference import render_reference

        lines += [render_reference(results["reference"]["ratios"], results["reference"]), ""]
    lines.append("Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
