"""The product Model: learn / predict / forget / save / load, exact unlearning, atomic saves and the lock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from earmark.audio import AudioConfig, AudioDecodeError
from earmark.encoders.config import resolve_config
from earmark.encoders.embedder import AudioEmbedder
from earmark.model import Model, ModelError, ModelLockedError, UnknownLabelError
from earmark.training.supervised import TrainConfig
from tests.audio_fixtures import FREQS, RATE, write_class

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("clips")
    return {name: write_class(root, name, freq, 8) for name, freq in FREQS.items()}


@pytest.fixture(scope="module")
def embedder() -> AudioEmbedder:
    torch.manual_seed(0)
    return AudioEmbedder(resolve_config("fast"), AudioConfig(clip_seconds=1.0))


@pytest.fixture(scope="module")
def trained(clips) -> Model:
    """Base training on three labels (a few epochs: enough for tones this distinct)."""
    paths = [p for n in ("low", "mid", "high") for p in clips[n][:6]]
    labels = [n for n in ("low", "mid", "high") for _ in range(6)]
    return Model.train(paths, labels, learner="ncm", clip_seconds=1.0, train=TrainConfig(epochs=4, batch_size=8),
                       progress=False)


def fresh(embedder, learner="analytic", **params) -> Model:
    params = params or ({"buffer_size": 128, "gamma": 1.0} if learner == "analytic" else {})
    return Model.from_embedder(embedder, learner, params)


def scores64(model: Model, paths) -> torch.Tensor:
    """float64 scores with columns sorted by label name, for exactness checks."""
    X = model.embed(model.decode(paths).waves)
    order = np.argsort(model.labels)
    return model.learner._checked_scores(X)[:, torch.as_tensor(order)]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_base_training_then_learning_a_new_sound_from_five_clips(trained, clips):
    model = trained.clone()
    assert model.labels == ["high", "low", "mid"] or sorted(model.labels) == ["high", "low", "mid"]
    report = model.learn(clips["whistle"][:5], "whistle")
    assert report["new"] == ["whistle"] and report["learned"] == 5
    preds = model.predict(clips["whistle"][5:], top_k=2)
    assert [p.label for p in preds] == ["whistle"] * 3
    assert all(0 < p.top[0][1] <= 1 and p.top[0][1] >= p.top[1][1] for p in preds)
    assert model.counts()["whistle"] == 5
    assert "whistle" not in trained.labels  # the clone is independent


def test_save_load_round_trip_gives_equal_predictions(embedder, clips, tmp_path):
    model = fresh(embedder)
    for name in ("low", "mid", "high"):
        model.learn(clips[name][:4], name)
    model.save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m")
    held_out = [clips[n][6] for n in ("low", "mid", "high")]
    assert [p.to_dict() for p in loaded.predict(held_out)] == [p.to_dict() for p in model.predict(held_out)]
    assert loaded.labels == model.labels and loaded.counts() == model.counts()
    assert loaded.journal == model.journal and loaded.generation == 1
    info = loaded.info()
    assert info["labels"] == {"low": 4, "mid": 4, "high": 4} and info["clips"] == 12
    assert info["learner"]["state_bytes"] > 128 * 128 * 8 and "exact" in info["forget"]
    manifest = json.loads((tmp_path / "m" / "model.json").read_text())
    assert manifest["format"] == 1 and set(manifest["files"]) == {"embedder", "learner", "journal", "calibration"}


@pytest.mark.parametrize("learner", ["ncm", "lda", "analytic"])
def test_forget_label_and_files_equal_retraining_without_them(embedder, clips, learner):
    params = {"lda": {"shrinkage": 0.5}}.get(learner, {})
    names = ("low", "mid", "high", "whistle")
    model = fresh(embedder, learner, **params)
    for name in names:
        model.learn(clips[name][:5], name)
    probe = [clips[n][7] for n in names]
    model.forget(label="mid")
    model.forget(files=clips["low"][:2])
    without = fresh(embedder, learner, **params)
    without.learn(clips["low"][2:5], "low")
    for name in ("high", "whistle"):
        without.learn(clips[name][:5], name)
    assert sorted(model.labels) == sorted(without.labels) and model.counts() == without.counts()
    a, b = scores64(model, probe), scores64(without, probe)
    assert float((a - b).norm() / b.norm()) < 1e-9
    assert {e["clip"] for e in model.journal} == {e["clip"] for e in without.journal}


def test_forget_refuses_what_it_cannot_do_exactly(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:3], "low")
    model.learn(clips["mid"][:3], "mid")
    with pytest.raises(ModelError, match="never learned"):
        model.forget(files=[clips["low"][5]])
    with pytest.raises(UnknownLabelError, match="unknown label 'nope'"):
        model.forget(label="nope")
    fetril = Model.from_embedder(embedder, "fetril")
    fetril.learn(clips["low"][:3], "low")
    with pytest.raises(ModelError, match="cannot forget exactly; learners that can: .*analytic"):
        fetril.forget(label="low")


def test_a_changed_embedding_is_refused_by_the_journal(embedder, clips):
    model = fresh(embedder)
    model.learn(clips["low"][:3], "low")
    model.learn(clips["mid"][:3], "mid")
    model.journal[0] = {**model.journal[0], "embedding": "0" * 32}
    with pytest.raises(ModelError, match="embedding now differs"):
        model.forget(files=clips["low"][:1])


def test_bad_input_is_refused_and_nothing_is_learned(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:3], "low")
    before = (model.counts(), list(model.journal))
    silent, empty, text = tmp_path / "silent.wav", tmp_path / "empty.wav", tmp_path / "notes.wav"
    sf.write(silent, np.zeros(RATE, dtype=np.float32), RATE)
    sf.write(empty, np.zeros(0, dtype=np.float32), RATE)
    text.write_text("not audio")
    for bad, reason in ((silent, "silence"), (empty, "no samples"), (text, "cannot be decoded")):
        with pytest.raises(AudioDecodeError, match=reason) as err:
            model.learn([clips["mid"][0], bad], "mid")
        assert str(bad) in str(err.value)
    with pytest.raises(ModelError, match="already learned as 'low'"):
        model.learn([clips["low"][0]], "mid")
    with pytest.raises(ModelError, match="reserved"):
        model.learn([clips["mid"][0]], "unknown")
    assert (model.counts(), model.journal) == before
    report = model.learn([clips["mid"][0], silent], "mid", on_error="skip")
    assert report["learned"] == 1 and report["skipped"][0]["reason"] == "contains only silence"
    with pytest.raises(ModelError, match="no valid clip for label"):
        model.learn([silent], "quiet", on_error="skip")


def test_loading_refuses_tampered_newer_and_missing_models(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:2], "low")
    path = model.save(tmp_path / "m")
    manifest = json.loads((path / "model.json").read_text())
    learner_file = path / manifest["files"]["learner"]["path"]
    data = bytearray(learner_file.read_bytes())
    data[-1] ^= 0xFF
    learner_file.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its sha256"):
        Model.load(path)
    model.save(tmp_path / "n")
    body = json.loads((tmp_path / "n" / "model.json").read_text())
    body["labels"] = {"0": "renamed"}
    (tmp_path / "n" / "model.json").write_text(json.dumps(body))
    with pytest.raises(ModelError, match="content hash does not match"):
        Model.load(tmp_path / "n")
    import earmark.model as m

    body = m._read_manifest(path)
    body["format"] = 99
    body["content_hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "model.json").write_text(json.dumps(body))
    with pytest.raises(ModelError, match="newer than this earmark"):
        Model.load(tmp_path / "newer")
    with pytest.raises(ModelError, match="does not exist"):
        Model.load(tmp_path / "absent")


def test_a_second_writer_is_refused_and_a_stale_copy_cannot_overwrite(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:2], "low")
    path = model.save(tmp_path / "m")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from earmark.model import Model
            with Model.lock({str(path)!r}):
                print("held", flush=True)
                time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ModelLockedError, match="another writer holds the model"):
            model.save()
    finally:
        holder.kill()
        holder.wait()
    a, b = Model.load(path), Model.load(path)
    a.learn(clips["mid"][:2], "mid")
    a.save()
    b.learn(clips["high"][:2], "high")
    with pytest.raises(ModelError, match="changed on disk since it was loaded"):
        b.save()
    assert sorted(Model.load(path).labels) == ["low", "mid"]


SAVER = """
import sys, torch
from pathlib import Path
from earmark.audio import AudioConfig
from earmark.encoders.config import resolve_config
from earmark.encoders.embedder import AudioEmbedder
from earmark.model import Model
path, files = Path(sys.argv[1]), sys.argv[2:]
model = Model.load(path)
for k, f in enumerate(files):
    model.learn([f], f"label{k}")
    model.save()
    print(len(model.journal), flush=True)
