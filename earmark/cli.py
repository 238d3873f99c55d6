"""Command line: thin wrappers that build configs and call the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

COMPARE_DEFAULTS = {
    "learners": ["ncm", "lda", "analytic", "ranpac", "fetril", "teen", "dsal", "finetune", "replay"],
    "out": "runs/compare",
}
# The closed-form heads: each grid point costs seconds. Backbone learners can be tuned with --learners.
TUNE_DEFAULTS = {"learners": ["ncm", "lda", "analytic", "ranpac", "fetril", "teen", "dsal"], "out": "runs/tune"}


def _shots(value: str) -> int | None:
    if value.lower() in ("all", "none", "0"):
        return None
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("shots must be positive or 'all'")
    return n


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _bytes(value: str) -> int:
    """'20MB', '512KiB' or a plain number of bytes."""
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    if unit not in _UNITS or not number:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (use e.g. 20MB, 512KiB or bytes)")
    return int(float(number) * _UNITS[unit])


def _class_ids(value: str) -> list[int]:
    """'0-49' or '3,1,7' or a mix ('0-9,20-29'): dataset class ids in learning order."""
    ids: list[int] = []
    try:
        for part in _names(value):
            lo, _, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of class ids: {value!r} (use e.g. 0-49 or 3,1,7)") from None
    return ids


def _names(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Run options default to 'not given' so a YAML config can fill them and flags override it."""
    S = argparse.SUPPRESS
    p.add_argument("--config", default=S, help="YAML file with run options (flags given here override it)")
    p.add_argument("--params", default=S,
                   help="YAML file of learner -> options (e.g. params.yaml from `earmark tune`), merged into "
                        "learner_params over --config")
    p.add_argument("--dataset", default=S, help="dataset loader name for --root (default esc50)")
    p.add_argument("--root", default=S, help="dataset folder (default: the embedded GM dataset)")
    p.add_argument("--initial", type=int, default=S, help="number of base classes (session 0), default 60")
    p.add_argument("--increment", type=int, default=S, help="new classes per later session, default 5")
    p.add_argument("--shots", type=_shots, default=S, help="training clips per new class, or 'all' (default 5)")
    p.add_argument("--num-classes", type=int, default=S, help="use only the first N classes of the order")
    p.add_argument("--class-order", type=_class_ids, default=S,
                   help="dataset class ids in learning order, e.g. 0-49; a subset restricts the run to them "
                        "(tune on some classes, compare on others)")
    p.add_argument("--test-fold", type=int, default=S, help="held-out fold, default 5")
    p.add_argument("--train-folds", type=lambda v: [int(x) for x in _names(v)], default=S,
                   help="comma-separated training folds (default: all but the test fold)")
    p.add_argument("--encoder", default=S, help="encoder config name (fast, tiny, small), default fast")
    p.add_argument("--clip-seconds", type=float, default=S, help="clip length, default 2.0")
    p.add_argument("--epochs", type=int, default=S, help="base-session training epochs")
    p.add_argument("--pretrained", default=S,
                   help="start base training from an `earmark pretrain` checkpoint or a published "
                        "SSAST/SSAMBA/AuM file")
    p.add_argument("--learners", "--learner", dest="learners", type=_names, default=S,
                   help="comma-separated learner names, default ncm,analytic")
    p.add_argument("--scenario", choices=["class-incremental", "blurry"], default=S,
                   help="class-incremental (default) or blurry: classes recur across sessions with uneven counts")
    p.add_argument("--sessions", dest="num_sessions", type=int, default=S,
                   help="blurry: number of sessions (default from --initial/--increment)")
    p.add_argument("--blurry-fraction", type=float, default=S,
                   help="blurry: share of a blurry class's clips moved to other sessions (default 0.1)")
    p.add_argument("--disjoint-fraction", type=float, default=S,
                   help="blurry: share of classes that appear in one session only (default 0.5)")
    p.add_argument("--online-batch", type=int, default=S,
                   help="online protocol: one pass in batches of this size, each predicted before it is learned")
    p.add_argument("--memory-budget", type=_bytes, default=S,
                   help="total bytes per learner (state + exemplars + encoder), e.g. 20MB; replay-style "
                        "learners fill it with exemplars")
    p.add_argument("--no-joint", dest="joint_bound", action="store_false", default=S,
                   help="skip the joint ridge upper bound")
    p.add_argument("--on-error", choices=["fail", "skip"], default=S,
                   help="bad audio: fail with a clear message (default) or skip and report")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--device", default=S, help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", default=S, help="output folder (default runs/demo)")
    p.add_argument("--cache-dir", default=S, help="embedding/encoder cache (default: $EARMARK_DATA/cache)")
    p.add_argument("--retrain", action="store_true", default=S, help="train the encoder even if a cached one matches")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=S,
                   help="start base training over instead of continuing an interrupted one from its checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S,
                   help="plain log lines instead of progress bars")


