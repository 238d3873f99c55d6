"""`earmark tune`: choose learner hyperparameters on one scenario, freeze them, evaluate them on another.

The protocol of "Hyperparameters in Continual Learning: A Reality Check" (Cha & Cho): a grid search
that reads the evaluation scenario's test accuracy reports an upper bound, not what a user gets on new
data. So tuning and evaluation are separate runs: ``earmark tune`` scores every grid point on a
*tuning* scenario and writes the winners to ``params.yaml``; ``earmark compare --params params.yaml``
then evaluates those frozen values on the *evaluation* scenario.

Which tuning scenario (the documented default for claims: classes disjoint from the evaluation ones):

- another dataset (``--root``/``--dataset``) whose classes do not occur in the evaluation dataset:
  class-disjoint by construction, and the only class-disjoint option the run options offer today;
- a held-out fold of the same dataset (``--test-fold 4 --train-folds 1,2,3`` while evaluating on fold
  5): disjoint data but shared classes, a weaker check to be labelled as such;
- a different ``--seed`` (class order) or ``--num-classes`` on the same dataset is NOT disjoint: every
  tuning class is also an evaluation class.

``tune.json`` records the tuning scenario (dataset, root, class names), so the disjointness of an
evaluation can be checked afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from earmark.checkpoint import read_yaml_mapping
from earmark.experiments.config import RunConfig
from earmark.experiments.evaluate import evaluate_learner
from earmark.experiments.prepare import encoder_summary, prepare
from earmark.experiments.report import jsonable, log
from earmark.experiments.rundir import RunWriter
from earmark.learners import LEARNERS, make_learner
from earmark.metrics import format_table
from earmark.scenarios import ClassIncremental

# A grid is scikit-learn's ParameterGrid format: {option: [values]} (every combination) or a list of
# such dicts (the union of their combinations; use it to tie options together or skip bad combinations).
Grid = dict[str, Any] | list[dict[str, Any]]

METRICS = (
    "average_incremental_accuracy",
    "last_accuracy",
    "performance_drop",
    "forgetting",
    "backward_transfer",
    "base_accuracy",
    "novel_accuracy",
    "harmonic_mean",
)
LOWER_IS_BETTER = frozenset({"performance_drop", "forgetting"})
_LABELS = {"average_incremental_accuracy": "AA", "last_accuracy": "last", "novel_accuracy": "novel",
           "harmonic_mean": "HM"}

_LOG_GAMMAS = [1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]

# Default search grids, in the order ties are broken (the first listed point wins a tie). Option names
# are the learners' Config fields; a learner without an entry is evaluated at its configured values only.
DEFAULT_GRID: dict[str, Grid] = {
    "ncm": {},  # nothing that changes predictions (temperature only shapes predict_proba)
    "analytic": {"gamma": _LOG_GAMMAS, "buffer_size": [2048, 1024]},
    "lda": {"shrinkage": [1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.5, 0.9]},
    # The per-session search (the config's default) against lambda pinned to 10**k.
    "ranpac": [{}] + [{"ridge_min_log10": [k], "ridge_max_log10": [k]} for k in range(0, 7)],
    # Both streams ridge the same projection, so their strengths share one scale: tied here.
    "dsal": [
        {"gamma": [g], "gamma_comp": [g], "compensation_ratio": [0.6, 0.0, 1.5]} for g in [0.1, 10.0, 100.0, 1e3, 1e4]
    ],
    "teen": {"alpha": [0.5, 0.1, 0.3, 0.7, 0.9, 1.0], "tau": [16.0, 4.0, 64.0]},
    "fetril": {"weight_decay": [1e-4, 1e-5, 1e-3, 1e-2], "l2_normalize": [True, False]},
}


# ----------------------------------------------------------------------------- grids and params files


def expand_grid(grid: Grid) -> list[dict[str, Any]]:
    """Every point of a grid, in order, without duplicates; a scalar value counts as a one-value list."""
    parts = grid if isinstance(grid, list) else [grid]
    points: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part, Mapping):
            raise ValueError(f"a grid is a mapping of option -> values or a list of them, got {part!r}")
        keys = list(part)
        values = [list(v) if isinstance(v, list | tuple) else [v] for v in part.values()]
        empty = [k for k, v in zip(keys, values, strict=True) if not v]
        if empty:
            raise ValueError(f"grid option(s) {', '.join(map(repr, empty))} have no values")
        for combo in itertools.product(*values):
            point = dict(zip(keys, combo, strict=True))
            if point not in points:
                points.append(point)
    return points


def check_learner_params(name: str, params: Mapping[str, Any], source: str) -> None:
    """Raise a ValueError naming ``source`` for an unknown learner, unknown options or invalid values."""
    if name not in LEARNERS:
        raise ValueError(f"{source}: unknown learner {name!r}; known: {', '.join(LEARNERS.names())}")
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: options of learner {name!r} must be a mapping, got {params!r}")
    config_cls = LEARNERS.get(name).Config
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(
            f"{source}: unknown option(s) {', '.join(map(repr, unknown))} for learner {name!r}; "
            f"valid options: {', '.join(sorted(valid)) or 'none'}"
        )
    try:
        config_cls(**params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: invalid options {dict(params)} for learner {name!r}: {exc}") from None


def load_params(path: str | Path) -> dict[str, dict[str, Any]]:
    """A params.yaml (learner -> options, as ``RunConfig.learner_params``), checked against the learners."""
    loaded = read_yaml_mapping(path, "learner params", "learner name -> learner params")
    for name, params in loaded.items():
        check_learner_params(str(name), params if params is not None else {}, str(path))
    return {str(name): dict(params or {}) for name, params in loaded.items()}


def merge_learner_params(base: Mapping[str, Mapping] | None, params: Mapping[str, Mapping]) -> dict[str, dict]:
    """``base`` updated option by option with ``params``; ``base=None`` means RunConfig's default.

    Per option, not per learner, so a params file that sets analytic's gamma keeps a buffer_size
    given by --config, and one that only names dsal keeps the default analytic gamma.
    """
    merged = copy.deepcopy(dict(RunConfig().learner_params if base is None else base))
    for name, opts in params.items():
        merged[name] = {**merged.get(name, {}), **opts}
    return merged


def tuning_provenance(params_path: str | Path) -> dict | None:
    """What a params file was tuned on, from the tune.json beside it (None when there is none): dataset,
    root, class names and class order of the tuning scenario, and the params file."""
    tune_json = Path(params_path).with_name("tune.json")
    if not tune_json.is_file():
        return None
    try:
        scen = json.loads(tune_json.read_text())["scenario"]
        return {"params": str(params_path), "tune_json": str(tune_json), "dataset": scen.get("dataset"),
                "root": scen.get("root"), "class_names": list(scen["class_names"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{tune_json}: not a tune.json of `earmark tune` ({exc})") from None


def load_grid(path: str | Path) -> dict[str, Grid]:
    """A grid YAML file (learner -> grid), every point checked against the learner's config."""
    loaded = read_yaml_mapping(path, "search grid", "learner name -> search grid")
    grid = {str(name): g if g is not None else {} for name, g in loaded.items()}
    for name, g in grid.items():
        try:
            points = expand_grid(g)
        except ValueError as exc:
            raise ValueError(f"{path}: learner {name!r}: {exc}") from None
        for point in points:
            check_learner_params(name, point, str(path))
    return grid


