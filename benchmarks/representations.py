"""Representations that carry to unseen classes (issue 17): each lever against the current recipe.

For every lever and seed, on one scenario and with the same number of base-training epochs:

- the incremental run: the encoder trained on the base classes, every head in ``--learners`` (and the
  joint ridge) over ``--trials`` support-set draws;
- the joint reference: the same recipe with the encoder trained on every class of the scenario, each
  head fitted once on all training clips (``earmark compare --reference joint``);
- per head: incremental last and novel accuracy, the reference's last accuracy and the ratio
  incremental last / joint last; and the CPU seconds of the two base trainings (the lever's cost).

Each seed is first averaged over its trials; the table is mean +- std over the seeds. A lever is a set
of TrainConfig and EncoderConfig changes to the current recipe (``LEVERS``; ``--list`` prints them).

No leak: by default the levers are compared on the *tuning* part of the classes (``--class-split
tune``), a seeded half of the dataset's classes that the final figures never use; confirm the chosen
recipe once on the other half with ``--class-split eval`` (``--class-split none``: every class, the
demo's scenario). The scenario defaults follow: 30 base classes + 5-way 5-shot sessions on a half of
the embedded default's 100 classes, 60 + 5-way on all of them.

Usage (3 seeds, every lever, about (levers x seeds x 2) base trainings; write the table to a file):

    python benchmarks/representations.py --seeds 0,1,2 --out runs/representations
    python benchmarks/representations.py --seeds 0,1,2 --levers baseline,time-shift,pool-mean+max
    python benchmarks/representations.py --seeds 0,1,2 --levers baseline,WINNER --class-split eval
    python benchmarks/representations.py --list
    python benchmarks/representations.py --smoke --seeds 0 --levers baseline,gain   # tiny, for the tests

Encoders and embeddings are cached (``<data dir>/cache``), so a rerun with more levers or seeds only
trains what is new; the seconds of a reused training are read back from the earlier run's record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from earmark.data import RenderConfig
from earmark.experiments import RunConfig
from earmark.experiments.evaluate import evaluate_joint, evaluate_learner
from earmark.experiments.prepare import build_learner, module_bytes, prepare
from earmark.experiments.reference import joint_reference, ratio_rows
from earmark.experiments.report import jsonable, nan_to_none
from earmark.metrics import format_table
from earmark.plots import JOINT
from earmark.training.supervised import TrainConfig

# name -> {"train": TrainConfig changes, "encoder": EncoderConfig changes}; "baseline" is the current recipe.
# Values are first guesses for the `fast` encoder on 2 s clips (~200 frames); tune them with --levers
# on the tuning classes before reading anything into a close call.
LEVERS: dict[str, dict[str, dict]] = {
    "baseline": {},
    "crop": {"train": {"crop_frames": 160}},
    "time-shift": {"train": {"time_shift": 30}},
    "gain": {"train": {"gain_db": 6.0}},
    "noise": {"train": {"noise_prob": 0.3}},
    "mix-clips": {"train": {"mix_prob": 0.3}},
    "mixup": {"train": {"mixup_prob": 0.5}},
    "cutmix": {"train": {"cutmix_prob": 0.5}},
    "label-smoothing": {"train": {"label_smoothing": 0.1}},
    "early-stopping": {"train": {"val_fraction": 0.1, "patience": 4}},
    "virtual-classes": {"train": {"virtual_classes": 30, "virtual_prob": 0.25}},
    "pool-max": {"encoder": {"pool": "max"}},
    "pool-mean+max": {"encoder": {"pool": "mean+max"}},
    "pool-attention": {"encoder": {"pool": "attention"}},
    "layers-concat-3": {"encoder": {"pool_layers": 3}},
    "layers-mean-3": {"encoder": {"pool_layers": 3, "layer_merge": "mean"}},
    "pool-mean+max-layers-3-rms": {"encoder": {"pool": "mean+max", "pool_layers": 3, "pool_norm": "rms"}},
}

SMOKE = {
    "render": RenderConfig(n_classes=8, clips_per_class=10, clip_seconds=1.0), "clip_seconds": 1.0,
    "encoder": {"embed_dim": 16, "depth": 3, "d_state": 4, "expand": 1, "pool": "mean"},
    "learner_params": {"analytic": {"buffer_size": 128}},
}


def lever_config(base: RunConfig, lever: dict[str, dict], seed: int, out: Path) -> RunConfig:
    """``base`` with the lever's TrainConfig / EncoderConfig changes, for one seed, written under ``out``."""
    train = replace(base.train, **lever.get("train", {}))
    encoder = base.encoder
    if lever.get("encoder"):
        encoder = {"preset": encoder} if isinstance(encoder, str) else dict(encoder)
        encoder |= lever["encoder"]
    return replace(base, train=train, encoder=encoder, seed=seed, out=str(out))


