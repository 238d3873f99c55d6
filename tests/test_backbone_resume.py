"""Backbone learners' sessions checkpoint and resume bit-identically (issue 20): in the learner, in the
session loop of the harness, after a SIGKILL in another process, and through `earmark run`."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import earmark.learners.backbone as backbone
from earmark.checkpoint import load_tensors
from earmark.data.dataset import AudioDataset
from earmark.experiments.evaluate import SESSIONS_CHECKPOINT, evaluate_learner
from earmark.learners import make_learner
from earmark.scenarios import ClassIncremental
from tests.test_backbone import TINY, spectra

REPO = Path(__file__).resolve().parents[1]
FAST = {"encoder": TINY.to_dict(), "epochs": 3, "base_epochs": 2, "head_epochs": 5, "batch_size": 16}
SMALL = {"replay": {"memory_clips": 12}, "icarl": {"memory_clips": 12}, "fsa": {"adapter": "film", "adapt_epochs": 3}}
SESSIONS = [([3, 7], 8, 0), ([11, 5], 8, 1), ([2], 8, 2)]  # (labels, clips per class, seed) of each session


class Stop(Exception):
    pass


def learner(name: str, **kw):
    torch.manual_seed(0)  # the encoder's initial weights
    return make_learner(name, **{**FAST, **SMALL.get(name, {}), **kw})


def session_data(k: int):
    labels, per_class, seed = SESSIONS[k]
    return spectra(labels, per_class, seed=seed)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saves(monkeypatch):
    """Records (session, epoch) of every training checkpoint written; ``saves.stop_at`` = (session, epoch)
    raises Stop right after that checkpoint is on disk (an interruption between epochs)."""
    real = backbone.save_training_checkpoint

    class Recorder(list):
        stop_at: tuple[int, int] | None = None

    rec = Recorder()

    def spy(path, model, opt, gen, epoch, step, history, fingerprint, **kw):
        real(path, model, opt, gen, epoch, step, history, fingerprint, **kw)
        rec.append((fingerprint["session"], epoch))
        if rec.stop_at == (fingerprint["session"], epoch):
            raise Stop

    monkeypatch.setattr(backbone, "save_training_checkpoint", spy)
    return rec


# ----------------------------------------------------------------------------- in the learner


@pytest.mark.parametrize("name", ["finetune", "replay", "lwf", "ewc", "icarl", "fsa"])
def test_interrupted_session_resumes_bit_identically(name, tmp_path, saves):
    ref = learner(name)
    for k in range(3):
        ref.partial_fit(*session_data(k))
    # FSA trains in its first session only (FiLM adapters: the trained parameters are not the encoder's).
    crash = 0 if name == "fsa" else 1
    a = learner(name)
    a.checkpoint_dir = tmp_path
    for k in range(crash):
        a.partial_fit(*session_data(k))
    before = {k: v.clone() for k, v in a.state_dict().items()}  # what the harness saves at a session end
    saves.stop_at = (crash, 2)
    with pytest.raises(Stop):
        a.partial_fit(*session_data(crash))
    _, meta, _ = load_tensors(tmp_path / "train.safetensors", kind=backbone.CHECKPOINT_KIND)
    assert (meta["fingerprint"]["session"], meta["epoch"]) == (crash, 2) and meta["step"] > 0

    b = learner(name)
    torch.manual_seed(123)  # the global RNG of a fresh process is restored from the checkpoint too
    b.load_state_dict(before)
    b.checkpoint_dir = tmp_path
    saves.clear()
    saves.stop_at = None
    for k in range(crash, 3):
        b.partial_fit(*session_data(k))
    epochs = 3  # FAST["epochs"], and FSA's adapt_epochs
    assert saves[0] == (crash, epochs)  # the interrupted session ran its last epoch only
    assert equal(b.state_dict(), ref.state_dict())


def test_a_checkpoint_of_another_session_or_config_is_not_resumed(tmp_path, saves):
    a = learner("replay")
    a.checkpoint_dir = tmp_path
    a.partial_fit(*session_data(0))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    saves.stop_at = (1, 2)
    with pytest.raises(Stop):
        a.partial_fit(*session_data(1))
    saves.stop_at = None

    def session1(resume: bool = True, **kw):
        saves.clear()
        b = learner("replay", **kw)
        b.load_state_dict(before)
        b.checkpoint_dir, b.resume = tmp_path, resume
        b.partial_fit(*session_data(1))
        return b, [e for _, e in saves]

    def uninterrupted(**kw):
        b = learner("replay", **kw)
        b.load_state_dict(before)
        return b.partial_fit(*session_data(1)).state_dict()

    # Another config (lr): trained from the start of the session, and the same as without checkpoints.
    b, epochs = session1(lr=2e-3)
    assert epochs == [1, 2, 3] and equal(b.state_dict(), uninterrupted(lr=2e-3))
    # Its own checkpoint (after the last epoch) is now there: the lr=1e-3 session does not take it either.
    b, epochs = session1()
    assert epochs == [1, 2, 3] and equal(b.state_dict(), uninterrupted())
    # Other data in the same session (same state, same config): not resumed.
    c = learner("replay")
    c.load_state_dict(before)
    c.checkpoint_dir = tmp_path
    saves.clear()
    c.partial_fit(*session_data(2))
    assert [e for _, e in saves] == [1, 2, 3]
    # The checkpoint interval says how, not what: a session interrupted at epoch 2 resumes with another one.
    saves.stop_at = (1, 2)
    with pytest.raises(Stop):
        session1()
    saves.stop_at = None
    b, epochs = session1(checkpoint_every=2)
    assert epochs == [3] and equal(b.state_dict(), uninterrupted())
    # That session's checkpoint after its last epoch is there now: taken as it is, or not with resume=False.
    assert session1()[1] == []
    b, epochs = session1(resume=False)
    assert epochs == [1, 2, 3] and equal(b.state_dict(), uninterrupted())


# ----------------------------------------------------------------------------- in the harness's session loop


def scenario_and_inputs(trial: int = 0):
    """A 3-session scenario over fake paths, with the spectrograms of the learner tests as inputs."""
    labels = [3, 7, 11, 5, 2]
    X, y = spectra(labels, 12, seed=4)
    folds = np.ones(len(y), dtype=np.int64)
    for c in labels:
        folds[np.flatnonzero(y.numpy() == c)[:4]] = 2  # 4 test clips per class
    ds = AudioDataset("synthetic", Path("/fake"), [Path(f"/fake/{i}.wav") for i in range(len(y))], y.numpy(),
                      [f"c{c}" for c in range(12)], folds)
    train, test = ds.split(2)
    scenario = ClassIncremental(ds, train, test, initial_increment=2, increment=[2, 1], class_order=labels,
                                shots=4, trial=trial)
    return scenario, X, {i: i for i in range(len(y))}


def test_harness_restores_finished_sessions_and_resumes_the_interrupted_one(tmp_path, saves):
    scenario, X, row_of = scenario_and_inputs()
    ref = learner("lwf")
    ref_matrix, _ = evaluate_learner(ref, scenario, X, row_of)

    saves.stop_at = (1, 2)
    with pytest.raises(Stop):
        evaluate_learner(learner("lwf"), scenario, X, row_of, checkpoint_dir=tmp_path)
    _, meta, _ = load_tensors(tmp_path / SESSIONS_CHECKPOINT, kind="learner-sessions")
    assert meta["sessions"] == 1 and len(meta["seconds"]) == 1
    saves.clear()
    saves.stop_at = None
    b = learner("lwf")
    matrix, seconds = evaluate_learner(b, scenario, X, row_of, checkpoint_dir=tmp_path)
    assert saves[0] == (1, 3)  # session 0 restored, session 1 continued at its last epoch
    assert seconds[0] == meta["seconds"][0] and len(seconds) == 3
    assert np.array_equal(matrix.correct, ref_matrix.correct) and np.array_equal(matrix.counts, ref_matrix.counts)
    assert equal(b.state_dict(), ref.state_dict())
    assert b.checkpoint_dir is None  # the harness's setting does not stay on the learner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sessions.json", "sessions.safetensors"]

    # Finished: a second pass restores everything and trains nothing.
    saves.clear()
    c = learner("lwf")
    again, _ = evaluate_learner(c, scenario, X, row_of, checkpoint_dir=tmp_path)
    assert saves == [] and np.array_equal(again.correct, ref_matrix.correct) and equal(c.state_dict(), ref.state_dict())
    # Another trial (other support sets) or another learner config does not take this file.
    for other, kw in ((scenario.with_trial(1), {}), (scenario, {"temperature": 3.0})):
        saves.clear()
        evaluate_learner(learner("lwf", **kw), other, X, row_of, checkpoint_dir=tmp_path)
        assert saves[0] == (0, 1)  # from the first epoch of the first session


# ----------------------------------------------------------------------------- SIGKILL in another process

# A replay learner through the 3-session scenario in a fresh process: argv = checkpoint folder ("-": none),
# result file, seconds to sleep after each training checkpoint (so the kill lands in the middle of a session).
JOB = r"""
import sys, time
import numpy as np
from safetensors.torch import save_file
import torch
import earmark.learners.backbone as backbone
from earmark.experiments.evaluate import evaluate_learner
from tests.test_backbone_resume import learner, scenario_and_inputs
folder, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
real = backbone.save_training_checkpoint
def slow(*a, **k):
    real(*a, **k)
    time.sleep(pause)
