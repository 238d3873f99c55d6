"""Frozen (read-only) copies: what a service's readers hold while the writer keeps changing the model."""

from __future__ import annotations

import pytest
import torch

from earmark.learners import LEARNERS, make_learner
from earmark.model import ModelError
from tests import test_model as tm
from tests.learner_data import blobs
from tests.test_model import fresh, scores64

clips, embedder = tm.clips, tm.embedder  # the module-scoped fixtures of the model tests

SMALL = {"analytic": {"buffer_size": 64}, "ranpac": {"projection_size": 64}}
HEADS = ["ncm", "lda", "analytic", "ranpac", "fetril", "teen"]


def fitted(name: str):
    X, y, _ = blobs([0, 1, 2], 20, d=8, seed=1)
    return make_learner(name, **SMALL.get(name, {})).partial_fit(X, y), X


@pytest.mark.parametrize("name", HEADS)
def test_a_frozen_learner_scores_like_its_source_and_refuses_to_change(name):
    learner, X = fitted(name)
    frozen = learner.frozen()
    assert torch.equal(frozen.decision_function(X), learner.decision_function(X))
    assert torch.equal(frozen.predict_proba(X), learner.predict_proba(X))
    assert torch.equal(frozen.classes_, learner.classes_)
    with pytest.raises(RuntimeError, match="frozen"):
        frozen.partial_fit(X[:2], torch.tensor([5, 5]))
    if learner.can_forget:
        with pytest.raises(RuntimeError, match="frozen"):
            frozen.forget_class(0)
    # the source keeps learning; the frozen copy does not move
    before = frozen.decision_function(X)
    learner.partial_fit(X[:4] + 1.0, torch.tensor([3, 3, 3, 3]))
    assert torch.equal(frozen.decision_function(X), before) and frozen.n_classes_ == 3


@pytest.mark.parametrize("name", ["analytic", "ranpac", "lda"])
def test_a_frozen_learner_leaves_its_statistics_behind(name):
    learner, X = fitted(name)
    frozen = learner.frozen()
    assert learner.learning_only and frozen.nbytes() < learner.nbytes()
    for part in learner.learning_only:
        with pytest.raises(RuntimeError, match="not kept in a frozen"):
            getattr(getattr(frozen, part), "gram" if name != "lda" else "rows")


def test_every_registered_embedding_learner_can_be_frozen():
    for name in LEARNERS.names():
        cls = LEARNERS.get(name)
        if cls.needs_encoder():
            continue
        assert callable(cls.frozen)
        for part in cls.learning_only:
            assert isinstance(part, str)


def test_a_frozen_model_predicts_like_the_model_and_refuses_every_change(embedder, clips, tmp_path):
    model = fresh(embedder)
    model.learn(clips["low"][:5] + clips["mid"][:5], ["low"] * 5 + ["mid"] * 5)
    model.save(tmp_path / "m")
    frozen = model.frozen()
    probe = clips["low"][5:7] + clips["mid"][5:7]
    assert torch.equal(scores64(frozen, probe), scores64(model, probe))
    assert [p.top for p in frozen.predict(probe)] == [p.top for p in model.predict(probe)]
    assert frozen.info()["labels"] == model.info()["labels"] == {"low": 5, "mid": 5}
    for change in (lambda: frozen.learn(clips["high"][:2], "high"), lambda: frozen.forget(label="low"),
                   frozen.save, frozen.log, lambda: frozen.merge(model)):
        with pytest.raises(ModelError, match="frozen"):
            change()
    model.learn(clips["high"][:3], "high")  # the writer goes on; the reader's copy stays as it was
    model.forget(label="low")
    assert sorted(frozen.labels) == ["low", "mid"] and frozen.counts() == {"low": 5, "mid": 5}
    assert [p.top for p in frozen.predict(probe)][0][0][0] == "low"
    assert frozen.learner.nbytes() < model.learner.nbytes() / 2  # weights, not the ridge statistics


def test_a_change_interrupted_half_way_marks_the_model_torn(embedder, clips, monkeypatch):
    model = fresh(embedder)
    model.learn(clips["low"][:3], "low")
    assert not model.torn

    def broken(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(model.calibration, "update", broken)  # fails after the learner has learned
    with pytest.raises(RuntimeError):
        model.learn(clips["mid"][:3], "mid")
    assert model.torn
