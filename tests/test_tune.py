"""`earmark tune`: grid expansion, selection, params.yaml into `compare --params`, clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from earmark.cli import COMPARE_DEFAULTS, _run_config, build_parser, main
from earmark.data.dataset import AudioDataset
from earmark.experiments import RunConfig
from earmark.experiments import tune as tune_mod
from earmark.experiments.evaluate import evaluate_learner
from earmark.experiments.tune import (
    DEFAULT_GRID,
    best_index,
    expand_grid,
    grid_points,
    load_grid,
    load_params,
    merge_learner_params,
    search,
)
from earmark.learners import make_learner
from earmark.scenarios import ClassIncremental


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lda_problem(n_classes: int = 6, train: int = 20, test: int = 15):
    """Classes whose means differ along a thin direction while the shared noise is long along another:
    LDA (shrinkage ~0) separates them, shrinkage 1 (identity covariance, nearest mean) does not.
    Fake paths: a dataset, a 3-session scenario and one embedding row per item, no audio."""
    rng = np.random.default_rng(0)
    per = train + test
    targets = np.repeat(np.arange(n_classes), per)
    folds = np.tile(np.r_[np.ones(train), 2 * np.ones(test)], n_classes).astype(int)
    long, thin = np.array([1.0, 1.0]) / 2**0.5, np.array([1.0, -1.0]) / 2**0.5
    noise = rng.normal(0, 10, (len(targets), 1)) * long + rng.normal(0, 0.1, (len(targets), 1)) * thin
    X = torch.tensor(noise + targets[:, None] * np.array([1.0, 0.0]) + np.array([3.0, -3.0]), dtype=torch.float32)
    ds = AudioDataset("synthetic", Path("/fake"), [Path(f"/fake/{i}.wav") for i in range(len(targets))], targets,
                      [f"c{c}" for c in range(n_classes)], folds)
    tr, te = ds.split(2)
    scenario = ClassIncremental(ds, tr, te, initial_increment=2, increment=2, shots=5)
    return scenario, X, {i: i for i in range(len(targets))}


# ----------------------------------------------------------------------------- grids and selection


def test_expand_grid_is_parametergrid_in_order_without_duplicates():
    assert expand_grid({}) == [{}]
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert expand_grid({"a": 3}) == [{"a": 3}]  # a scalar is a one-value list
    assert expand_grid([{"a": [1], "b": [1]}, {"a": [2], "b": [2]}, {"a": 1, "b": 1}]) == [
        {"a": 1, "b": 1}, {"a": 2, "b": 2}]  # tied options, duplicate dropped
    with pytest.raises(ValueError, match="'a' have no values"):
        expand_grid({"a": []})


def test_default_grid_points_are_valid_configs():
    for name, grid in DEFAULT_GRID.items():
        points = grid_points(name, grid, {})
        assert points and all(make_learner(name, **p["params"]) for p in points[:1])
    assert {p["params"]["ridge_min_log10"] for p in grid_points("ranpac", DEFAULT_GRID["ranpac"], {})[1:]} == set(
        range(7))
    dsal = grid_points("dsal", DEFAULT_GRID["dsal"], {})
    assert all(p["params"]["gamma"] == p["params"]["gamma_comp"] for p in dsal)


def test_grid_values_override_the_configured_params():
    pts = grid_points("analytic", {"gamma": [1.0, 10.0]}, {"gamma": 1000.0, "buffer_size": 64})
    assert [p["params"] for p in pts] == [{"gamma": 1.0, "buffer_size": 64}, {"gamma": 10.0, "buffer_size": 64}]
    assert [p["point"] for p in pts] == [{"gamma": 1.0}, {"gamma": 10.0}]


def test_best_index_direction_ties_and_nan():
    assert best_index([0.2, 0.5, 0.5, 0.1]) == 1  # highest, first of a tie
    assert best_index([0.3, 0.1, 0.1], "forgetting") == 1  # lower is better
    assert best_index([float("nan"), 0.1, 0.4]) == 2
    assert best_index([float("nan"), 0.4], "performance_drop") == 1
    with pytest.raises(ValueError, match="no grid point"):
        best_index([float("nan")])


def test_search_picks_the_grid_point_with_the_best_score():
    scenario, X, row_of = lda_problem()
    points = grid_points("lda", {"shrinkage": [1.0, 0.5, 1e-4]}, {})
    result = search("lda", points, scenario, X, row_of, trials=2, metric="average_incremental_accuracy")
    recs = result["points"]
    assert result["best"] == 2 and recs[2]["params"] == {"shrinkage": 1e-4}
    assert recs[2]["score"] > 0.95 > recs[0]["score"] + 0.3  # nearest mean fails, LDA does not
    # every score is the mean over the support-set trials of what evaluate_learner measures
    for rec in recs:
        aa = [evaluate_learner(make_learner("lda", **rec["params"]), scenario.with_trial(t), X, row_of)[0]
              .average_incremental_accuracy() for t in range(2)]
        assert rec["trials"] == pytest.approx(aa) and rec["score"] == pytest.approx(np.mean(aa))
    # a lower-is-better metric selects the minimum
    drop = search("lda", points, scenario, X, row_of, trials=1, metric="forgetting")
    scores = [r["score"] for r in drop["points"]]
    assert drop["best"] == int(np.argmin(scores))


# ----------------------------------------------------------------------------- params.yaml -> compare


@pytest.fixture
def fake_prepare(monkeypatch):
    """tune() on the synthetic problem: prepare() is replaced, everything after it is the real code."""
    scenario, X, row_of = lda_problem()
    calls = []

    def prepare(config, embed_train_pool=False, writer=None):
        calls.append(embed_train_pool)
        return SimpleNamespace(scenario=scenario, X=X, row_of=row_of, dataset=SimpleNamespace(root=Path("/fake")))

    monkeypatch.setattr(tune_mod, "prepare", prepare)
    monkeypatch.setattr(tune_mod, "encoder_summary", lambda prep: {"fake": True})
    return calls


def test_tune_writes_params_that_compare_params_loads(fake_prepare, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tune"
    config = RunConfig(out=str(out), learners=["lda", "ncm"], progress=False)
    results = tune_mod.tune(config, {"lda": {"shrinkage": [1.0, 1e-4]}}, trials=2)
    assert fake_prepare == [True]  # one preparation, with the train pool embedded for the trials
    printed = capsys.readouterr().out
    assert "Grid search" in printed and "shrinkage=0.0001" in printed
    params = load_params(out / "params.yaml")
    assert params == {"lda": {"shrinkage": 1e-4}, "ncm": {}}
    saved = json.loads((out / "tune.json").read_text())
    assert [p["point"] for p in saved["learners"]["lda"]["points"]] == [{"shrinkage": 1.0}, {"shrinkage": 1e-4}]
    assert saved["learners"]["lda"]["best"] == 1 and saved["metric"] == "average_incremental_accuracy"
    assert saved["learners"]["lda"]["points"][1]["score"] == pytest.approx(
        results["learners"]["lda"]["points"][1]["score"])
    assert saved["scenario"]["class_names"] and saved["scenario"]["root"] == "/fake"

    # compare --params: the chosen values join learner_params, the defaults of other learners stay
    config = _run_config(build_parser().parse_args(["compare", "--params", str(out / "params.yaml")]),
                         COMPARE_DEFAULTS)
    assert config.learner_params == {**RunConfig().learner_params, "lda": {"shrinkage": 1e-4}, "ncm": {}}
    seen = []
    monkeypatch.setattr("earmark.experiments.compare.compare", lambda cfg, trials: seen.append((cfg, trials)))
    assert main(["compare", "--params", str(out / "params.yaml"), "--trials", "1", "--no-progress"]) == 0
    assert seen[0][0].learner_params["lda"] == {"shrinkage": 1e-4} and seen[0][1] == 1


def test_tune_checks_everything_before_preparing(fake_prepare, tmp_path):
    config = RunConfig(out=str(tmp_path / "o"), learners=["lda"], progress=False)
    with pytest.raises(ValueError, match="grid names learner.s. dsal that are not being tuned"):
        tune_mod.tune(config, {"dsal": {"gamma": [1.0]}}, trials=1)
    with pytest.raises(ValueError, match="shrinkage must be in"):
        tune_mod.tune(config, {"lda": {"shrinkage": [2.0]}}, trials=1)
    with pytest.raises(ValueError, match="unknown metric"):
        tune_mod.tune(config, None, trials=1, metric="accuracy")
    assert fake_prepare == []


def test_params_merge_order_defaults_config_params(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learner_params:\n  analytic: {buffer_size: 512, gamma: 5.0}\n")
    params = tmp_path / "params.yaml"
    params.write_text("analytic: {gamma: 10.0}\ndsal: {compensation_ratio: 0.0}\n")
    args = build_parser().parse_args(["run", "--config", str(cfg), "--params", str(params), "--learners", "dsal"])
    config = _run_config(args)
    assert config.learner_params == {"analytic": {"buffer_size": 512, "gamma": 10.0},
                                     "dsal": {"compensation_ratio": 0.0}}
    assert config.learners == ["dsal"]
    default = RunConfig().learner_params  # a params file updates the default option by option
    merged = merge_learner_params(None, {"dsal": {"gamma": 1.0}, "lda": {"shrinkage": 0.1}})
    assert merged == {**default, "dsal": {**default.get("dsal", {}), "gamma": 1.0}, "lda": {"shrinkage": 0.1}}
    assert merged["analytic"] == default["analytic"]
    demo = _run_config(build_parser().parse_args(["demo", "--params", str(params)]))
    assert demo.learner_params["analytic"] == {"gamma": 10.0}


@pytest.mark.parametrize(
    "text, match",
    [
        ("anlytic: {gamma: 1.0}\n", r"params\.yaml: unknown learner 'anlytic'; known: .*analytic"),
        ("analytic: {gama: 1.0}\n", r"params\.yaml: unknown option\(s\) 'gama' for learner 'analytic'; valid"),
        ("analytic: {gamma: -1.0}\n", r"params\.yaml: invalid options .*gamma must be > 0"),
        ("analytic: 3\n", r"params\.yaml: options of learner 'analytic' must be a mapping"),
        ("- analytic\n", r"params\.yaml: expected a mapping of learner name"),
        ("analytic: {gamma: [1\n", r"params\.yaml: not valid YAML"),
    ],
)
def test_bad_params_files_give_clear_errors(tmp_path, capsys, text, match):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_params(path)
    assert main(["compare", "--params", str(path), "--no-progress"]) == 2
    assert str(path) in capsys.readouterr().err


def test_missing_params_and_bad_grid_files(tmp_path, capsys):
    assert main(["run", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: learner params file not found" in capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text("ranpac:\n  - {ridge_min_log10: [2], ridge_max_log10: [2]}\n  - {lambda: [1]}\n")
    with pytest.raises(ValueError, match=r"grid\.yaml: unknown option\(s\) 'lambda' for learner 'ranpac'"):
        load_grid(grid)
    grid.write_text("lda: {shrinkage: [0.1, 0.5]}\nteen: {alpha: 0.5}\n")
    assert load_grid(grid) == {"lda": {"shrinkage": [0.1, 0.5]}, "teen": {"alpha": 0.5}}
    assert main(["tune", "--grid", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: search grid file not found" in capsys.readouterr().err


def test_tune_cli_end_to_end_on_a_tiny_rendered_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EARMARK_DATA", str(tmp_path / "data"))
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "initial": 4, "increment": 2, "shots": 3, "encoder": {"embed_dim": 32, "depth": 2}, "clip_seconds": 1.0,
        "render": {"n_classes": 8, "clips_per_class": 10, "clip_seconds": 1.0},
        "train": {"epochs": 1, "batch_size": 8},
    }))
    grid = tmp_path / "grid.yaml"
    grid.write_text("ncm: {}\nanalytic: {gamma: [1.0, 100.0], buffer_size: [64]}\n")
    out = tmp_path / "tuned"
    args = ["tune", "--config", str(run_yaml), "--grid", str(grid), "--learners", "ncm,analytic",
            "--trials", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "Grid search" in capsys.readouterr().out
    params = load_params(out / "params.yaml")
    assert set(params) == {"ncm", "analytic"} and params["analytic"]["buffer_size"] == 64
    assert params["analytic"]["gamma"] in (1.0, 100.0)
    saved = json.loads((out / "tune.json").read_text())
    assert len(saved["learners"]["analytic"]["points"]) == 2 and saved["trials"] == 1