backbone.save_training_checkpoint = slow
scenario, X, row_of = scenario_and_inputs()
model = learner("replay")
matrix, _ = evaluate_learner(model, scenario, X, row_of, checkpoint_dir=None if folder == "-" else folder)
tensors = {"learner." + k: v.contiguous() for k, v in model.state_dict().items()}
tensors |= {"correct": torch.as_tensor(matrix.correct), "counts": torch.as_tensor(matrix.counts)}
save_file(tensors, out)
"""


def _job(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", JOB, *map(str, args)], cwd=REPO, env=env)


def test_sigkill_in_the_middle_of_a_session_then_resume_gives_the_uninterrupted_learner(tmp_path):
    folder = tmp_path / "ckpt"
    whole = _job("-", tmp_path / "whole.safetensors", 0)
    victim = _job(folder, tmp_path / "never.safetensors", 1.0)
    deadline = time.time() + 300

    def in_session_1() -> bool:  # session 0 finished and a training checkpoint of session 1 written
        try:
            return load_tensors(folder / "train.safetensors")[1]["fingerprint"]["session"] == 1
        except Exception:
            return False

    while not in_session_1():
        assert victim.poll() is None and time.time() < deadline, "the job ended before session 1 checkpointed"
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    _, meta, _ = load_tensors(folder / "train.safetensors")
    assert 1 <= meta["epoch"] < FAST["epochs"]  # killed in the middle of session 1
    assert load_tensors(folder / SESSIONS_CHECKPOINT)[1]["sessions"] == 1
    assert not (tmp_path / "never.safetensors").exists()
    resumed = _job(folder, tmp_path / "resumed.safetensors", 0)
    assert resumed.wait(timeout=300) == 0 and whole.wait(timeout=300) == 0
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert equal(a, b)
    assert json.loads((folder / "sessions.json").read_text())["sessions"] == 3
    assert not list(folder.glob(".*.tmp")) and not (folder / "train.safetensors").exists()


# ----------------------------------------------------------------------------- through `earmark run`


def test_run_resumes_a_backbone_learner_and_deletes_its_checkpoints_when_done(tmp_path, monkeypatch, saves):
    from earmark.data import RenderConfig
    from earmark.experiments import RunConfig, run
    from earmark.training.supervised import TrainConfig

    monkeypatch.setenv("EARMARK_DATA", str(tmp_path / "data"))
    cfg = RunConfig(out=str(tmp_path / "out"), initial=4, increment=2, shots=2, encoder={"embed_dim": 16, "depth": 1},
                    clip_seconds=0.5, learners=["finetune"], joint_bound=False, progress=False,
                    cache_dir=str(tmp_path / "cache"),
                    render=RenderConfig(n_classes=6, clips_per_class=5, clip_seconds=0.5),
                    train=TrainConfig(epochs=1, batch_size=4),
                    learner_params={"finetune": {"epochs": 3, "head_epochs": 5, "batch_size": 8}})
    encoders = tmp_path / "cache" / "encoders"
    saves.stop_at = (1, 2)
    with pytest.raises(Stop):
        run(cfg)
    assert not (tmp_path / "out").exists()  # the run folder is only put in place when the run is done
    (sessions,) = encoders.glob("*.sessions/*/finetune/sessions.safetensors")
    assert (sessions.parent / "train.safetensors").is_file()
    saves.clear()
    saves.stop_at = None
    resumed = run(cfg)
    assert saves == [(1, 3)]  # session 0 restored, session 1 continued after its second epoch
    assert not list(encoders.glob("*.sessions"))  # deleted with the finished run, as base training's partial is
    saves.clear()
    whole = run(dataclasses.replace(cfg, out=str(tmp_path / "whole")))
    assert saves == [(1, 1), (1, 2), (1, 3)]  # base_epochs=0: the encoder arrives trained on session 0
    a, b = resumed["learners"]["finetune"], whole["learners"]["finetune"]
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and len(a["fit_seconds"]) == 2
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())["learners"]["finetune"]
    assert on_disk["accuracy_matrix"] == b["accuracy_matrix"]
