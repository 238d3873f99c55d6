"""`--reference joint` on a tiny scenario, compare's joint-ridge row, and the class split for leak-free tuning."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from earmark.cli import COMPARE_DEFAULTS, _run_config, build_parser
from earmark.data import RenderConfig
from earmark.experiments import RunConfig, run
from earmark.experiments.compare import compare
from earmark.experiments.config import split_classes
from earmark.experiments.prepare import resolve_class_order, tuning_check
from earmark.experiments.tune import tuning_provenance
from earmark.training.supervised import TrainConfig


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("EARMARK_DATA", str(tmp_path / "data"))
    return RunConfig(
        out=str(tmp_path / "out"), initial=4, increment=2, shots=3, encoder={"embed_dim": 32, "depth": 2},
        clip_seconds=1.0, learners=["ncm", "analytic"], learner_params={"analytic": {"buffer_size": 256}},
        progress=False, render=RenderConfig(n_classes=8, clips_per_class=10, clip_seconds=1.0),
        train=TrainConfig(epochs=2, batch_size=8),
    )


def test_joint_reference_rows_and_ratios_in_compare_and_run(tiny_run, capsys):
    tiny_run.reference = "joint"
    results = compare(tiny_run, trials=1)
    printed = capsys.readouterr().out
    out = Path(tiny_run.out)
    ref = results["reference"]
    assert "joint-ridge" in results["learners"]  # compare prints the joint ridge row that run prints
    assert set(ref["learners"]) == {"ncm", "analytic", "joint-ridge"}
    # the all-classes run: the same classes in the same order, one session with every training clip
    assert ref["scenario"]["class_order"] == results["scenario"]["class_order"]
    assert ref["scenario"]["session_classes"] == [list(range(8))]
    assert ref["scenario"]["train_items"] == [64] and ref["scenario"]["test_items"] == [16]  # 8 x 8, 8 x 2
    assert ref["encoder"]["digest"] != results["encoder"]["digest"]  # its own encoder, trained on all classes
    assert (out / "reference" / "embedder.safetensors").is_file() and (out / "reference.csv").is_file()
    for row in ref["ratios"]:
        name = row["learner"]
        assert row["last"] == pytest.approx(results["learners"][name]["mean"]["last_accuracy"][0])
        assert row["joint_last"] == ref["learners"][name]["last_accuracy"]
        assert row["ratio"] == pytest.approx(row["last"] / row["joint_last"])
        assert 0 <= ref["learners"][name]["novel_accuracy"] <= 1 and 0 <= ref["learners"][name]["base_accuracy"] <= 1
    # the last accuracy is the item-weighted mix of base and novel accuracy on the same test clips (8 + 8)
    ncm = ref["learners"]["ncm"]
    assert ncm["last_accuracy"] == pytest.approx((ncm["base_accuracy"] + ncm["novel_accuracy"]) / 2)
    # exact heads: analytic is the joint ridge on the reference embeddings too
    assert ref["learners"]["analytic"]["last_accuracy"] == ref["learners"]["joint-ridge"]["last_accuracy"]
    assert "Joint reference" in printed and "joint last" in printed and "ratio" in printed
    assert "joint-ridge" in printed.split("Joint reference")[0]  # the row in the compare table
    assert "joint-ridge" in (out / "compare.csv").read_text()

    single = run(tiny_run)  # run: the same reference beside its rows, both encoders reused
    printed = capsys.readouterr().out
    assert single["reference"]["encoder"]["training"]["reused"] is True
    keys = ("last_accuracy", "base_accuracy", "novel_accuracy", "accuracy_matrix")
    for name, entry in ref["learners"].items():
        again = single["reference"]["learners"][name]
        assert {k: again[k] for k in keys} == {k: entry[k] for k in keys}, name
    ratios = {r["learner"]: r for r in single["reference"]["ratios"]}
    assert set(ratios) == {"ncm", "analytic", "joint-ridge"}
    assert ratios["ncm"]["ratio"] == pytest.approx(
        single["learners"]["ncm"]["metrics"]["last_accuracy"] / ref["learners"]["ncm"]["last_accuracy"])
    assert "Joint reference" in printed
    saved = json.loads((Path(tiny_run.out) / "results.json").read_text())
    assert saved["reference"]["ratios"][0]["learner"] == "ncm"


def test_an_unknown_reference_fails_before_any_work(tiny_run):
    tiny_run.reference = "oracle"
    with pytest.raises(ValueError, match="unknown reference 'oracle'"):
        run(tiny_run)
    assert not (Path(tiny_run.out) / "results.json").exists()


# ----------------------------------------------------------------------------- the class split


def test_class_split_parts_are_disjoint_cover_everything_and_ignore_the_run_seed():
    parts = split_classes(50)
    assert len(parts["tune"]) == len(parts["eval"]) == 25
    assert set(parts["tune"]).isdisjoint(parts["eval"]) and set(parts["tune"]) | set(parts["eval"]) == set(range(50))
    assert split_classes(50) == parts and split_classes(50, seed=1) != parts
    assert len(split_classes(50, fraction=0.3)["tune"]) == 15
    ds = SimpleNamespace(num_classes=50)
    orders = [resolve_class_order(RunConfig(class_split="tune", seed=s), ds) for s in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == parts["tune"]  # the same part for every run seed
    assert orders[0] != orders[1]  # in the order the run seed draws
    assert resolve_class_order(RunConfig(class_order=[3, 1]), ds) == [3, 1]


def test_a_class_split_run_sees_only_its_part(tiny_run):
    tiny_run.class_split, tiny_run.initial, tiny_run.increment = "eval", 2, 2
    tiny_run.train = TrainConfig(epochs=1, batch_size=8)
    results = run(tiny_run)
    assert sorted(results["scenario"]["class_order"]) == split_classes(8)["eval"]


def test_params_tuned_on_shared_classes_are_flagged(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("analytic: {gamma: 10.0}\n")
    assert tuning_provenance(params) is None  # no tune.json beside it: nothing to check
    (tmp_path / "tune.json").write_text(json.dumps({"scenario": {"dataset": "d", "root": "/r",
                                                                 "class_names": ["dog", "rain"]}}))
    config = _run_config(build_parser().parse_args(["compare", "--params", str(params)]), COMPARE_DEFAULTS)
    assert config.tuned_on["class_names"] == ["dog", "rain"] and config.tuned_on["params"] == str(params)
    names = ["dog", "rain", "bell", "horn"]
    scenario = SimpleNamespace(dataset=SimpleNamespace(class_names=names), class_order=np.array([2, 3, 1]))
    check = tuning_check(config, scenario)
    assert check["overlap"] == ["rain"] and check["disjoint"] is False and check["evaluated_classes"] == 3
    assert "WARNING" in capsys.readouterr().out
    scenario.class_order = np.array([2, 3])
    assert tuning_check(config, scenario)["disjoint"] is True
    (tmp_path / "tune.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tune.json"):
        tuning_provenance(params)
