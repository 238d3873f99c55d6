"""Calibration and unknown detection on the embedded default, session by session, for the closed-form heads.

    python benchmarks/unknown.py [--learners ncm lda analytic ranpac] [--out runs/unknown] [--trials 1]
                                 [--validation-fold 4]

Uses the harness: ``prepare(RunConfig(...))`` renders the embedded dataset and trains the ``fast``
encoder on first use (cached after; a later run reuses both), then ``evaluate_open_set`` runs each
learner through the default scenario (60 base classes, then 8 sessions of 5-way 5-shot) with a shadow
learner for held-out calibration. Printed per learner and session: accuracy, the fitted temperature,
ECE and NLL of the learner's own softmax, of one temperature and of the family's calibrator
(``default_calibrator``) on the seen classes' test clips, and known-vs-future AUROC / FAR@95 for every
known-ness score (lda reads its own Gaussians, the others a density kept beside them), plus the false
rejections (known test clips) and false acceptances (future classes' test clips) at the stored threshold
of the family's default score (target 5% false rejection).
``--validation-fold K`` keeps training fold K out of the run (the
encoder and every learner train on the other training folds) and adds its clips of the base classes to
the calibration pool in session 0: clips neither the encoder nor the learner saw, unlike the held-out
share of the base session, which the encoder was trained on (later sessions' clips are new to the
encoder, and their few shots stay the only data of their classes).
Targets: calibrated ECE under 0.05; AUROC at least 0.85 at session 0. Everything is written to ``<out>/unknown.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from earmark.calibration import SCORES, default_calibrator, default_score
from earmark.data import default_data_dir
from earmark.encoders.cache import EmbeddingCache, embed_paths, embedder_fingerprint
from earmark.experiments import RunConfig, prepare
from earmark.experiments.evaluate import evaluate_open_set
from earmark.experiments.prepare import build_learner
from earmark.experiments.report import nan_to_none
from earmark.metrics import format_table

ECE_TARGET = 0.05
AUROC_TARGET = 0.85


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--learners", nargs="+", default=["ncm", "lda", "analytic", "ranpac"])
    ap.add_argument("--out", default="runs/unknown")
    ap.add_argument("--trials", type=int, default=1, help="support-set draws (each a full pass), default 1")
    ap.add_argument("--holdout", type=float, default=0.2, help="share of each session held out for calibration")
    ap.add_argument("--target-frr", type=float, default=0.05)
    ap.add_argument("--validation-fold", type=int, default=None,
                    help="a training fold kept out of the run as base-class calibration clips (default: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = RunConfig(out=args.out, learners=args.learners, progress=not args.no_progress)
    if args.validation_fold is not None:
        folds = [f for f in range(1, config.render.n_folds + 1) if f not in (config.test_fold, args.validation_fold)]
        config.train_folds = folds
    t0 = time.perf_counter()
    prep = prepare(config)
    X, row_of, validation = prep.X, dict(prep.row_of), None
    if args.validation_fold is not None:
        ds, base = prep.dataset, prep.scenario.class_order[prep.scenario.session_classes[0]]
        val = np.flatnonzero((ds.folds == args.validation_fold) & np.isin(ds.targets, base))
        cache = EmbeddingCache(default_data_dir() / "cache" / "embeddings", embedder_fingerprint(prep.embedder))
        res = embed_paths(prep.embedder, [ds.paths[i] for i in val], cache, progress=config.progress,
                          desc="embedding validation clips")
        row_of |= {int(val[k]): len(X) + r for r, k in enumerate(res.kept)}
        X = torch.cat([X, res.embeddings])
        validation = val[res.kept]
    prep_seconds = time.perf_counter() - t0
    results: dict = {"config": {"learners": args.learners, "trials": args.trials, "holdout": args.holdout,
                                "target_frr": args.target_frr, "scenario": repr(prep.scenario),
                                "validation_fold": args.validation_fold,
                                "validation_clips": 0 if validation is None else len(validation)},
                     "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                     "threads": torch.get_num_threads(), "load": os.getloadavg()},
                     "prepare_seconds": prep_seconds, "learners": {}}
    cal_rows, os_rows, summary = [], [], []
    for name in args.learners:
        trials = []
        t = time.perf_counter()
        for trial in range(args.trials):
            learner = build_learner(config, name)
            _, seconds, rows = evaluate_open_set(
                learner, prep.scenario.with_trial(trial), X, row_of, holdout=args.holdout,
                seed=config.seed, score=default_score(learner), target_frr=args.target_frr, extra_scores=SCORES,
                validation_indices=validation, calibrator=default_calibrator(learner))
            trials.append({"fit_seconds": seconds, "sessions": rows,
                           "calibrator": default_calibrator(learner).to_dict(), "default_score": default_score(learner),
                           "ridges": getattr(learner, "ridges_", None)})
        wall = time.perf_counter() - t
        results["learners"][name] = {"trials": trials, "seconds": wall}
        sessions = trials[0]["sessions"] if args.trials == 1 else _mean_rows([tr["sessions"] for tr in trials])
        for r in sessions:
            cal_rows.append({"learner": name, "session": r["session"], "classes": r["classes_seen"],
                             "acc %": _pct(r["accuracy"]), "T only": r["temperature_only"], "T": r["temperature"],
                             "ECE raw": r["ece_raw"], "ECE T only": r["ece_temperature"],
                             "ECE cal": r["ece_calibrated"], "ECE floor": r["ece_floor"],
                             "NLL raw": r["nll_raw"], "NLL T only": r["nll_temperature"],
                             "NLL cal": r["nll_calibrated"]})
            row = {"learner": name, "session": r["session"]}
            primary = trials[0]["default_score"]
            for kind in SCORES:
                suffix = "" if kind == primary else f"_{kind}"
                if f"auroc{suffix}" in r:
                    row[f"AUROC {kind}"] = r[f"auroc{suffix}"]
                    row[f"FAR95 {kind}"] = r[f"far95{suffix}"]
            row["FRR@thr"] = r["false_rejection"]
            row["FAR@thr"] = r["false_acceptance"]
            os_rows.append(row)
        ece = [r["ece_calibrated"] for r in sessions]
        ece_ok = "yes" if max(ece) < ECE_TARGET else f"{sum(e < ECE_TARGET for e in ece)}/{len(ece)} sessions"
        kind = default_score(build_learner(config, name))
        auroc0, auroc0_default = sessions[0]["auroc_msp" if kind != "msp" else "auroc"], sessions[0]["auroc"]
        best0 = max(v for k, v in sessions[0].items() if k.startswith("auroc") and v is not None)
        summary.append({"learner": name, "mean ECE raw": float(np.mean([r["ece_raw"] for r in sessions])),
                        "mean ECE T only": float(np.mean([r["ece_temperature"] for r in sessions])),
                        "mean ECE cal": float(np.mean(ece)), "max ECE cal": float(np.max(ece)),
                        "mean ECE floor": float(np.mean([r["ece_floor"] for r in sessions])),
                        "ECE < 0.05": ece_ok,
                        "AUROC0 msp": auroc0, "AUROC0 default": auroc0_default, "default score": kind,
                        "AUROC0 best": best0,
                        "AUROC0 >= 0.85": "yes" if auroc0_default >= AUROC_TARGET
                        else ("best only" if best0 >= AUROC_TARGET else "no"),
                        "mean FRR@thr": float(np.mean([r["false_rejection"] for r in sessions])),
                        "s (all sessions)": wall / args.trials})
    columns = lambda rows: list(dict.fromkeys(k for r in rows for k in r))  # noqa: E731
    val_note = "" if validation is None else f"; validation fold {args.validation_fold}: {len(validation)} clips"
    print(f"\n{prep.scenario!r}; {args.trials} trial(s); held-out share {args.holdout}{val_note}; "
          f"threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}")
    print("\nCalibration on the seen classes' test clips (ECE: 15 bins on the top-1 confidence; 'T only': one")
    print("temperature on the same held-out scores, the calibration before; 'cal': the learner family's calibrator,")
    print("default_calibrator; ECE floor: what a")
    print("perfectly calibrated model with these confidences would show on this many clips):")
    print(format_table(cal_rows, columns(cal_rows)))
    print("\nKnown (seen classes' test clips) vs unknown (the classes still to come), per known-ness score;")
    print("FRR/FAR@thr: at the stored threshold of the family's default score (default_score), target false "
          f"rejection {args.target_frr:.0%}; the Mahalanobis scores of a head other than lda read a density kept "
          "beside it:")
    print(format_table(os_rows, columns(os_rows)))
    print(f"\nTargets: calibrated ECE < {ECE_TARGET}; AUROC >= {AUROC_TARGET} at session 0"
          " (msp, the family's default score, the best):")
    print(format_table(summary, columns(summary)))
    for name in args.learners:
        ridges = results["learners"][name]["trials"][0]["ridges"]
        if ridges is not None:
            print(f"{name}: ridge lambda per session {ridges}")
    results["summary"] = summary
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unknown.json").write_text(json.dumps(nan_to_none(results), indent=2, allow_nan=False) + "\n")


def _mean_rows(trials: list[list[dict]]) -> list[dict]:
    out = []
    for rows in zip(*trials, strict=True):
        mean = {}
        for k, v in rows[0].items():
            vals = [r.get(k) for r in rows]
            mean[k] = None if any(x is None for x in vals) else (float(np.mean(vals)) if isinstance(v, float) else v)
        out.append(mean)
    return out


if __name__ == "__main__":
    main()