def _run_config(args: argparse.Namespace, defaults: dict | None = None):
    from earmark.experiments import run_config_from_dict

    given = vars(args).copy()
    for key in ("func", "command", "trials", "grid", "metric"):  # not run options
        given.pop(key, None)
    values: dict = dict(defaults or {})  # command defaults < YAML file < --params file < flags
    params_path = given.pop("params", None)
    if "config" in given:
        from earmark.experiments.config import load_config_file

        values.update(load_config_file(given.pop("config")))
    if params_path is not None:
        from earmark.experiments.tune import load_params, merge_learner_params

        values["learner_params"] = merge_learner_params(values.get("learner_params"), load_params(params_path))
    epochs = given.pop("epochs", None)
    blurry = {k: given.pop(k) for k in ("num_sessions", "blurry_fraction", "disjoint_fraction") if k in given}
    if blurry:
        values["scenario_params"] = {**(values.get("scenario_params") or {}), **blurry}
    values.update(given)
    if epochs is not None:
        values["train"] = {**(values.get("train") or {}), "epochs": epochs}
    return run_config_from_dict(values)


def cmd_run(args: argparse.Namespace) -> int:
    from earmark.experiments import run

    config = _run_config(args)
    run(config)
    print(f"\nresults: {config.out}/results.json, plot: {config.out}/accuracy.png, config: {config.out}/config.yaml")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from earmark.experiments.compare import compare

    config = _run_config(args, COMPARE_DEFAULTS)
    compare(config, trials=args.trials)
    print(f"\nresults: {config.out}/results.json, {config.out}/compare.csv, plots: {config.out}/compare.png")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from earmark.experiments.tune import load_grid, tune

    config = _run_config(args, TUNE_DEFAULTS)
    grid = load_grid(args.grid) if args.grid else None
    tune(config, grid, trials=args.trials, metric=args.metric)
    return 0


def _seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


