"""The model's command line: train / learn / predict / forget / info, with bad input and a byte-identical model."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest

from earmark.cli import main
from earmark.model import Model
from tests.audio_fixtures import FREQS, write_class


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = root / "base"
    for name in ("low", "mid", "high"):
        write_class(base, name, FREQS[name], 6)
    new = write_class(root / "new", "whistle", FREQS["whistle"], 8, seed=3)
    model = root / "model"
    assert main(["train", "--folder", str(base), "-o", str(model), "--epochs", "4", "--clip-seconds", "1",
                 "--learner", "ncm", "--no-progress"]) == 0
    return root, model, new


def test_train_refuses_an_existing_directory(setup, capsys):
    root, model, _ = setup
    assert main(["train", "--folder", str(root / "base"), "-o", str(model)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_learn_predict_forget_info_round(setup, capsys, tmp_path):
    root, model, new = setup
    work = tmp_path / "m"
    Model.load(model).save(work)
    capsys.readouterr()
    assert main(["learn", str(work), "--label", "whistle", *map(str, new[:5])]) == 0
    assert "new: whistle" in capsys.readouterr().out
    assert main(["predict", str(work), *map(str, new[5:]), "--format", "json", "--top-k", "2"]) == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["top"][0]["label"] for p in preds] == ["whistle"] * 3 and len(preds[0]["top"]) == 2
    assert main(["predict", str(work), str(new[5]), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["label"] == "whistle" and 0 < float(rows[0]["probability"]) <= 1
    assert main(["info", str(work), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"]["whistle"] == 5 and info["learner"]["name"] == "ncm" and info["generation"] == 2
    assert main(["forget", str(work), "--files", str(new[0]), str(new[1])]) == 0
    assert "forgot 2 clip(s) exactly" in capsys.readouterr().out
    assert main(["forget", str(work), "--label", "whistle"]) == 0
    assert "label(s) removed: whistle" in capsys.readouterr().out
    assert main(["info", str(work)]) == 0
    out = capsys.readouterr().out
    assert "3 labels" in out and "whistle" not in out and "forget: exact" in out


def test_a_failed_learn_or_forget_leaves_the_model_byte_identical(setup, capsys, tmp_path):
    root, model, new = setup
    work = tmp_path / "m"
    Model.load(model).save(work)
    before = tree(work)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    capsys.readouterr()
    assert main(["learn", str(work), "--label", "whistle", str(new[0]), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err and "cannot be decoded" in err
    assert main(["learn", str(work), "--label", "whistle"]) == 2  # no files
    assert main(["forget", str(work), "--files", str(new[7])]) == 2  # never learned
    assert "never learned" in capsys.readouterr().err
    assert main(["forget", str(work), "--label", "nope"]) == 2
    assert "unknown label 'nope'" in capsys.readouterr().err
    assert tree(work) == before


def test_predict_skip_runs_every_good_file_and_lists_the_bad_ones(setup, capsys, tmp_path):
    root, model, new = setup
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.wav"
    files = [str(new[0]), str(empty), str(new[1]), str(missing), str(new[2])]
    assert main(["predict", str(model), *files]) == 2
    err = capsys.readouterr().err
    assert "empty.wav" in err and err.startswith("earmark: error:")
    assert main(["predict", str(model), *files, "--on-error", "skip"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 3
    assert "skipped " + str(empty) in captured.err and "skipped " + str(missing) in captured.err


def test_bad_model_directories_are_refused_clearly(setup, capsys, tmp_path):
    root, model, new = setup
    assert main(["predict", str(tmp_path / "absent"), str(new[0])]) == 2
    assert "does not exist" in capsys.readouterr().err
    not_model = tmp_path / "folder"
    not_model.mkdir()
    assert main(["info", str(not_model)]) == 2
    assert "no model.json" in capsys.readouterr().err


def test_export_writes_an_onnx_file_that_matches_pytorch(setup, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    _, model, _ = setup
    out = tmp_path / "model.onnx"
    assert main(["export", str(model), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 0 and "matches PyTorch within" in text
    diff = float(text.split("within ")[1].split(";")[0])
    assert diff <= 1e-4
    assert sorted(json.loads(Path(str(out) + ".labels.json").read_text())) == ["high", "low", "mid"]
