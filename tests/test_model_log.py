"""The model's change log: cheap durable learns and forgets, replayed on load, folded in by save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from earmark.changelog import append_log, read_log
from earmark.model import Model, ModelError
from tests import test_model as tm
from tests.learner_data import rel_err
from tests.test_model import REPO, fresh, scores64, tree_digest

clips, embedder = tm.clips, tm.embedder  # the module-scoped fixtures of the model tests


def logs(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("changes-*.log"))


def same_model(a: Model, b: Model, paths) -> None:
    assert a.counts() == b.counts() and a.labels == b.labels
    assert [e["clip"] for e in a.journal] == [e["clip"] for e in b.journal]
    assert a.version == b.version
    assert rel_err(scores64(a, paths), scores64(b, paths)) < 1e-10
    ca, cb = a.calibration.calibration, b.calibration.calibration
    assert abs(ca.calibrator.temperature - cb.calibrator.temperature) < 1e-9
    ta, tb = ca.detector.threshold, cb.detector.threshold
    assert ta == tb or abs(ta - tb) < 1e-6


def test_logged_learns_and_forgets_replay_on_load_and_save_folds_them_in(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:4] + clips["mid"][:4], ["low"] * 4 + ["mid"] * 4)
    path = model.save(tmp_path / "m")
    blobs = {k: v for k, v in tree_digest(path).items() if k.startswith("blobs/")}
    model.learn(clips["high"][:3], "high")
    assert model.log() == 1
    model.learn(clips["whistle"][:3], "whistle")
    model.forget(files=clips["low"][:1])
    model.forget(label="mid")
    assert model.log() == 3 and model.log() == 0
    assert {k: v for k, v in tree_digest(path).items() if k.startswith("blobs/")} == blobs  # nothing rewritten
    assert logs(path) == ["changes-1.log"]
    loaded = Model.load(path)
    assert loaded.generation == 1 and loaded.logged == 4 and loaded.info()["log"]["changes"] == 4
    probe = clips["high"][3:5] + clips["low"][5:7]
    same_model(model, loaded, probe)
    assert sorted(loaded.labels) == ["high", "low", "whistle"]
    # forgetting a replayed clip still works: the journal came back with it
    loaded.forget(files=clips["high"][:1])
    loaded.save()
    assert logs(path) == [] and loaded.generation == 2 and loaded.logged == 0
    again = Model.load(path)
    same_model(loaded, again, probe)


def test_a_torn_last_record_is_dropped_and_cut_off_by_the_next_log(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:3] + clips["mid"][:3], ["low"] * 3 + ["mid"] * 3)
    path = model.save(tmp_path / "m")
    model.learn(clips["high"][:2], "high")
    model.log()
    whole = (path / "changes-1.log").stat().st_size
    model.learn(clips["whistle"][:2], "whistle")
    model.log()
    with open(path / "changes-1.log", "r+b") as f:  # a crash in the middle of the second append
        f.truncate((path / "changes-1.log").stat().st_size - 100)
    loaded = Model.load(path)
    assert "whistle" not in loaded.labels and "high" in loaded.labels
    assert read_log(path / "changes-1.log")[1] == whole
    loaded.learn(clips["whistle"][2:4], "whistle")
    loaded.log()
    again = Model.load(path)
    assert again.counts() == loaded.counts() and again.logged == 2


def test_log_refuses_without_a_save_after_a_merge_or_behind_another_writer(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:3], "low")
    with pytest.raises(ModelError, match="save it once"):
        model.log()
    path = model.save(tmp_path / "m")
    a, b = Model.load(path), Model.load(path)
    a.learn(clips["mid"][:2], "mid")
    a.log()
    b.learn(clips["high"][:2], "high")
    with pytest.raises(ModelError, match="another writer appended"):
        b.log()
    with pytest.raises(ModelError, match="another writer logged changes"):
        b.save()
    assert sorted(Model.load(path).labels) == ["low", "mid"]
    other = fresh(embedder)
    other.learn(clips["whistle"][:2], "whistle")
    a.merge(other)
    with pytest.raises(ModelError, match="only save"):
        a.log()
    a.save()
    assert sorted(Model.load(path).labels) == ["low", "mid", "whistle"]


def test_append_log_frames_round_trip_and_refuse_a_shorter_file(tmp_path):
    f = tmp_path / "x.log"
    end = append_log(f, [b"one", b"two"], 0)
    end = append_log(f, [b""], end)
    assert read_log(f) == ([b"one", b"two", b""], end)
    with pytest.raises(ValueError, match="shorter"):
        append_log(f, [b"x"], end + 5)


LOGGER = """
import sys
from pathlib import Path
from earmark.model import Model
path, files = Path(sys.argv[1]), sys.argv[2:]
model = Model.load(path)
for k, f in enumerate(files):
    model.learn([f], f"label{k}")
    model.log()
    print(f"label{k}", flush=True)
"""


def test_sigkill_during_logged_learns_keeps_every_acknowledged_one(embedder, clips, tmp_path):
    model = fresh(embedder, "analytic", gamma=1.0)
    model.learn(clips["low"][:2], "low")
    path = model.save(tmp_path / "m")
    files = [str(p) for n in ("mid", "high", "whistle") for p in clips[n]]
    rng = np.random.default_rng(1)
    acked: set[str] = set()  # file names of the clips whose learn was acknowledged
    for trial in range(3):
        chunk = files[trial * 8 : trial * 8 + 8]
        proc = subprocess.Popen([sys.executable, "-c", LOGGER, str(path), *chunk], stdout=subprocess.PIPE,
                                text=True, cwd=REPO)
        first = proc.stdout.readline().strip()
        assert first
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        printed = [first] + [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
        acked |= {Path(chunk[int(x.removeprefix("label"))]).name for x in printed}
        loaded = Model.load(path)
        assert acked <= {e["source"] for e in loaded.journal}  # every acknowledged clip survived
        assert loaded.learner.n_classes_ == len(loaded.labels)
        assert len(loaded.journal) == sum(loaded.counts().values())
    assert torch.isfinite(loaded.learner.weights).all()
