"""End to end on a tiny rendered dataset: the same code path as `earmark demo`, scaled down."""

import json

import numpy as np
import pytest
import torch

from earmark.cli import main
from earmark.data import RenderConfig
from earmark.experiments import RunConfig, run
from earmark.training.supervised import TrainConfig


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("EARMARK_DATA", str(tmp_path / "data"))
    return RunConfig(
        out=str(tmp_path / "out"),
        initial=4,
        increment=2,
        shots=3,
        encoder={"embed_dim": 32, "depth": 2},
        clip_seconds=1.0,
        learners=["ncm", "analytic"],
        learner_params={"analytic": {"buffer_size": 256}},
        progress=False,
        render=RenderConfig(n_classes=8, clips_per_class=10, clip_seconds=1.0),
        train=TrainConfig(epochs=2, batch_size=8),
    )


def test_demo_pipeline_end_to_end(tiny_run, capsys):
    results = run(tiny_run)
    out = capsys.readouterr().out
    assert "Accuracy (%) on all classes seen so far" in out and "forgetting" in out
    saved = json.loads((tmp := __import__("pathlib").Path(tiny_run.out)).joinpath("results.json").read_text())
    assert (tmp / "accuracy.png").stat().st_size > 1000
    assert (tmp / "embedder.safetensors").is_file() and (tmp / "model" / "model.json").is_file()
    assert saved["model"] == str(tmp / "model")
    assert set(saved["learners"]) == {"ncm", "analytic", "joint-ridge"}
    assert len(saved["scenario"]["session_classes"]) == 3
    assert saved["scenario"]["session_classes"][0] == [0, 1, 2, 3]
    for name, entry in saved["learners"].items():
        m = np.array([[np.nan if v is None else v for v in row] for row in entry["matrix"]])
        assert m.shape == (3, 3) and np.isnan(m[0, 1])
        assert 0 <= entry["metrics"]["last_accuracy"] <= 1, name
    # analytic learning solves the joint ridge problem exactly: same predictions, same accuracy
    assert saved["learners"]["analytic"]["seen_accuracy"] == pytest.approx(
        saved["learners"]["joint-ridge"]["seen_accuracy"], abs=1e-9
    )
    assert results["embeddings"]["computed"] == results["embeddings"]["clips"]


def test_second_run_reuses_encoder_and_embeddings(tiny_run):
    first = run(tiny_run)
    second = run(tiny_run)
    assert second["encoder"]["training"]["reused"] is True
    assert second["embeddings"]["computed"] == 0
    assert second["encoder"]["digest"] == first["encoder"]["digest"]
    assert second["learners"]["ncm"]["seen_accuracy"] == first["learners"]["ncm"]["seen_accuracy"]


