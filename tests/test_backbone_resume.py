"""Backbone learners' sessions checkpoint and resume bit-identically (issue 20)."""

from __future__ import annotations

import pytest
import torch

import earmark.learners.backbone as backbone
from earmark.checkpoint import load_tensors
from earmark.learners import make_learner
from tests.test_backbone import TINY, spectra

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