"""


def test_sigkill_during_saves_leaves_the_old_or_the_new_model(embedder, clips, tmp_path):
    """A subprocess learns and saves in a loop (a 2048-wide analytic head: each save writes ~70 MB); it is
    killed at several moments; every time the directory loads, and holds a state that was saved whole."""
    model = Model.from_embedder(embedder, "analytic", {"gamma": 1.0})
    model.learn(clips["low"][:2], "low")
    path = model.save(tmp_path / "m")
    files = [str(p) for n in ("mid", "high", "whistle") for p in clips[n]]
    rng = np.random.default_rng(0)
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), *files[trial * 8 : trial * 8 + 8]],
                                stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout.readline()  # at least one save went through, then kill at a random moment
        time.sleep(float(rng.uniform(0.0, 0.6)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        loaded = Model.load(path)
        assert len(loaded.journal) == sum(loaded.counts().values())
        assert all(n.startswith("label") or n == "low" for n in loaded.labels)
        assert loaded.learner.n_classes_ == len(loaded.labels)
    loaded.save()  # the next write clears what a killed one left
    leftovers = [p.name for p in path.rglob("*") if p.name.endswith(".tmp")]
    manifest = json.loads((path / "model.json").read_text())
    assert not leftovers
    assert sorted(p.name for p in (path / "blobs").iterdir()) == sorted(
        Path(f["path"]).name for f in manifest["files"].values())


@pytest.mark.parametrize("learner", ["ncm", "analytic"])
def test_merging_two_site_models_equals_one_model_trained_on_both(embedder, clips, tmp_path, learner):
    from earmark.cli import main

    site_a, site_b, both = (fresh(embedder, learner) for _ in range(3))
    site_a.learn(clips["low"][:4], "low")
    site_a.learn(clips["mid"][:3], "mid")
    site_b.learn(clips["mid"][3:6], "mid")
    site_b.learn(clips["whistle"][:4], "whistle")
    for name, files in (("low", clips["low"][:4]), ("mid", clips["mid"][:6]), ("whistle", clips["whistle"][:4])):
        both.learn(files, name)
    site_a.save(tmp_path / "a")
    site_b.save(tmp_path / "b")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c")]) == 0
    merged = Model.load(tmp_path / "c")
    probe = [clips[n][7] for n in ("low", "mid", "whistle")]
    assert merged.counts() == both.counts()
    a, b = scores64(merged, probe), scores64(both, probe)
    assert float((a - b).norm() / b.norm()) < 1e-9
    merged.forget(files=clips["mid"][3:6])  # the journals joined: site B's clips can be forgotten
    assert merged.counts()["mid"] == 3
    assert Model.load(tmp_path / "a").counts() == {"low": 4, "mid": 3}  # A is untouched


def test_merge_refuses_shared_clips_other_encoders_and_settings(embedder, clips):
    a, b = fresh(embedder), fresh(embedder)
    a.learn(clips["low"][:3], "low")
    b.learn(clips["low"][2:5], "low")
    with pytest.raises(ModelError, match="1 clip\\(s\\) were learned by both"):
        a.merge(b)
    torch.manual_seed(1)
    other = Model.from_embedder(AudioEmbedder(resolve_config("fast"), AudioConfig(clip_seconds=1.0)), "analytic",
                                {"buffer_size": 128, "gamma": 1.0})
    other.learn(clips["mid"][:2], "mid")
    with pytest.raises(ModelError, match="encoders differ"):
        a.merge(other)
    c = fresh(embedder, "analytic", buffer_size=64, gamma=1.0)
    c.learn(clips["mid"][:2], "mid")
    with pytest.raises(ModelError, match="learner settings differ"):
        a.merge(c)
    assert a.counts() == {"low": 3}
