"""`earmark run` / `earmark demo`: every learner through the scenario, then results, plot and checkpoints."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from earmark.experiments.config import RunConfig
from earmark.experiments.evaluate import evaluate, evaluate_joint
from earmark.experiments.prepare import (
    Prepared,
    build_learner,
    encoder_summary,
    learner_checkpoints,
    module_bytes,
    prepare,
    remove_learner_checkpoints,
    tuning_check,
)
from earmark.experiments.reference import check_reference, joint_reference, ratio_rows
from earmark.experiments.report import jsonable, log, nan_to_none, render_report
from earmark.experiments.rundir import RunWriter
from earmark.learners import LEARNERS, IncrementalLearner
from earmark.metrics import AccuracyMatrix
from earmark.plots import JOINT, plot_sessions


def run(config: RunConfig) -> dict:
    """Run the whole job and write results.json, a plot and the encoder checkpoint under config.out."""
    t_start = time.perf_counter()
    with RunWriter(config.out) as writer:  # the folder is replaced as a whole when the block ends
        results, checkpoints = _run(config, writer, t_start)
    remove_learner_checkpoints(checkpoints)  # only now: a crash before the folder is in place resumes from them
    print(render_report(results))
    if "model" in results:
        print(f"\nmodel: {results['model']} ({config_model_learner(config)} on the trained encoder, every training "
              "clip of the scenario learned)")
    return results


def _run(config: RunConfig, writer: RunWriter, t_start: float) -> tuple[dict, Path]:
    check_reference(config)  # before any work
    prep = prepare(config, writer=writer)
    checkpoints = learner_checkpoints(config, prep)
    timings = prep.timings
    dataset, scenario, embedder, X, row_of = prep.dataset, prep.scenario, prep.embedder, prep.X, prep.row_of

    matrices: dict[str, AccuracyMatrix] = {}
    online: dict[str, dict] = {}
    fit_seconds: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}
    learners: dict[str, IncrementalLearner] = {}
    for name in config.learners:
        learner = build_learner(config, name, module_bytes(embedder.encoder))
        t = time.perf_counter()
        matrices[name], fit_seconds[name], online[name] = evaluate(
            config, learner, scenario, prep.inputs_for(learner), row_of, checkpoints / name)
        timings[f"learner:{name}"] = time.perf_counter() - t
        nbytes[name] = prep.total_bytes(learner)
        learners[name] = learner
    if config.joint_bound and config.online_batch is None:
        params = config.learner_params.get("analytic", {})
        t = time.perf_counter()
        matrices[JOINT], fit_seconds[JOINT] = evaluate_joint(scenario, X, row_of, params)
        timings[f"learner:{JOINT}"] = time.perf_counter() - t
    reference = None
    if config.reference:
        t = time.perf_counter()
        reference = joint_reference(config, prep, writer)
        timings["reference"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    results = {
        "config": jsonable(asdict(config)),
        "environment": environment(config),
        "dataset": {"name": dataset.name, "root": str(dataset.root), "clips": len(dataset),
                    "classes": dataset.num_classes},
        "scenario": scenario.to_dict(),
        "encoder": encoder_summary(prep),
        "embeddings": {"clips": len(row_of) + len(prep.skipped), "computed": prep.computed,
                       "dim": embedder.embed_dim, "skipped": [{"path": p, "reason": r} for p, r in prep.skipped]},
        "learners": {
            name: {"accuracy_matrix": m.to_dict(), "matrix": nan_to_none(m.matrix),
                   "seen_accuracy": m.seen_accuracy().tolist(), "metrics": nan_to_none(m.summary()),
                   "fit_seconds": fit_seconds[name], "nbytes": nbytes.get(name), **online.get(name, {})}
            for name, m in matrices.items()
        },
        "timings": timings,
    }
    tuning = tuning_check(config, scenario)
    if tuning is not None:
        results["tuning"] = tuning
    if reference is not None:
        incremental = {name: {key: (entry["metrics"][key], None) for key in ("last_accuracy", "novel_accuracy")}
                       for name, entry in results["learners"].items()}
        results["reference"] = {**reference, "ratios": ratio_rows(incremental, reference)}
    if write_model(config, prep, writer.path("model")) is not None:
        results["model"] = str(writer.final("model"))
    writer.write_text("config.yaml", yaml.safe_dump(results["config"], sort_keys=False))
    writer.write_text("results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    plot_sessions(results, writer.path("accuracy.png"))
    return results, checkpoints


def config_model_learner(config: RunConfig) -> str | None:
    """The learner the run's model directory uses (see ``RunConfig.model_learner``)."""
    if config.model_learner is not None:
        return config.model_learner or None
    on_embeddings = [n for n in config.learners if not LEARNERS.get(n).needs_encoder()]
    return "analytic" if "analytic" in on_embeddings else (on_embeddings[0] if on_embeddings else None)


def write_model(config: RunConfig, prep: Prepared, path: Path) -> Path | None:
    """The product of a run: a Model on the trained encoder that has learned every training clip of the scenario.

    It is learned afresh from the audio (not copied from the evaluated learner), so its journal holds the
    decoded clips' hashes and the embeddings' digests, and ``earmark forget --files`` works on it.
    """
    name = config_model_learner(config)
    if name is None:
        return None
    from earmark.model import Model

    train = [int(i) for s in prep.scenario for i in s.train_indices if int(i) in prep.row_of]
    model = Model.from_embedder(prep.embedder, name, config.learner_params.get(name, {}), config.device)
    ds = prep.dataset
    # Bad files were already failed or skipped by prepare(); "skip" here only drops duplicate clips (the
    # same decoded audio twice in a dataset), which a model learns once.
    report = model.learn([ds.paths[i] for i in train], [ds.class_names[int(ds.targets[i])] for i in train],
                         on_error="skip")
    if report["skipped"]:
        log(f"model: {len(report['skipped'])} clip(s) not learned, e.g. {report['skipped'][0]}", config.progress)
    return model.save(path)


def environment(config: RunConfig) -> dict:
    """What the figures depend on beyond the config: versions, training threads, the CPU's vector unit."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "threads": torch.get_num_threads(), "train_threads": config.train.threads or torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
           "processor": platform.processor() or None}
    try:
        import numba

        env["numba"] = numba.__version__
    except ImportError:
        env["numba"] = None
    return env