def measure(config: RunConfig, trials: int) -> dict:
    """One lever and seed: per head, the incremental figures (mean over trials) and the joint reference's."""
    t0 = time.perf_counter()
    prep = prepare(config, embed_train_pool=trials > 1)
    heads: dict[str, dict] = {}
    encoder_bytes = module_bytes(prep.embedder.encoder)
    for name in config.learners:
        summaries = []
        for trial in range(trials):
            learner = build_learner(config, name, encoder_bytes)
            matrix, _ = evaluate_learner(learner, prep.scenario.with_trial(trial), prep.inputs_for(learner),
                                         prep.row_of)
            summaries.append(matrix.summary())
        heads[name] = summaries
    params = config.learner_params.get("analytic", {})
    heads[JOINT] = [evaluate_joint(prep.scenario.with_trial(t), prep.X, prep.row_of, params)[0].summary()
                    for t in range(trials)]
    incremental = {name: {k: (float(np.nanmean([s[k] for s in runs])), None)
                          for k in ("last_accuracy", "novel_accuracy", "average_incremental_accuracy")}
                   for name, runs in heads.items()}
    reference = joint_reference(config, prep)
    rows = {r["learner"]: r for r in ratio_rows(incremental, reference)}
    return {
        "heads": {name: {"last": inc["last_accuracy"][0], "novel": inc["novel_accuracy"][0],
                         "aa": inc["average_incremental_accuracy"][0], "joint_last": rows[name]["joint_last"],
                         "joint_novel": rows[name]["joint_novel"], "ratio": rows[name]["ratio"]}
                  for name, inc in incremental.items()},
        "train_seconds": _seconds(prep.training), "reference_train_seconds": _seconds(reference["encoder"]["training"]),
        "reused": [bool(prep.training.get("reused")), bool(reference["encoder"]["training"].get("reused"))],
        "best_epoch": prep.training.get("best_epoch"), "wall_seconds": time.perf_counter() - t0,
        "classes": len(prep.scenario.class_order), "sessions": len(prep.scenario),
    }


def _seconds(training: dict) -> float | None:
    return None if training.get("reused") else float(training["seconds"])


def _mean_std(values: list) -> tuple[float, float] | None:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    a = a[~np.isnan(a)]
    return (float(a.mean()), float(a.std())) if len(a) else None