def test_cli_reports_bad_dataset_clearly(tmp_path, capsys):
    code = main(["demo", "--root", str(tmp_path / "missing"), "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "esc50.csv: metadata file not found" in capsys.readouterr().err


def test_yaml_config_and_flag_override(tmp_path):
    from earmark.cli import _run_config, build_parser

    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: urbansound8k\nroot: /data/us8k\ninitial: 4\nincrement: 2\ntrain:\n  epochs: 3\n")
    args = build_parser().parse_args(["run", "--config", str(cfg), "--initial", "6", "--learner", "analytic"])
    config = _run_config(args)
    assert config.dataset == "urbansound8k" and config.root == "/data/us8k"
    assert config.initial == 6  # the flag wins over the file
    assert config.increment == 2 and config.train.epochs == 3
    assert config.learners == ["analytic"]
    cfg.write_text("initail: 3\n")
    with pytest.raises(ValueError, match="unknown run option.*initail"):
        _run_config(build_parser().parse_args(["run", "--config", str(cfg)]))


def test_compare_trials_share_one_encoder_and_match_run(tiny_run):
    from earmark.experiments.compare import compare

    single = run(tiny_run)
    tiny_run.learners = ["ncm", "analytic", "lda"]
    results = compare(tiny_run, trials=2)
    out = __import__("pathlib").Path(tiny_run.out)
    assert (out / "compare.csv").read_text().startswith("learner,AA,last")
    assert (out / "compare.png").stat().st_size > 1000
    ncm = results["learners"]["ncm"]
    assert len(ncm["trials"]) == 2
    # trial 0 is the scenario `run` evaluates: identical numbers
    assert ncm["trials"][0]["seen_accuracy"] == pytest.approx(single["learners"]["ncm"]["seen_accuracy"])
    aa = [t["metrics"]["average_incremental_accuracy"] for t in ncm["trials"]]
    assert ncm["mean"]["average_incremental_accuracy"][0] == pytest.approx(np.mean(aa))
    assert ncm["mean"]["average_incremental_accuracy"][1] == pytest.approx(np.std(aa))
    assert results["encoder"]["training"]["reused"] is True  # one encoder for every trial and learner


def test_compare_runs_backbone_learners_under_one_memory_budget(tiny_run):
    from earmark.experiments.compare import compare
    from earmark.learners.exemplars import ExemplarMemory

    tiny_run.learners = ["ncm", "finetune", "replay"]
    tiny_run.learner_params = {"finetune": {"epochs": 1, "head_epochs": 5},
                               "replay": {"epochs": 1, "head_epochs": 5}}
    first = run(tiny_run)  # the encoder and its size
    encoder_and_ncm = first["learners"]["ncm"]["nbytes"]
    per_clip = ExemplarMemory.bytes_per_item((128, 98))  # 1 s clips: 128 mels x 98 frames (25 ms, 10 ms hop)
    tiny_run.memory_budget = budget = encoder_and_ncm + 20 * per_clip
    results = compare(tiny_run, trials=1)
    entry = {name: results["learners"][name] for name in tiny_run.learners}
    for name, e in entry.items():
        assert 0 <= e["mean"]["last_accuracy"][0] <= 1, name
    # replay filled what its encoder copy left with exemplars (2 per class for 8 classes), within budget
    assert entry["replay"]["nbytes"] - entry["finetune"]["nbytes"] == 16 * per_clip
    assert entry["replay"]["nbytes"] <= budget
    assert entry["finetune"]["nbytes"] < entry["replay"]["nbytes"]
    assert "over budget" not in (__import__("pathlib").Path(tiny_run.out) / "compare.csv").read_text().split("\n")[1]


def test_blurry_online_run_from_the_cli(tiny_run, tmp_path):
    from earmark.cli import _run_config, build_parser

    args = build_parser().parse_args([
        "compare", "--scenario", "blurry", "--sessions", "3", "--blurry-fraction", "0.3", "--online-batch", "4",
        "--memory-budget", "2MB", "--learners", "ncm,analytic",
    ])
    config = _run_config(args)
    assert config.scenario == "blurry" and config.scenario_params == {"num_sessions": 3, "blurry_fraction": 0.3}
    assert config.online_batch == 4 and config.memory_budget == 2_000_000
    for key in ("scenario", "scenario_params", "online_batch"):
        setattr(tiny_run, key, getattr(config, key))
    results = run(tiny_run)
    assert len(results["scenario"]["session_classes"]) == 3
    assert "joint-ridge" not in results["learners"]  # no batch bound for a single-pass stream
    for name in ("ncm", "analytic"):
        entry = results["learners"][name]
        assert 0 <= entry["prequential_accuracy"] <= 1
        assert len(entry["curve"]) > 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--memory-budget", "lots"])


def test_class_order_subset_restricts_the_run(tiny_run):
    from earmark.cli import _run_config, build_parser

    config = _run_config(build_parser().parse_args(["run", "--class-order", "7,2-4,0"]))
    assert config.class_order == [7, 2, 3, 4, 0]
    tiny_run.class_order = [7, 2, 3, 4, 0, 5]
    results = run(tiny_run)
    assert results["scenario"]["class_order"] == [7, 2, 3, 4, 0, 5]
    assert sum(len(c) for c in results["scenario"]["session_classes"]) == 6
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--class-order", "a-b"])


def test_run_writes_a_model_that_predicts_windows_of_a_recording(tiny_run, tmp_path, capsys):
    import soundfile as sf

    from earmark.model import Model

    results = run(tiny_run)
    model = Model.load(results["model"])
    assert set(model.labels) == set(results["scenario"]["label_map"])
    assert model.learner.name == "analytic" and len(model.journal) == sum(model.counts().values())
    # a recording made of two clips of the dataset, back to back
    from earmark.data import load_dataset

    ds = load_dataset("esc50", results["dataset"]["root"])
    a, b = (sf.read(ds.paths[i], dtype="float32")[0] for i in (0, len(ds) - 1))
    rec = tmp_path / "recording with spaces.wav"
    sf.write(rec, np.concatenate([a, b]), 16000)
    rows = model.predict([rec], top_k=1, window=1.0, hop=0.5)
    assert [p.start for p in rows] == [0.0, 0.5, 1.0]
    assert all(p.label in model.labels and 0 < p.top[0][1] <= 1 for p in rows)
    capsys.readouterr()
    assert main(["predict", results["model"], str(rec), "--window", "1s", "--hop", "0.5s"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[1:3] == ["0.00s", rows[0].label]


def test_bad_file_fails_clearly_then_skip_reports_it(tiny_run, tmp_path):
    import shutil

    from earmark.data.render import default_dataset_root, render_default_dataset

    src = render_default_dataset(default_dataset_root(tiny_run.render), tiny_run.render, progress=False)
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    bad = sorted((root / "audio").glob("5-*.wav"))[0]  # a test-fold clip
    bad.write_bytes(b"\x00" * 10)
    tiny_run.root = str(root)
    with pytest.raises(Exception, match=bad.name):
        run(tiny_run)
    tiny_run.on_error = "skip"
    results = run(tiny_run)
    assert [s["path"] for s in results["embeddings"]["skipped"]] == [str(bad)]
    report = (__import__("pathlib").Path(tiny_run.out) / "skipped.csv").read_text().splitlines()
    assert report[0] == "path,reason" and bad.name in report[1]
    assert results["embeddings"]["computed"] < results["embeddings"]["clips"]  # the failed run's work was kept


def test_compare_defaults_yield_to_the_yaml_file(tmp_path):
    from earmark.cli import COMPARE_DEFAULTS, _run_config, build_parser

    plain = _run_config(build_parser().parse_args(["compare"]), COMPARE_DEFAULTS)
    assert plain.learners == COMPARE_DEFAULTS["learners"] and plain.out == "runs/compare"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learners: [ncm, lda]\n")
    from_file = _run_config(build_parser().parse_args(["compare", "--config", str(cfg)]), COMPARE_DEFAULTS)
    assert from_file.learners == ["ncm", "lda"]


def test_pretrain_cli_then_base_training_starts_from_it(tiny_run, tmp_path):
    from earmark.data.render import default_dataset_root, render_default_dataset
    from earmark.training.pretrain import encoder_from_checkpoint

    src = render_default_dataset(default_dataset_root(tiny_run.render), tiny_run.render, progress=False)
    ckpt = tmp_path / "pre.safetensors"
    args = ["pretrain", "--audio", str(src / "audio"), "--encoder", "fast", "--clip-seconds", "1.0",
            "--steps", "3", "--batch-size", "8", "--out", str(ckpt)]
    assert main(args) == 0 and ckpt.is_file()
    pre = encoder_from_checkpoint(ckpt)
    tiny_run.encoder = "fast"
    tiny_run.pretrained = str(ckpt)
    tiny_run.train = type(tiny_run.train)(epochs=0, batch_size=8)  # no base training: the encoder is the pretrained one
    results = run(tiny_run)
    assert results["encoder"]["config"] == pre.config.to_dict()
    from earmark.encoders.embedder import AudioEmbedder

    trained = AudioEmbedder.load(results["encoder"]["checkpoint"])
    for name, value in pre.state_dict().items():
        assert __import__("torch").equal(trained.encoder.state_dict()[name], value), name
    assert main(["pretrain", "--audio", str(tmp_path / "nothing"), "--out", str(ckpt)]) == 2


def test_the_run_seed_drives_base_training_in_the_library_too(tiny_run, tmp_path):
    """run(RunConfig(seed=1)) trains the encoder with seed 1, as the CLI does (no copying into train.seed)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    a = run(tiny_run)
    b = run(replace(tiny_run, seed=1, out=str(tmp_path / "seed1"), class_order=a["scenario"]["class_order"]))
    assert a["encoder"]["training"]["reused"] is False and b["encoder"]["training"]["reused"] is False
    wa, wb = (load_file(r["encoder"]["training"]["checkpoint"]) for r in (a, b))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    c = run(replace(tiny_run, seed=1, out=str(tmp_path / "again"), class_order=a["scenario"]["class_order"]))
    assert c["encoder"]["training"]["checkpoint"] == b["encoder"]["training"]["checkpoint"]
