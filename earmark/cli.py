"""Command line: thin wrappers that build configs and call the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _shots(value: str) -> int | None:
    if value.lower() in ("all", "none", "0"):
        return None
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("shots must be positive or 'all'")
    return n


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="dataset folder in the ESC-50 layout (default: the embedded GM dataset)")
    p.add_argument("--initial", type=int, default=60, help="number of base classes (session 0)")
    p.add_argument("--increment", type=int, default=5, help="new classes per later session")
    p.add_argument("--shots", type=_shots, default=5, help="training clips per new class, or 'all'")
    p.add_argument("--num-classes", type=int, default=None, help="use only the first N classes of the order")
    p.add_argument("--test-fold", type=int, default=5)
    p.add_argument("--encoder", default="fast", help="encoder config name (fast, tiny, small)")
    p.add_argument("--epochs", type=int, default=None, help="base-session training epochs")
    p.add_argument("--learners", default="ncm,analytic", help="comma-separated learner names")
    p.add_argument("--no-joint", action="store_true", help="skip the joint ridge upper bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", default="runs/demo", help="output folder for results.json, plots, checkpoints")
    p.add_argument("--cache-dir", default=None, help="embedding/encoder cache (default: $EARMARK_DATA/cache)")
    p.add_argument("--retrain", action="store_true", help="train the encoder even if a cached one matches")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")


def _run_config(args: argparse.Namespace):
    from earmark.pipeline import RunConfig
    from earmark.training.supervised import TrainConfig

    train = TrainConfig(seed=args.seed)
    if args.epochs is not None:
        train.epochs = args.epochs
    return RunConfig(
        root=args.root, out=args.out, cache_dir=args.cache_dir, num_classes=args.num_classes,
        initial=args.initial, increment=args.increment, shots=args.shots, test_fold=args.test_fold,
        encoder=args.encoder, learners=[s.strip() for s in args.learners.split(",") if s.strip()],
        joint_bound=not args.no_joint, seed=args.seed, device=args.device, retrain=args.retrain,
        progress=not args.no_progress, train=train,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from earmark.pipeline import run

    run(_run_config(args))
    print(f"\nresults: {args.out}/results.json, plot: {args.out}/accuracy.png")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from earmark.data import RenderConfig, render_default_dataset

    root = render_default_dataset(args.out, RenderConfig(n_classes=args.classes, seed=args.seed))
    print(root)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earmark", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: base training, incremental sessions, report")
    _add_run_options(demo)
    demo.set_defaults(func=cmd_demo)
    render = sub.add_parser("render", help="render the embedded General MIDI dataset to a folder")
    render.add_argument("out")
    render.add_argument("--classes", type=int, default=100)
    render.add_argument("--seed", type=int, default=0)
    render.set_defaults(func=cmd_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from earmark.audio import AudioDecodeError
    from earmark.data.base import DatasetLayoutError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AudioDecodeError, DatasetLayoutError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"earmark: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
