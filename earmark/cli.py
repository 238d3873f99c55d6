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


def _key_value(value: str) -> tuple[str, object]:
    """'KEY=VALUE' with VALUE read as YAML (numbers, true/false, lists): one option of a config."""
    import yaml

    key, sep, text = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{value!r}: the value is not valid YAML") from None


# Run options' defaults as the help states them; tests/test_cli_help.py checks each against RunConfig,
# TrainConfig and the command defaults (kept as text so that building the parser imports no torch).
RUN_HELP_DEFAULTS = {"learners": "ncm,analytic", "out": "runs/demo"}


def _add_run_options(p: argparse.ArgumentParser, command_defaults: dict | None = None) -> None:
    """Run options default to 'not given' so a YAML config can fill them and flags override it.

    ``command_defaults`` (COMPARE_DEFAULTS, TUNE_DEFAULTS) are what the command uses when neither the
    YAML file nor a flag sets an option; the help states them.
    """
    S = argparse.SUPPRESS
    shown = {**RUN_HELP_DEFAULTS, **{k: ",".join(v) if isinstance(v, list) else str(v)
                                     for k, v in (command_defaults or {}).items()}}
    p.add_argument("--config", default=S, help="YAML file with run options (flags given here override it)")
    p.add_argument("--params", default=S,
                   help="YAML file of learner -> options (e.g. params.yaml from `earmark tune`), merged into "
                        "learner_params over --config; a tune.json beside it is checked for classes shared "
                        "with this run")
    p.add_argument("--dataset", default=S, help="dataset loader name for --root, default esc50")
    p.add_argument("--root", default=S, help="dataset folder (default: the embedded GM dataset)")
    p.add_argument("--initial", type=int, default=S, help="number of base classes (session 0), default 60")
    p.add_argument("--increment", type=int, default=S, help="new classes per later session, default 5")
    p.add_argument("--shots", type=_shots, default=S, help="training clips per new class, or 'all'; default 5")
    p.add_argument("--num-classes", type=int, default=S,
                   help="use only the first N classes of the order (default: every class)")
    p.add_argument("--class-order", type=_class_ids, default=S,
                   help="dataset class ids in learning order, e.g. 0-49; a subset restricts the run to them "
                        "(tune on some classes, compare on others)")
    p.add_argument("--class-split", choices=["tune", "eval"], default=S,
                   help="only one of two disjoint parts of the dataset's classes, the same for every seed: "
                        "`tune` on one, `compare` on the other (default: every class)")
    p.add_argument("--class-split-fraction", type=float, default=S,
                   help="share of the dataset's classes in the tune part, default 0.5")
    p.add_argument("--class-split-seed", type=int, default=S,
                   help="seed of the permutation that splits the classes (not --seed), default 0")
    p.add_argument("--test-fold", type=int, default=S, help="held-out fold, default 5")
    p.add_argument("--train-folds", type=lambda v: [int(x) for x in _names(v)], default=S,
                   help="comma-separated training folds (default: all but the test fold)")
    p.add_argument("--encoder", default=S, help="encoder config name (fast, tiny, small, ast-fast, ast-tiny), "
                                                "default fast")
    p.add_argument("--encoder-opt", dest="encoder_opts", type=_key_value, action="append", default=S,
                   metavar="KEY=VALUE",
                   help="change one EncoderConfig field of the --encoder preset, e.g. pool=mean+max, "
                        "pool_layers=2, layer_merge=mean, pool_norm=rms (repeatable)")
    p.add_argument("--clip-seconds", type=float, default=S, help="clip length, default 2.0")
    p.add_argument("--epochs", type=int, default=S, help="base-session training epochs, default 20")
    p.add_argument("--train-opt", dest="train_opts", type=_key_value, action="append", default=S,
                   metavar="KEY=VALUE",
                   help="set one TrainConfig field of base training, e.g. time_shift=20, gain_db=6, mix_prob=0.3, "
                        "cutmix_prob=0.5, virtual_classes=30, val_fraction=0.1 (repeatable)")
    p.add_argument("--pretrained", default=S,
                   help="start base training from an `earmark pretrain` checkpoint or a published "
                        "SSAST/SSAMBA/AuM file")
    p.add_argument("--learners", "--learner", dest="learners", type=_names, default=S,
                   help=f"comma-separated learner names, default {shown['learners']}")
    p.add_argument("--scenario", choices=["class-incremental", "blurry"], default=S,
                   help="class-incremental or blurry (classes recur across sessions with uneven counts); "
                        "default class-incremental")
    p.add_argument("--sessions", dest="num_sessions", type=int, default=S,
                   help="blurry: number of sessions (default: from --initial/--increment)")
    p.add_argument("--blurry-fraction", type=float, default=S,
                   help="blurry: share of a blurry class's clips moved to other sessions, default 0.1")
    p.add_argument("--disjoint-fraction", type=float, default=S,
                   help="blurry: share of classes that appear in one session only, default 0.5")
    p.add_argument("--online-batch", type=int, default=S,
                   help="online protocol: one pass in batches of this size, each predicted before it is learned")
    p.add_argument("--memory-budget", type=_bytes, default=S,
                   help="total bytes per learner (state + exemplars + encoder), e.g. 20MB; replay-style "
                        "learners fill it with exemplars")
    p.add_argument("--no-joint", dest="joint_bound", action="store_false", default=S,
                   help="skip the joint ridge upper bound")
    p.add_argument("--reference", choices=["joint"], default=S,
                   help="also the upper reference: the same recipe with the encoder trained on all classes of "
                        "the scenario, every learner fitted once on top, and the ratio incremental last / joint "
                        "last (default: none)")
    p.add_argument("--on-error", choices=["fail", "skip"], default=S,
                   help="bad audio: fail with a clear message or skip and report; default fail")
    p.add_argument("--seed", type=int, default=S,
                   help="one seed for class order, support sets, encoder init and base training, default 0")
    p.add_argument("--device", default=S, help="torch device, e.g. cpu or cuda; default cpu")
    p.add_argument("--out", default=S, help=f"output folder, default {shown['out']}")
    p.add_argument("--cache-dir", default=S, help="embedding/encoder cache (default: $EARMARK_DATA/cache)")
    p.add_argument("--retrain", action="store_true", default=S, help="train the encoder even if a cached one matches")
    p.add_argument("--no-resume", dest="resume", action="store_false", default=S,
                   help="start base training and the backbone learners' sessions over instead of continuing an "
                        "interrupted run from its checkpoints")
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
        from earmark.experiments.tune import load_params, merge_learner_params, tuning_provenance

        values["learner_params"] = merge_learner_params(values.get("learner_params"), load_params(params_path))
        values["tuned_on"] = tuning_provenance(params_path)
    epochs = given.pop("epochs", None)
    train_opts = given.pop("train_opts", None)
    encoder_opts = given.pop("encoder_opts", None)
    blurry = {k: given.pop(k) for k in ("num_sessions", "blurry_fraction", "disjoint_fraction") if k in given}
    if blurry:
        values["scenario_params"] = {**(values.get("scenario_params") or {}), **blurry}
    values.update(given)
    if epochs is not None or train_opts:
        values["train"] = {**(values.get("train") or {}), **dict(train_opts or []),
                           **({"epochs": epochs} if epochs is not None else {})}
    if encoder_opts:
        encoder = values.get("encoder", "fast")
        base = {"preset": encoder} if isinstance(encoder, str) else dict(encoder)
        values["encoder"] = {**base, **dict(encoder_opts)}
    return run_config_from_dict(values)