def summarize(records: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per lever and head: mean +- std over seeds of each figure, the change in last vs baseline."""
    rows = []
    base_last = {}
    for lever, per_seed in records.items():
        heads = next(iter(per_seed.values()))["heads"]
        for head in heads:
            row: dict = {"lever": lever, "head": head}
            for key in ("last", "novel", "aa", "joint_last", "joint_novel", "ratio"):
                row[key] = _mean_std([r["heads"][head][key] for r in per_seed.values()])
            row["train_s"] = _mean_std([r["train_seconds"] for r in per_seed.values()])
            row["reference_train_s"] = _mean_std([r["reference_train_seconds"] for r in per_seed.values()])
            row["seeds"] = sorted(per_seed)
            if lever == "baseline" and row["last"]:
                base_last[head] = row["last"][0]
            rows.append(row)
    for row in rows:
        row["delta_last"] = (row["last"][0] - base_last[row["head"]]) if row["last"] and row["head"] in base_last \
            else None
    return rows


def render(rows: list[dict], header: str) -> str:
    def ms(v, scale=100.0, digits=1):
        return "-" if v is None else f"{scale * v[0]:.{digits}f} +- {scale * v[1]:.{digits}f}"

    table = [{"lever": r["lever"], "head": r["head"], "last": ms(r["last"]), "novel": ms(r["novel"]),
              "joint last": ms(r["joint_last"]), "ratio": ms(r["ratio"], 1.0, 3),
              "d last": "-" if r["delta_last"] is None else f"{100 * r['delta_last']:+.1f}",
              "train s": ms(r["train_s"], 1.0, 0), "ref train s": ms(r["reference_train_s"], 1.0, 0)}
             for r in rows]
    cols = ["lever", "head", "last", "novel", "joint last", "ratio", "d last", "train s", "ref train s"]
    return "\n".join([header, format_table(table, cols)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds, default 0,1,2")
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated lever names (default: all; --list)")
    ap.add_argument("--list", action="store_true", help="print the levers and exit")
    ap.add_argument("--class-split", choices=["tune", "eval", "none"], default="tune",
                    help="which part of the classes to measure on, default tune (see the module docstring)")
    ap.add_argument("--learners", default="ncm,lda,analytic", help="heads, default ncm,lda,analytic")
    ap.add_argument("--trials", type=int, default=3, help="support-set draws per seed, default 3")
    ap.add_argument("--initial", type=int, default=None, help="base classes, default 30 on a split, 60 without")
    ap.add_argument("--increment", type=int, default=5, help="classes per later session, default 5")
    ap.add_argument("--shots", type=int, default=5, help="clips per new class (0: all), default 5")
    ap.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="base-training epochs, default 20")
    ap.add_argument("--encoder", default="fast", help="encoder preset, default fast")
    ap.add_argument("--root", default=None, help="a dataset folder (default: the embedded GM dataset)")
    ap.add_argument("--dataset", default="esc50", help="loader for --root, default esc50")
    ap.add_argument("--cache-dir", default=None, help="encoder / embedding cache (default: <data dir>/cache)")
    ap.add_argument("--out", default="runs/representations", help="output folder, default runs/representations")
    ap.add_argument("--retrain", action="store_true", help="train every encoder again (fresh seconds)")
    ap.add_argument("--smoke", action="store_true", help="a tiny rendered dataset and encoder (tests)")
    return ap.parse_args(argv)


def base_config(args: argparse.Namespace) -> RunConfig:
    split = None if args.class_split == "none" else args.class_split
    initial = args.initial if args.initial is not None else (30 if split else 60)
    config = RunConfig(
        root=args.root, dataset=args.dataset, cache_dir=args.cache_dir, initial=initial, increment=args.increment,
        shots=args.shots or None, encoder=args.encoder, learners=[n for n in args.learners.split(",") if n],
        class_split=split, retrain=args.retrain, progress=False,
        train=replace(TrainConfig(), epochs=args.epochs),
    )
    if args.smoke:
        config = replace(config, initial=args.initial or 2, increment=args.increment if args.initial else 2,
                         shots=min(args.shots or 3, 3), train=replace(config.train, epochs=1, batch_size=8),
                         learner_params={**config.learner_params, **SMOKE["learner_params"]},
                         **{k: v for k, v in SMOKE.items() if k != "learner_params"})
    return config


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.list:
        for name, lever in LEVERS.items():
            print(f"{name:28s} {json.dumps(lever) if lever else '(the current recipe)'}")
        return {}
    levers = [n for n in args.levers.split(",") if n]
    unknown = [n for n in levers if n not in LEVERS]
    if unknown:
        sys.exit(f"unknown lever(s) {', '.join(unknown)}; known: {', '.join(LEVERS)}")
    if "baseline" not in levers:
        levers.insert(0, "baseline")  # every lever is read against the current recipe
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = base_config(args)
    out = Path(args.out)
    records: dict[str, dict[int, dict]] = {}
    for lever in levers:
        records[lever] = {}
        for seed in seeds:
            folder = out / lever / f"seed{seed}"
            config = lever_config(base, LEVERS[lever], seed, folder)
            record = measure(config, args.trials)
            earlier = folder / "record.json"
            if earlier.is_file():  # a reused encoder: keep the seconds its training took when it ran
                before = json.loads(earlier.read_text())
                for key in ("train_seconds", "reference_train_seconds"):
                    if record[key] is None:
                        record[key] = before.get(key)
            folder.mkdir(parents=True, exist_ok=True)
            earlier.write_text(json.dumps(nan_to_none(record), indent=2, allow_nan=False) + "\n")
            records[lever][seed] = record
            best = max(record["heads"].items(), key=lambda kv: kv[1]["last"])
            print(f"{lever} seed {seed}: best head {best[0]} last {100 * best[1]['last']:.1f}, ratio "
                  f"{best[1]['ratio']:.3f}, {record['wall_seconds']:.0f} s", flush=True)
    rows = summarize(records)
    first = next(iter(records["baseline"].values()))
    header = (
        f"Levers against the current recipe ({args.class_split} classes: {first['classes']} in {first['sessions']} "
        f"sessions, {base.initial} base, shots {base.shots or 'all'}; {base.train.epochs} epochs; seeds "
        f"{','.join(map(str, seeds))}, {args.trials} trial(s) each); accuracy in %, mean +- std over seeds;\n"
        "ratio = incremental last / joint-reference last; d last = change in last vs baseline; train s = "
        "base training of the incremental / reference encoder (CPU seconds, '-' if cached from before)"
    )
    text = render(rows, header)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text + "\n")
    results = {"args": vars(args), "base_config": jsonable(asdict(base)), "levers": {n: LEVERS[n] for n in levers},
               "records": {lever: {str(s): r for s, r in per.items()} for lever, per in records.items()},
               "rows": rows}
    (out / "results.json").write_text(json.dumps(nan_to_none(jsonable(results)), indent=2, allow_nan=False) + "\n")
    return results


if __name__ == "__main__":
    main()
