"""`--help` states the defaults the code uses, for every option of demo, run, compare and tune."""

from __future__ import annotations

import argparse
import inspect
import re

import pytest

from earmark.cli import COMPARE_DEFAULTS, TUNE_DEFAULTS, _run_config, build_parser
from earmark.experiments import RunConfig
from earmark.experiments.compare import compare
from earmark.experiments.tune import tune
from earmark.scenarios.blurry import BlurryIncremental

COMMANDS = {"demo": {}, "run": {}, "compare": COMPARE_DEFAULTS, "tune": TUNE_DEFAULTS}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _signature_default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def expected_defaults(command: str) -> dict[str, str]:
    """What each option defaults to in the code, as the help must say it (dest -> text)."""
    config = _run_config(build_parser().parse_args([command]), COMMANDS[command])
    blurry = inspect.signature(BlurryIncremental).parameters
    fmt = {
        "dataset": config.dataset, "initial": config.initial, "increment": config.increment,
        "shots": config.shots, "test_fold": config.test_fold, "encoder": config.encoder,
        "clip_seconds": config.clip_seconds, "epochs": config.train.epochs, "learners": ",".join(config.learners),
        "scenario": config.scenario, "blurry_fraction": blurry["blurry_fraction"].default,
        "disjoint_fraction": blurry["disjoint_fraction"].default, "on_error": config.on_error,
        "seed": config.seed, "device": config.device, "out": config.out,
        "class_split_fraction": config.class_split_fraction, "class_split_seed": config.class_split_seed,
    }
    if command == "compare":
        fmt["trials"] = _signature_default(compare, "trials")
    if command == "tune":
        fmt["trials"] = _signature_default(tune, "trials")
        fmt["metric"] = _signature_default(tune, "metric")
    return {k: str(v) for k, v in fmt.items()}


# Options whose default is not a value but a behaviour; the help must say so in these words.
DESCRIBED = {
    "root": "the embedded GM dataset", "num_classes": "every class", "class_split": "every class",
    "train_folds": "all but the test fold", "cache_dir": "$EARMARK_DATA/cache", "num_sessions": "from --initial",
    "reference": "none", "grid": "earmark.experiments.tune.DEFAULT_GRID",
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_stated_default_is_the_one_the_code_uses(command: str) -> None:
    sub = _subparsers()[command]
    expected = expected_defaults(command)
    stated = {}
    for action in sub._actions:
        text = " ".join((action.help or "").split())
        if action.dest in DESCRIBED:
            assert f"default: {DESCRIBED[action.dest]}" in text, (command, action.dest, text)
            continue
        m = re.search(r"default:? (\S+?)[),;]?(?: |$)", text)
        if m:
            stated[action.dest] = m.group(1)
    for dest, value in stated.items():
        assert dest in expected, f"{command} --{dest}: the help states a default ({value}) the test does not know"
        assert value == expected[dest], f"{command} --{dest}: help says {value}, the code uses {expected[dest]}"
    # every option with a plain default says it
    missing = sorted(set(expected) - set(stated))
    assert not missing, f"{command}: no default in the help of {missing}"


def test_command_defaults_differ_where_they_should() -> None:
    assert expected_defaults("compare")["learners"] == ",".join(COMPARE_DEFAULTS["learners"])
    assert expected_defaults("tune")["out"] == "runs/tune"
    assert expected_defaults("run")["out"] == RunConfig().out


def test_key_value_options_reach_the_configs() -> None:
    args = build_parser().parse_args([
        "compare", "--encoder", "fast", "--encoder-opt", "pool=mean+max", "--encoder-opt", "pool_layers=2",
        "--train-opt", "time_shift=20", "--train-opt", "restore_best=false", "--epochs", "3",
        "--reference", "joint", "--class-split", "eval",
    ])
    config = _run_config(args, COMPARE_DEFAULTS)
    assert config.encoder == {"preset": "fast", "pool": "mean+max", "pool_layers": 2}
    assert config.train.time_shift == 20 and config.train.restore_best is False and config.train.epochs == 3
    assert config.reference == "joint" and config.class_split == "eval"
    with pytest.raises(ValueError, match="unknown train option.*time_shfit"):
        _run_config(build_parser().parse_args(["run", "--train-opt", "time_shfit=3"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--train-opt", "time_shift"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--reference", "oracle"])
    with pytest.raises(ValueError, match="not both"):
        _run_config(build_parser().parse_args(["run", "--class-split", "tune", "--class-order", "0-9"]))