def cmd_run(args: argparse.Namespace) -> int:
    from earmark.experiments import run

    config = _run_config(args)
    results = run(config)
    print(f"\nresults: {config.out}/results.json, plot: {config.out}/accuracy.png, config: {config.out}/config.yaml")
    if "model" in results:
        _print_next_steps(Path(results["model"]))
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


def _folder_clips(folder: str) -> tuple[list[Path], list[str]]:
    """A folder of class sub-folders: every audio file under ``folder/<label>/`` gets that label."""
    from earmark.data import load_dataset

    ds = load_dataset("folder", folder)
    return list(ds.paths), [ds.class_names[int(t)] for t in ds.targets]


def cmd_train(args: argparse.Namespace) -> int:
    from earmark.model import Model, ModelError
    from earmark.training.supervised import TrainConfig

    out = Path(args.out)
    if out.exists():
        raise ModelError(f"{out}: already exists; `earmark learn` adds to a model, or choose another path")
    if args.folder:
        paths, labels = _folder_clips(args.folder)
    else:
        from earmark.data import load_dataset

        ds = load_dataset(args.dataset, args.root)
        keep = [i for i in range(len(ds)) if args.test_fold is None or int(ds.folds[i]) != args.test_fold]
        paths, labels = [ds.paths[i] for i in keep], [ds.class_names[int(ds.targets[i])] for i in keep]
    params = _learner_params(args.params)
    model = Model.train(paths, labels, encoder=args.encoder, learner=args.learner, learner_params=params,
                        clip_seconds=args.clip_seconds, train=TrainConfig(epochs=args.epochs), seed=args.seed,
                        device=args.device, on_error=args.on_error, progress=not args.no_progress)
    model.save(out)
    counts = model.counts()
    print(f"trained {out}: {len(counts)} labels, {sum(counts.values())} clips, learner {args.learner}")
    _print_next_steps(out)
    return 0