def cmd_predict(args: argparse.Namespace) -> int:
    from earmark.predict import load_model, predict_windows

    model = load_model(args.model, args.learner, args.device)
    for path in args.files:
        for start, name, p in predict_windows(model, path, args.window, args.hop):
            print(f"{path}\t{start:9.2f}s\t{name}\t{p:.3f}", flush=True)
    return 0


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Masked-patch pretraining on a folder of audio or a dataset's clips (all of them: no labels used)."""
    import torch

    from earmark.audio import AudioConfig
    from earmark.encoders.config import resolve_config as encoder_config
    from earmark.encoders.embedder import AudioEmbedder
    from earmark.training.base import load_features
    from earmark.training.pretrain import PretrainConfig, pretrain

    if args.audio:
        root = Path(args.audio)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: audio folder not found")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    else:
        from earmark.data import load_dataset

        ds = load_dataset(args.dataset, args.root)
        paths = list(ds.paths)
    if not paths:
        raise ValueError("no audio files to pretrain on")
    embedder = AudioEmbedder(encoder_config(args.encoder), AudioConfig(clip_seconds=args.clip_seconds))
    raw, _, skipped = load_features(embedder, paths, True, args.on_error)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    feats = embedder.normalizer.fit(raw)(raw)
    torch.manual_seed(args.seed)
    config = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=min(args.steps // 10, 1000), seed=args.seed)
    hist = pretrain(embedder.encoder, feats, config, checkpoint_path=args.out, device=args.device)
    print(f"pretrained on {len(feats)} clips: loss {hist.loss[0]:.3f} -> {hist.loss[-1]:.3f}; checkpoint {args.out}"
          if hist.loss else f"already complete: {args.out}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from earmark.data import RenderConfig, render_default_dataset

    root = render_default_dataset(args.out, RenderConfig(n_classes=args.classes, seed=args.seed))
    print(root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from earmark import __version__

    parser = argparse.ArgumentParser(prog="earmark", description="Class-incremental sound classification.")
    parser.add_argument("--version", action="version", version=f"earmark {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the embedded default dataset (or --root)")
    _add_run_options(demo)
    demo.set_defaults(func=cmd_run)
    run = sub.add_parser("run", help="the same job on a dataset: --dataset NAME --root PATH, or --config FILE")
    _add_run_options(run)
    run.set_defaults(func=cmd_run)
    comp = sub.add_parser("compare", help="several learners on one scenario, mean +- std over support-set trials")
    _add_run_options(comp)
    comp.add_argument("--trials", type=int, default=3, help="support-set draws (few-shot protocol), default 3")
    comp.set_defaults(func=cmd_compare)
    tun = sub.add_parser("tune", help="grid-search learner options on a tuning scenario; writes params.yaml for "
                                      "`compare --params` (tune on classes disjoint from the evaluation's)")
    _add_run_options(tun)
    tun.add_argument("--grid", help="YAML file of learner -> {option: [values]} (default: earmark.experiments.tune.DEFAULT_GRID)")
    tun.add_argument("--trials", type=int, default=3, help="support-set draws per grid point, default 3")
    tun.add_argument("--metric", default="average_incremental_accuracy",
                     help="score to maximize (forgetting / performance_drop: minimize), default "
                          "average_incremental_accuracy")
    tun.set_defaults(func=cmd_tune)
    pre = sub.add_parser("pretrain", help="self-supervised masked-patch pretraining (SSAST style), resumable")
    src = pre.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", help="a folder of audio files (searched recursively)")
    src.add_argument("--dataset", help="a dataset loader name (with --root)")
    pre.add_argument("--root", help="dataset folder for --dataset")
    pre.add_argument("--encoder", default="fast")
    pre.add_argument("--clip-seconds", type=float, default=2.0)
    pre.add_argument("--steps", type=int, default=1000)
    pre.add_argument("--batch-size", type=int, default=16)
    pre.add_argument("--lr", type=float, default=1e-4)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    pre.add_argument("--out", default="runs/pretrain/encoder.safetensors", help="checkpoint (resumed if present)")
    pre.set_defaults(func=cmd_pretrain)
    pred = sub.add_parser("predict", help="label audio files window by window with a trained run")
    pred.add_argument("files", nargs="+")
    pred.add_argument("--model", default="runs/demo", help="a run folder written by demo/run")
    pred.add_argument("--learner", default="analytic")
    pred.add_argument("--window", type=_seconds, default=2.0, help="window length, e.g. 2s")
    pred.add_argument("--hop", type=_seconds, default=1.0, help="hop between windows, e.g. 1s")
    pred.add_argument("--device", default="cpu")
    pred.set_defaults(func=cmd_predict)
    render = sub.add_parser("render", help="render the embedded General MIDI dataset to a folder")
    render.add_argument("out")
    render.add_argument("--classes", type=int, default=100)
    render.add_argument("--seed", type=int, default=0)
    render.set_defaults(func=cmd_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from earmark.audio import AudioDecodeError
    from earmark.checkpoint import CheckpointError
    from earmark.data.base import DatasetLayoutError
    from earmark.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # reuse freed tensor memory warm instead of page-faulting it in again
    try:
        return args.func(args)
    except (AudioDecodeError, DatasetLayoutError, CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"earmark: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
