"""Merging statistics: learners fitted on shards and merged equal the learner fitted on everything."""

from __future__ import annotations

import pytest
import torch

from earmark.learners import make_learner
from earmark.learners.base import MergeUnsupportedError
from tests.learner_data import blobs, rel_err
from tests.test_forget import FORGETTABLE, same_classes, scores

MERGEABLE = {k: v for k, v in FORGETTABLE.items() if k != "teen"}


@pytest.mark.parametrize("name", sorted(MERGEABLE))
@pytest.mark.parametrize("shards", [2, 3])
def test_shards_merged_equal_one_fit(name, shards):
    X, y, _ = blobs([0, 1, 2, 3, 4, 5], 10, d=10, seed=11)
    X = X.double()
    whole = make_learner(name, **MERGEABLE[name]).partial_fit(X, y)
    parts = [make_learner(name, **MERGEABLE[name]).partial_fit(X[k::shards], y[k::shards]) for k in range(shards)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert same_classes(merged, whole)
    assert rel_err(scores(merged, X), scores(whole, X)) < 1e-9


@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_sites_with_disjoint_labels_merge_and_then_forget_exactly(name):
    X, y, _ = blobs([0, 1, 2, 3], 9, d=8, seed=12)
    X = X.double()
    a_rows, b_rows = y < 2, y >= 1  # label 1 at both sites (different clips of it: rows are split below)
    b_rows &= ~a_rows | (torch.arange(len(y)) % 2 == 0)
    a_rows &= ~b_rows
    site_a = make_learner(name, **MERGEABLE[name]).partial_fit(X[a_rows], y[a_rows])
    site_b = make_learner(name, **MERGEABLE[name]).partial_fit(X[b_rows], y[b_rows])
    merged = site_a.merge(site_b)
    both = a_rows | b_rows
    whole = make_learner(name, **MERGEABLE[name]).partial_fit(X[both], y[both])
    assert rel_err(scores(merged, X), scores(whole, X)) < 1e-9
    merged.forget_class(1)
    without = make_learner(name, **MERGEABLE[name]).partial_fit(X[both & (y != 1)], y[both & (y != 1)])
    assert rel_err(scores(merged, X), scores(without, X)) < 1e-9


def test_merging_into_an_empty_learner_copies_and_an_empty_one_changes_nothing():
    X, y, _ = blobs([0, 1], 5, seed=13)
    fitted = make_learner("ncm").partial_fit(X, y)
    empty = make_learner("ncm").merge(fitted)
    assert torch.equal(empty.decision_function(X), fitted.decision_function(X))
    before = fitted.decision_function(X)
    assert torch.equal(fitted.merge(make_learner("ncm")).decision_function(X), before)


@pytest.mark.parametrize("name", ["teen", "dsal", "fetril"])
def test_learners_that_cannot_merge_say_which_can(name):
    X, y, _ = blobs([0, 1], 12, seed=14)
    a, b = make_learner(name).partial_fit(X, y), make_learner(name).partial_fit(X, y)
    with pytest.raises(MergeUnsupportedError, match="learners that can: analytic, lda, ncm, ranpac"):
        a.merge(b)


def test_merge_refuses_other_settings_and_widths():
    X, y, _ = blobs([0, 1], 6, seed=15)
    a = make_learner("analytic", buffer_size=16).partial_fit(X, y)
    with pytest.raises(ValueError, match="settings"):
        a.merge(make_learner("analytic", buffer_size=32).partial_fit(X, y))
    with pytest.raises(ValueError, match="settings"):
        a.merge(make_learner("ncm").partial_fit(X, y))
    with pytest.raises(ValueError, match="features"):
        a.merge(make_learner("analytic", buffer_size=16).partial_fit(X[:, :4], y))


@pytest.mark.parametrize("name", ["analytic", "ranpac"])
def test_many_shards_merged_without_solving_then_solved_once_equal_one_fit(name):
    X, y, _ = blobs([0, 1, 2, 3], 12, d=10, seed=16)
    X = X.double()
    whole = make_learner(name, **MERGEABLE[name]).partial_fit(X, y)
    merged = make_learner(name, **MERGEABLE[name]).partial_fit(X[0::4], y[0::4])
    for k in (1, 2, 3):
        merged.merge(make_learner(name, **MERGEABLE[name]).partial_fit(X[k::4], y[k::4]), solve=k == 3)
    assert rel_err(scores(merged, X), scores(whole, X)) < 1e-9