def _learner_params(text: str | None) -> dict:
    import yaml

    if not text:
        return {}
    values = yaml.safe_load(Path(text).read_text()) if Path(text).is_file() else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"--params: expected a mapping of learner options, got {text!r}")
    return values


def _print_next_steps(model: Path) -> None:
    print(f"""use it:
  earmark predict {model} CLIP.wav [--top-k 3] [--window 2 --hop 1]
  earmark learn {model} --label NAME CLIP1.wav CLIP2.wav ...   (or --folder DIR of label sub-folders)
  earmark forget {model} --label NAME        (or --files CLIP.wav ...)
  earmark info {model}
  earmark export {model} --onnx {model}.onnx""")


def cmd_learn(args: argparse.Namespace) -> int:
    from earmark.model import Model

    if args.engine == "ray":
        from earmark.distributed import import_ray

        import_ray()  # before touching the model: say how to install it
    if args.folder:
        paths, labels = _folder_clips(args.folder)
        if args.files:
            raise ValueError("give files with --label, or --folder, not both")
    else:
        if not args.label or not args.files:
            raise ValueError("learn needs --label NAME with files, or --folder DIR")
        paths, labels = list(args.files), args.label
    with Model.lock(args.model):
        model = Model.load(args.model, args.device)
        if args.engine == "ray":
            from earmark.distributed.ray_engine import learn_with_ray

            report = learn_with_ray(model, paths, labels, on_error=args.on_error, address=args.address,
                                    num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker)
        else:
            report = model.learn(paths, labels, on_error=args.on_error)
        model.save()
    for item in report["skipped"]:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    new = f" (new: {', '.join(report['new'])})" if report["new"] else ""
    learned = ", ".join(f"{k} +{v}" for k, v in report["labels"].items())
    print(f"learned {report['learned']} clip(s): {learned}{new}; {args.model} now knows {len(model.labels)} labels")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from earmark.data import load_dataset
    from earmark.distributed import import_ray
    from earmark.distributed.ray_engine import embed_local, embed_with_ray
    from earmark.model import Model

    if args.engine == "ray":
        import_ray()  # before reading anything: say how to install it
    if args.dataset and not args.root:
        raise ValueError("--dataset needs --root PATH (the dataset's folder)")
    ds = load_dataset("folder", args.folder) if args.folder else load_dataset(args.dataset, args.root)
    embedder = Model.load(args.model).embedder
    kw = {"batch_size": args.batch_size, "on_error": args.on_error, "progress": not args.no_progress}
    if args.engine == "ray":
        summary = embed_with_ray(embedder, list(ds.paths), args.out, num_workers=args.num_workers,
                                 cpus_per_worker=args.cpus_per_worker, address=args.address, **kw)
    else:
        summary = embed_local(embedder, list(ds.paths), args.out, **kw)
    for path, reason in summary.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"embedded {summary.clips} clip(s) with --engine {summary.engine} ({summary.workers} worker(s)): "
          f"{summary.computed} computed, {summary.cached} already cached, {len(summary.skipped)} skipped, "
          f"{summary.seconds:.1f}s; cache {summary.cache_dir}")
    return 0


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: a Ray cluster (pip install 'earmark[ray]')")
    p.add_argument("--address", default=None,
                   help="--engine ray: the cluster to connect to (auto, HOST:PORT or ray://HOST:10001); "
                        "default: start a local Ray instance on this machine")
    p.add_argument("--num-workers", type=int, default=2, help="--engine ray: workers (actors or tasks), default 2")
    p.add_argument("--cpus-per-worker", type=int, default=1,
                   help="--engine ray: CPUs per worker (its torch thread count), default 1")


