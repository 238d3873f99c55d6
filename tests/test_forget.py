"""Exact unlearning: forgetting a class or some samples gives the learner trained without them."""

from __future__ import annotations

import pytest
import torch

from earmark.learners import make_learner
from earmark.learners.base import ForgetUnsupportedError
from tests.learner_data import blobs, rel_err

FORGETTABLE = {
    "ncm": {},
    "teen": {},
    "lda": {"shrinkage": 0.1},
    "analytic": {"buffer_size": 64, "gamma": 1.0},
    "ranpac": {"projection_size": 64, "ridge_min_log10": 0, "ridge_max_log10": 0},  # a pinned lambda
}


def sessions(seed: int = 0):
    """Three sessions, class 2 recurring, samples in float64 so exactness is checkable to 1e-9."""
    X, y, centres = blobs([0, 1, 2, 3, 4, 5], 12, d=10, seed=seed)
    X = X.double()
    twos = torch.nonzero(y == 2).flatten()
    first_half = torch.zeros_like(y, dtype=torch.bool)
    first_half[twos[: len(twos) // 2]] = True
    parts = [
        torch.isin(y, torch.tensor([0, 1])) | first_half,
        ((y == 2) & ~first_half) | (y == 3),
        torch.isin(y, torch.tensor([4, 5])),
    ]
    return X, y, [(X[m], y[m]) for m in parts]


def scores(learner, X):
    """float64 scores with columns sorted by label (first-appearance order may differ after a removal)."""
    order = torch.argsort(learner.classes_)
    return learner._checked_scores(X)[:, order]


def same_classes(a, b) -> bool:
    ka, kb = torch.argsort(a.classes_), torch.argsort(b.classes_)
    return torch.equal(a.classes_[ka], b.classes_[kb]) and torch.equal(a.class_counts[ka], b.class_counts[kb])


def fit(name, batches):
    learner = make_learner(name, **FORGETTABLE[name])
    for Xb, yb in batches:
        learner.partial_fit(Xb, yb)
    return learner


@pytest.mark.parametrize("name", sorted(FORGETTABLE))
def test_forget_class_equals_retraining_without_it(name):
    X, y, batches = sessions()
    learner = fit(name, batches).forget_class(2)
    without = fit(name, [(Xb[yb != 2], yb[yb != 2]) for Xb, yb in batches])
    assert sorted(learner.classes_.tolist()) == [0, 1, 3, 4, 5] and same_classes(learner, without)
    assert rel_err(scores(learner, X), scores(without, X)) < 1e-9


@pytest.mark.parametrize("name", sorted(FORGETTABLE))
def test_forget_samples_equals_retraining_without_them(name):
    X, y, batches = sessions(seed=1)
    learner = fit(name, batches)
    drop = [b[0][:3] for b in batches], [b[1][:3] for b in batches]  # 3 samples of each session
    learner.forget_samples(torch.cat(drop[0]), torch.cat(drop[1]))
    without = fit(name, [(Xb[3:], yb[3:]) for Xb, yb in batches])
    assert same_classes(learner, without)
    assert rel_err(scores(learner, X), scores(without, X)) < 1e-9


@pytest.mark.parametrize("name", sorted(FORGETTABLE))
def test_forget_samples_then_the_class_is_still_exact(name):
    """The per-class factors are downdated too: forgetting the rest of the class afterwards is exact."""
    X, y, batches = sessions(seed=2)
    learner = fit(name, batches)
    ones = torch.nonzero(batches[0][1] == 1).flatten()[:4]
    learner.forget_samples(batches[0][0][ones], batches[0][1][ones]).forget_class(1)
    without = fit(name, [(Xb[yb != 1], yb[yb != 1]) for Xb, yb in batches])
    assert rel_err(scores(learner, X), scores(without, X)) < 1e-9


@pytest.mark.parametrize("name", sorted(FORGETTABLE))
def test_forgetting_every_sample_of_a_class_removes_it_and_the_last_class_leaves_a_fresh_learner(name):
    X, y, _ = blobs([7, 8], 5, d=6, seed=3)
    learner = make_learner(name, **FORGETTABLE[name]).partial_fit(X, y)
    learner.forget_samples(X[y == 7], y[y == 7])
    assert learner.classes_.tolist() == [8]
    learner.forget_class(8)
    assert not learner.is_fitted and learner.n_features_in_ == 0
    learner.partial_fit(X, y)  # usable again, on any width
    assert learner.classes_.tolist() == [int(y[0]), int(y[y != y[0]][0])]


def test_forget_refuses_unknown_labels_and_too_many_samples():
    X, y, _ = blobs([0, 1], 4, seed=4)
    learner = make_learner("ncm").partial_fit(X, y)
    with pytest.raises(ValueError, match="never learned"):
        learner.forget_class(5)
    with pytest.raises(ValueError, match="only 4 were learned"):
        learner.forget_samples(torch.cat([X[y == 0]] * 2), torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("name", ["dsal", "fetril"])
def test_learners_that_cannot_forget_say_which_can(name):
    X, y, _ = blobs([0, 1], 12, seed=5)
    learner = make_learner(name).partial_fit(X, y)
    assert not learner.can_forget
    with pytest.raises(ForgetUnsupportedError, match="analytic.*lda.*ncm"):
        learner.forget_class(0)


def test_analytic_without_class_factors_forgets_samples_but_not_classes():
    X, y, batches = sessions(seed=6)
    learner = make_learner("analytic", buffer_size=32, class_factors=False)
    for Xb, yb in batches:
        learner.partial_fit(Xb, yb)
    with pytest.raises(ValueError, match="class_factors=False"):
        learner.forget_class(0)
    learner.forget_samples(X[:2], y[:2])  # still exact for samples
    assert int(learner.class_counts.sum()) == len(y) - 2


def test_class_factors_hold_at_most_min_n_d_rows_and_round_trip():
    X, y, batches = sessions(seed=7)
    learner = fit("analytic", batches)
    sizes = learner.stats.factors.sizes
    assert sizes.tolist() == [min(int(c), 64) for c in learner.class_counts]
    clone = make_learner("analytic", **FORGETTABLE["analytic"])
    clone.load_state_dict(learner.state_dict())
    clone.forget_class(3)
    learner.forget_class(3)
    # The clone solves afresh, the learner updates its cached factorization: equal up to rounding.
    assert rel_err(scores(clone, X), scores(learner, X)) < 1e-12