def grid_points(name: str, grid: Grid, base: Mapping[str, Any], source: str = "grid") -> list[dict[str, Any]]:
    """Each grid point as ``{"point": its own values, "params": merged over the configured base}``, checked."""
    points = []
    for point in expand_grid(grid):
        params = {**base, **point}
        check_learner_params(name, params, source)
        points.append({"point": point, "params": params})
    return points


# ----------------------------------------------------------------------------- scoring and selection


def best_index(scores: list[float], metric: str = "average_incremental_accuracy") -> int:
    """The best score's position: highest (lowest for forgetting / performance drop), first on ties, NaN never."""
    a = np.asarray(scores, dtype=float)
    if not len(a) or np.isnan(a).all():
        raise ValueError(f"no grid point has a defined {metric}; scores: {scores}")
    a = np.where(np.isnan(a), np.inf if metric in LOWER_IS_BETTER else -np.inf, a)
    return int(np.argmin(a) if metric in LOWER_IS_BETTER else np.argmax(a))


def score_point(
    name: str, params: dict[str, Any], scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int],
    trials: int, metric: str,
) -> dict[str, Any]:
    """Run one learner configuration over ``trials`` support-set draws; score = mean ``metric`` over trials."""
    per_trial, summaries = [], []
    t0 = time.perf_counter()
    for trial in range(trials):
        learner = make_learner(name, **params)
        matrix, _ = evaluate_learner(learner, scenario.with_trial(trial), X, row_of)
        summary = matrix.summary()
        summaries.append(summary)
        per_trial.append(summary[metric])
    score, std = _mean_std(per_trial)
    return {
        "score": score,
        "std": std,
        "trials": per_trial,
        "metrics": {k: _mean_std([s[k] for s in summaries])[0] for k in METRICS},
        "seconds": time.perf_counter() - t0,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std over the defined (non-NaN) values; NaN when there are none."""
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    return (float(a.mean()), float(a.std())) if len(a) else (float("nan"), float("nan"))


def search(
    name: str, points: list[dict[str, Any]], scenario: ClassIncremental, X: torch.Tensor,
    row_of: dict[int, int], trials: int, metric: str, progress: bool = False,
) -> dict[str, Any]:
    """Score every grid point of one learner and pick the best: ``{"points": [...], "best": index}``."""
    records = []
    for k, p in enumerate(points):
        rec = {**p, **score_point(name, p["params"], scenario, X, row_of, trials, metric)}
        records.append(rec)
        log(f"tune {name} [{k + 1}/{len(points)}] {_fmt_point(p['point'])}: {metric} {rec['score']:.4f}", progress)
    return {"points": records, "best": best_index([r["score"] for r in records], metric)}


# ----------------------------------------------------------------------------- the job


def tune(
    config: RunConfig, grid: Mapping[str, Grid] | None = None, trials: int = 3,
    metric: str = "average_incremental_accuracy",
) -> dict[str, Any]:
    """Grid-search every learner in ``config.learners`` on ``config``'s scenario; write params.yaml and tune.json.

    ``grid`` maps learner names to grids; learners it does not name use ``DEFAULT_GRID`` (or only
    their configured values). Grid values override ``config.learner_params``; the chosen, merged
    options go to ``params.yaml``. Everything is checked before the (slow) preparation starts.
    """
    if trials < 1:
        raise ValueError("trials must be at least 1")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    grid = dict(grid or {})
    extra = sorted(set(grid) - set(config.learners))
    if extra:
        raise ValueError(
            f"the grid names learner(s) {', '.join(extra)} that are not being tuned; "
            f"learners: {', '.join(config.learners)} (add them with --learners)"
        )
    plan = {
        name: grid_points(name, grid.get(name, DEFAULT_GRID.get(name, {})), config.learner_params.get(name, {}))
        for name in config.learners
    }
    t_start = time.perf_counter()
    out = Path(config.out)
    with RunWriter(out) as writer:  # each _write publishes the whole folder (old or new, never a mix)
        results = _tune(config, plan, trials, metric, writer, t_start)
    print(render_tune(results))
    print(f"\nchosen values: {out / 'params.yaml'}, every grid point: {out / 'tune.json'}")
    return results


def _tune(
    config: RunConfig, plan: dict[str, list[dict[str, Any]]], trials: int, metric: str, writer: RunWriter,
    t_start: float,
) -> dict[str, Any]:
    prep = prepare(config, embed_train_pool=trials > 1, writer=writer)
    scenario = prep.scenario
    results: dict[str, Any] = {
        "config": jsonable(asdict(config)),
        "metric": metric,
        "trials": trials,
        "scenario": {**scenario.to_dict(), "root": str(prep.dataset.root)},
        "encoder": encoder_summary(prep),
        "learners": {},
    }
    for k, (name, points) in enumerate(plan.items()):
        results["learners"][name] = search(name, points, scenario, prep.X, prep.row_of, trials, metric,
                                           config.progress)
        results["seconds"] = time.perf_counter() - t_start
        _write(results, writer)  # after every learner, so an interrupted search keeps what it finished
        if k < len(plan) - 1:
            writer.commit(keep_writing=True)  # the last one is committed when the writer closes
    return results


def chosen_params(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Learner -> the best point's merged options (the ``RunConfig.learner_params`` format)."""
    return {name: dict(entry["points"][entry["best"]]["params"]) for name, entry in results["learners"].items()}


def _write(results: dict[str, Any], writer: RunWriter) -> None:
    scen = results["scenario"]
    split = results["config"].get("class_split")
    classes = (f"the '{split}' part of --class-split (seed {results['config']['class_split_seed']}, fraction "
               f"{results['config']['class_split_fraction']})" if split else "classes")
    evaluate = ("earmark compare --class-split eval --params params.yaml (the other part: no class shared)"
                if split == "tune" else "earmark compare --params params.yaml (disjoint classes for claims)")
    header = (
        f"# earmark tune: best {results['metric']} (mean over {results['trials']} support-set trial(s))\n"
        f"# tuning scenario: dataset {scen['dataset']} at {scen['root']}, {len(scen['class_order'])} {classes} "
        f"({scen['initial_increment']} base), seed {scen['seed']}; every grid point and class in tune.json\n"
        f"# evaluate elsewhere with: {evaluate}\n"
    )
    body = yaml.safe_dump(chosen_params(results), sort_keys=False)
    writer.write_text("params.yaml", header + body)
    writer.write_text("tune.json", json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined scores (e.g. novel accuracy with one session) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _fmt_point(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "(defaults)"


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def render_tune(results: Mapping[str, Any]) -> str:
    """One row per grid point: the score (mean +- std over trials, %), a few other metrics, the winner starred."""
    metric = results["metric"]
    label = _LABELS.get(metric, metric)
    rows = []
    for name, entry in results["learners"].items():
        for k, rec in enumerate(entry["points"]):
            score = "-" if rec["score"] != rec["score"] else f"{100 * rec['score']:.1f} +- {100 * rec['std']:.1f}"
            row = {"learner": name, "params": _fmt_point(rec["point"]), label: score}
            row["best"] = "*" if k == entry["best"] else ""
            row.update({lab: _pct(rec["metrics"][key]) for key, lab in _LABELS.items() if key != metric})
            row["s"] = f"{rec['seconds']:.1f}"
            rows.append(row)
    columns = ["learner", "params", label, *(lab for key, lab in _LABELS.items() if key != metric), "s", "best"]
    return "\n".join([
        f"Grid search: {label} in % (mean +- std over {results['trials']} trial(s)); * = chosen",
        format_table(rows, columns),
    ])


__all__ = ["DEFAULT_GRID", "best_index", "expand_grid", "load_grid", "load_params", "merge_learner_params", "tune"]