def cmd_forget(args: argparse.Namespace) -> int:
    from earmark.model import Model

    if bool(args.label) == bool(args.files):
        raise ValueError("forget needs --label NAME or --files FILE..., not both")
    with Model.lock(args.model):
        model = Model.load(args.model, args.device)
        report = model.forget(label=args.label) if args.label else model.forget(files=args.files)
        model.save()
    gone = f"; label(s) removed: {', '.join(report['removed_labels'])}" if report["removed_labels"] else ""
    print(f"forgot {report['forgot']} clip(s) exactly{gone}; {len(model.labels)} labels left")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from earmark.model import Model, ModelError

    out = Path(args.out)
    if out.exists():
        raise ModelError(f"{out}: already exists; merge writes a new model directory")
    merged = Model.load(args.model_a)
    report = merged.merge(Model.load(args.model_b))
    merged.path = None  # a new model: written to --out, A stays as it was
    merged.generation = 0
    merged.save(out)
    new = f"; labels only in B: {', '.join(report['new'])}" if report["new"] else ""
    print(f"merged {args.model_b} ({report['merged']} clips) into a copy of {args.model_a}: {out} knows "
          f"{len(merged.labels)} labels, {len(merged.journal)} clips{new}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from earmark.model import Model

    info = Model.load(args.model).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    enc, learner = info["encoder"], info["learner"]
    print(f"model {args.model} (format {info['format']}, earmark {info['earmark']}, generation {info['generation']})")
    print(f"encoder: {enc['config'].get('arch', 'mamba')} width {enc['config']['embed_dim']} depth "
          f"{enc['config']['depth']}, {enc['parameters']:,} parameters, {enc['bytes']:,} bytes")
    print(f"learner: {learner['name']} {learner['config']}, state {learner['state_bytes']:,} bytes")
    print(f"forget: {info['forget']}")
    print(f"journal: {info['clips']} clips, {info['journal_bytes']:,} bytes (hashes only: no audio, no embeddings)")
    cal = info.get("calibration")
    if cal:
        shape = "".join(f", {k} {cal[k]}" for k in ("transform", "top_label")
                        if cal.get(k) not in (None, "identity", "none"))
        print(f"calibration: temperature {cal['temperature']:.3g}{shape}, "
              f"unknown below {cal['score']} {cal['threshold']}, {cal['held_out_clips']} held-out embeddings + "
              f"a shadow learner, {cal['bytes']:,} bytes")
    print(f"{len(info['labels'])} labels (clips):")
    for name, n in info["labels"].items():
        print(f"  {name}\t{n}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from earmark.model import Model

    report = Model.load(args.model).export_onnx(args.onnx)
    print(f"wrote {args.onnx} ({report.get('bytes', '?')} bytes; input {report.get('input')}); onnxruntime "
          f"matches PyTorch within {report.get('max_abs_diff', float('nan')):.2e}; labels in {args.onnx}.labels.json")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import json

    from earmark.model import Model

    model = Model.load(args.model, args.device)
    preds = model.predict(args.files, top_k=args.top_k, window=args.window, hop=args.hop, on_error=args.on_error,
                          unknown_threshold=args.unknown_threshold, reject_unknown=not args.no_unknown)
    rows = [{"file": p.file, "start": p.start, "end": p.end, "label": p.label, "probability": p.top[0][1],
             "top": " ".join(f"{n}:{v:.3f}" for n, v in p.top)} for p in preds]
    if args.format == "json":
        print(json.dumps({"predictions": [p.to_dict() for p in preds],
                          "skipped": [{"file": f, "reason": r} for f, r in preds.skipped]}, indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["file"])
        writer.writeheader()
        writer.writerows(rows)
    else:
        for r in rows:
            when = f"{r['start']:.2f}s\t" if r["start"] is not None else ""
            print(f"{r['file']}\t{when}{r['label']}\t{r['probability']:.3f}\t{r['top']}", flush=True)
    for f, reason in preds.skipped:
        print(f"skipped {f}: {reason}", file=sys.stderr)
    return 1 if preds.skipped and not preds else 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    """The HTTP service (needs the `service` extra): classify, learn, forget; a web page at /."""
    try:
        from earmark.service import ServiceConfig, read_token, serve
    except ImportError as exc:
        raise ValueError(f"the service needs its extra: pip install 'earmark[service]' ({exc})") from None
    from earmark.model import ModelLockedError

    config = ServiceConfig(
        model=args.model, host=args.host, port=args.port, read_only=args.read_only,
        token=None if args.read_only else read_token(args.token_file), device=args.device,
        max_request_bytes=args.max_request_bytes, max_files=args.max_files, max_clip_seconds=args.max_clip_seconds,
        learn_queue=args.learn_queue, classify_workers=args.workers,
        window_workers=args.window_workers, torch_threads=args.torch_threads,
        load_delay=args.load_delay, temp_dir=args.temp_dir, compact_every=args.compact_every,
        upload_memory_bytes=args.upload_memory,
    )
    try:
        serve(config, access_log=not args.no_access_log, log_level=args.log_level)
    except ModelLockedError as exc:
        print(f"earmark: error: {exc}", file=sys.stderr)
        return 2
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
    _add_run_options(comp, COMPARE_DEFAULTS)
    comp.add_argument("--trials", type=int, default=3, help="support-set draws (few-shot protocol), default 3")
    comp.set_defaults(func=cmd_compare)
    tun = sub.add_parser("tune", help="grid-search learner options on a tuning scenario; writes params.yaml for "
                                      "`compare --params` (tune on classes disjoint from the evaluation's: "
                                      "--class-split tune here, --class-split eval there)")
    _add_run_options(tun, TUNE_DEFAULTS)
    tun.add_argument("--grid", help="YAML file of learner -> {option: [values]} "
                                    "(default: earmark.experiments.tune.DEFAULT_GRID)")
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
    train = sub.add_parser("train", help="base-train a model on a dataset or a folder of label sub-folders")
    tsrc = train.add_mutually_exclusive_group(required=True)
    tsrc.add_argument("--folder", help="a folder of label sub-folders of audio files")
    tsrc.add_argument("--dataset", help="a dataset loader name (with --root), e.g. esc50")
    train.add_argument("--root", help="dataset folder for --dataset")
    train.add_argument("--test-fold", type=int, default=None, help="--dataset: leave this fold out")
    train.add_argument("-o", "--out", required=True, help="the model directory to create")
    train.add_argument("--encoder", default="fast", help="encoder preset (fast, tiny, small, ast-fast, ...)")
    train.add_argument("--learner", default="analytic", help="incremental head (ncm, lda, analytic, ranpac, ...)")
    train.add_argument("--params", help="learner options as YAML text or a YAML file, e.g. '{gamma: 1000}'")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--clip-seconds", type=float, default=2.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    train.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_train)
    learn = sub.add_parser("learn", help="teach a model new labels, or more examples of known ones")
    learn.add_argument("model")
    learn.add_argument("files", nargs="*")
    learn.add_argument("--label", help="the label of the files")
    learn.add_argument("--folder", help="a folder of label sub-folders instead of --label and files")
    learn.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                       help="a bad file: fail and learn nothing (default), or skip it and learn the rest")
    learn.add_argument("--device", default="cpu")
    _add_engine_options(learn)
    learn.set_defaults(func=cmd_learn)
    embed = sub.add_parser("embed", help="embed a dataset or folder into an embedding cache with a model's encoder "
                                         "(--engine ray: on a Ray cluster)")
    esrc = embed.add_mutually_exclusive_group(required=True)
    esrc.add_argument("--folder", help="a folder of label sub-folders of audio files")
    esrc.add_argument("--dataset", help="a dataset loader name (with --root), e.g. esc50")
    embed.add_argument("--root", help="dataset folder for --dataset")
    embed.add_argument("--model", required=True, help="a model directory: its encoder embeds")
    embed.add_argument("-o", "--out", required=True, help="the embedding cache root (shards under <root>/<encoder>)")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    embed.add_argument("--no-progress", action="store_true")
    _add_engine_options(embed)
    embed.set_defaults(func=cmd_embed)
    pred = sub.add_parser("predict", help="label audio files (or windows of long recordings) with a model")
    pred.add_argument("model", help="a model directory (earmark train, or MODEL written by demo/run)")
    pred.add_argument("files", nargs="+")
    pred.add_argument("--top-k", type=int, default=3)
    pred.add_argument("--format", choices=["table", "json", "csv"], default="table")
    pred.add_argument("--window", type=_seconds, default=None, help="window length for long files, e.g. 2s")
    pred.add_argument("--hop", type=_seconds, default=None, help="hop between windows, e.g. 1s (default: window)")
    pred.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                      help="a bad file: stop (default), or skip it, predict the rest and list it")
    pred.add_argument("--device", default="cpu")
    pred.add_argument("--unknown-threshold", type=float, default=None,
                      help="model directories: answer 'unknown' below this known-ness score (default: the stored "
                           "threshold, chosen for 5%% false rejections of known sounds)")
    pred.add_argument("--no-unknown", action="store_true", help="never answer 'unknown'")
    pred.set_defaults(func=cmd_predict)
    forget = sub.add_parser("forget", help="exactly unlearn a label, or clips that were learned")
    forget.add_argument("model")
    forget.add_argument("--label")
    forget.add_argument("--files", nargs="+")
    forget.add_argument("--device", default="cpu")
    forget.set_defaults(func=cmd_forget)
    merge = sub.add_parser("merge", help="merge two models trained on different data (same encoder and settings)")
    merge.add_argument("model_a")
    merge.add_argument("model_b")
    merge.add_argument("-o", "--out", required=True, help="the merged model directory to create")
    merge.set_defaults(func=cmd_merge)
    info = sub.add_parser("info", help="labels with clip counts, learner, encoder, sizes, what forget can do")
    info.add_argument("model")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    export = sub.add_parser("export", help="encoder and head as ONNX, checked against PyTorch with onnxruntime")
    export.add_argument("model")
    export.add_argument("--onnx", required=True, help="output .onnx file")
    export.set_defaults(func=cmd_export)
    render = sub.add_parser("render", help="render the embedded General MIDI dataset to a folder")
    render.add_argument("out")
    render.add_argument("--classes", type=int, default=100)
    render.add_argument("--seed", type=int, default=0)
    render.set_defaults(func=cmd_render)
    srv = sub.add_parser("serve", help="serve a model over HTTP (classify, learn, forget; web page at /)")
    srv.add_argument("model", help="a model directory (Model.save)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to listen on, default 127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--read-only", action="store_true", help="classify and inspect only; no token needed")
    srv.add_argument("--token-file", help="file holding the bearer token (default: $EARMARK_TOKEN_FILE, "
                                          "else $EARMARK_TOKEN)")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--max-request-bytes", type=_bytes, default=20 * 2**20, help="upload limit per request")
    srv.add_argument("--max-files", type=int, default=32, help="audio files per request")
    srv.add_argument("--max-clip-seconds", type=float, default=30.0, help="longest clip to classify or learn")
    srv.add_argument("--learn-queue", type=int, default=4, help="learn/forget requests admitted at once")
    srv.add_argument("--workers", type=int, default=1, help="threads classifying clips (default 1)")
    srv.add_argument("--window-workers", type=int, default=1,
                     help="threads classifying long files window by window (default 1)")
    srv.add_argument("--torch-threads", type=int, default=1, help="torch threads per worker")
    srv.add_argument("--temp-dir", help="where uploads over --upload-memory spill while a request runs "
                                        "(default: the system's temp dir)")
    srv.add_argument("--upload-memory", type=_bytes, default=8 * 2**20,
                     help="a request's files held in memory before they spill to --temp-dir (default 8MiB)")
    srv.add_argument("--compact-every", type=int, default=64,
                     help="changes acknowledged through the model's change log before a full save folds it in")
    srv.add_argument("--no-access-log", action="store_true")
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--load-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: see "not ready"
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from earmark.audio import AudioDecodeError
    from earmark.checkpoint import CheckpointError
    from earmark.data.base import DatasetLayoutError
    from earmark.runtime import keep_freed_memory

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `learn MODEL --label NAME FILE...`: files after the option are still files
        if args.command != "learn" or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.files = [*args.files, *extra]
    keep_freed_memory()  # reuse freed tensor memory warm instead of page-faulting it in again
    try:
        return args.func(args)
    except BrokenPipeError:  # `earmark info MODEL | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except (AudioDecodeError, DatasetLayoutError, CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"earmark: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
