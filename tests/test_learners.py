"""The incremental learner protocol, NCM and the analytic (recursive ridge) learner."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from earmark.learners import (
    LEARNERS,
    AnalyticLearner,
    IncrementalLearner,
    NCMLearner,
    NotFittedError,
    joint_ridge,
    make_learner,
)
from tests.learner_data import blobs, one_hot_in_order, rel_err

# Small configs keep the tests fast; the defaults are exercised separately.
SMALL = {"ncm": {}, "analytic": {"buffer_size": 64}, "ranpac": {"projection_size": 64}, "dsal": {"buffer_size": 64}}
# Learners on embeddings; the backbone-updating ones read log-mel and have their own tests (test_backbone.py).
NAMES = [n for n in LEARNERS.names() if LEARNERS.get(n).input_ndim == 2]


def small(name: str, **kw) -> IncrementalLearner:
    return make_learner(name, **{**SMALL.get(name, {}), **kw})


# ----------------------------------------------------------------------------- registry and configs


def test_registry_holds_both_learners_with_dataclass_configs():
    assert {"ncm", "analytic"} <= set(NAMES)
    assert LEARNERS.get("ncm") is NCMLearner and LEARNERS.get("analytic") is AnalyticLearner
    for name in NAMES:
        cls = LEARNERS.get(name)
        assert dataclasses.is_dataclass(cls.Config)
        cfg = cls.Config()
        again = cls.Config(**json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert again == cfg
        assert isinstance(make_learner(name), cls)


def test_make_learner_applies_overrides_and_rejects_unknown_keys():
    learner = make_learner("analytic", buffer_size=32, gamma=2.0)
    assert learner.config.buffer_size == 32 and learner.config.gamma == 2.0
    with pytest.raises(ValueError, match="bogus.*analytic.*buffer_size"):
        make_learner("analytic", bogus=1)
    with pytest.raises(KeyError, match="unknown learner 'nope'"):
        make_learner("nope")


@pytest.mark.parametrize(
    "name, bad",
    [
        ("ncm", {"temperature": 0}),
        ("analytic", {"gamma": 0}),
        ("analytic", {"buffer_size": -1}),
        ("analytic", {"block_size": 0}),
    ],
)
def test_invalid_config_values_raise(name, bad):
    with pytest.raises(ValueError):
        make_learner(name, **bad)


def test_learner_rejects_config_of_another_learner():
    with pytest.raises(TypeError, match="AnalyticConfig"):
        AnalyticLearner(NCMLearner.Config())


# ----------------------------------------------------------------------------- protocol, every learner


@pytest.mark.parametrize("name", NAMES)
def test_partial_fit_returns_self(name):
    learner = small(name)
    X, y, _ = blobs([0, 1], 5)
    assert learner.partial_fit(X, y) is learner


@pytest.mark.parametrize("name", NAMES)
def test_classes_grow_in_order_of_first_appearance(name):
    learner = small(name)
    X, _, _ = blobs([0], 6)
    learner.partial_fit(X[:4], [7, 3, 7, 100])
    assert learner.classes_.tolist() == [7, 3, 100]
    learner.partial_fit(X[:4], [3, 5, 7, 2])  # recurring 3 and 7; new 5 then 2
    assert learner.classes_.tolist() == [7, 3, 100, 5, 2]
    assert learner.classes_.dtype == torch.long
    assert learner.decision_function(X).shape == (6, 5)


@pytest.mark.parametrize("name", NAMES)
def test_predict_returns_labels_from_non_contiguous_classes(name):
    learner = small(name)
    labels = [7, 3, 100]
    X, y, _ = blobs(labels, 20, seed=1, spread=0.3)
    learner.partial_fit(X, y)
    pred = learner.predict(X)
    assert pred.dtype == torch.long and pred.shape == (len(X),)
    assert set(pred.tolist()) <= set(labels)
    assert (pred == y).float().mean() > 0.9


@pytest.mark.parametrize("name", NAMES)
def test_predict_proba_rows_sum_to_one_and_agree_with_predict(name):
    learner = small(name)
    X, y, _ = blobs([4, 9, 1, 6], 10, seed=2)
    learner.partial_fit(X[:20], y[:20]).partial_fit(X[20:], y[20:])
    proba = learner.predict_proba(X)
    scores = learner.decision_function(X)
    assert proba.shape == scores.shape == (len(X), learner.n_classes_)
    assert proba.dtype == scores.dtype == torch.float32
    assert torch.allclose(proba.sum(1), torch.ones(len(X)), atol=1e-5)
    assert (proba >= 0).all()
    assert torch.equal(learner.classes_[proba.argmax(1)], learner.predict(X))
    assert torch.equal(scores.argmax(1), proba.argmax(1))


@pytest.mark.parametrize("name", NAMES)
def test_accepts_numpy_lists_and_integral_float_labels(name):
    X, y, _ = blobs([2, 5], 6, seed=3)
    a = small(name).partial_fit(X, y)
    b = small(name).partial_fit(X.numpy(), y.numpy())
    c = small(name).partial_fit(X.double().tolist(), [float(v) for v in y.tolist()])
    for other in (b, c):
        assert torch.equal(other.classes_, a.classes_)
        assert torch.allclose(other.decision_function(X.numpy()), a.decision_function(X), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_a_no_op(name):
    learner = small(name)
    assert learner.partial_fit(torch.zeros(0, 8), []) is learner
    assert not learner.is_fitted and learner.n_classes_ == 0
    X, y, _ = blobs([0, 1], 4)
    learner.partial_fit(X, y)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.partial_fit(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_into_fresh_learner(name):
    X, y, _ = blobs([7, 3, 100, 12], 15, seed=4)
    X2, y2, _ = blobs([3, 42], 10, seed=5)  # recurring 3, new 42
    trained = small(name).partial_fit(X, y)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    fresh = small(name)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.classes_, trained.classes_)
    assert fresh.n_features_in_ == trained.n_features_in_ == 8
    assert torch.equal(fresh.predict(X), trained.predict(X))
    assert torch.equal(fresh.decision_function(X), trained.decision_function(X))
    # Training on after a save/load gives what uninterrupted training gives.
    trained.partial_fit(X2, y2)
    fresh.partial_fit(X2, y2)
    assert fresh.classes_.tolist() == trained.classes_.tolist() == list(dict.fromkeys(y.tolist())) + [42]
    a, b = trained.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point() and hasattr(trained, "stats"):
            # The ridge learners answer from a cached factorization that a load does not carry (it is not
            # state): the fresh learner solves afresh, so the two agree to rounding, not bit for bit.
            assert rel_err(a[k], b[k]) < 1e-11, k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_survives_safetensors_and_loads_over_a_fitted_learner(name):
    X, y, _ = blobs([1, 2], 10, seed=6)
    trained = small(name).partial_fit(X, y)
    blob = st_save({k: v.contiguous() for k, v in trained.state_dict().items()})
    other = small(name).partial_fit(*blobs([5, 6, 7, 8, 9], 4, seed=7)[:2])  # more classes: must shrink
    other.decision_function(X)  # fills any cache (e.g. LDA's solved weights) that loading must drop
    other.load_state_dict(st_load(blob))
    assert other.classes_.tolist() == trained.classes_.tolist()
    assert torch.equal(other.decision_function(X), trained.decision_function(X))
    # An unfitted state loads too and leaves an unfitted learner.
    other.load_state_dict(small(name).state_dict())
    assert not other.is_fitted
    with pytest.raises(NotFittedError):
        other.predict(X)


@pytest.mark.parametrize("name", NAMES)
def test_nested_learner_loads_through_its_parent(name):
    X, y, _ = blobs([1, 2, 3], 6, seed=8)
    parent = torch.nn.ModuleDict({"head": small(name).partial_fit(X, y)})
    fresh = torch.nn.ModuleDict({"head": small(name)})
    fresh.load_state_dict(parent.state_dict())
    assert torch.equal(fresh["head"].predict(X), parent["head"].predict(X))


@pytest.mark.parametrize("name", NAMES)
def test_inconsistent_state_is_rejected_on_load(name):
    X, y, _ = blobs([1, 2], 6, seed=9)
    state = small(name).partial_fit(X, y).state_dict()
    state["class_labels"] = torch.tensor([1, 2, 3])  # three labels, state for two classes
    with pytest.raises(ValueError, match="inconsistent|does not match"):
        small(name).load_state_dict(state)


def test_analytic_state_with_another_buffer_size_is_rejected():
    X, y, _ = blobs([1, 2], 6)
    state = make_learner("analytic", buffer_size=32).partial_fit(X, y).state_dict()
    with pytest.raises(ValueError, match="buffer_size=64"):
        make_learner("analytic", buffer_size=64).load_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_nbytes_counts_all_state_tensors_and_grows_with_classes(name):
    learner = small(name)

    def expected() -> int:
        return sum(v.numel() * v.element_size() for v in learner.state_dict().values())

    assert learner.nbytes() == expected()
    X, y, _ = blobs([0, 1], 5)
    learner.partial_fit(X, y)
    two = learner.nbytes()
    assert two == expected() > 0
    learner.partial_fit(X[:3], [5, 6, 7])
    assert learner.nbytes() == expected() > two
    learner.partial_fit(X[:3], [5, 6, 0])  # recurring classes only: no growth
    assert learner.nbytes() == expected()


@pytest.mark.parametrize("name", NAMES)
def test_not_fitted_errors(name):
    learner = small(name)
    X = torch.randn(3, 8)
    for method in (learner.predict, learner.predict_proba, learner.decision_function):
        with pytest.raises(NotFittedError, match="partial_fit"):
            method(X)


@pytest.mark.parametrize("name", NAMES)
def test_input_errors(name):
    learner = small(name)
    X, y, _ = blobs([0, 1], 4)
    with pytest.raises(ValueError, match="different lengths.*8.*7"):
        learner.partial_fit(X, y[:-1])
    with pytest.raises(ValueError, match="non-negative"):
        learner.partial_fit(X, torch.tensor([0, 1, -1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="integers"):
        learner.partial_fit(X, [0.5] * 8)
    with pytest.raises(ValueError, match="integers"):
        learner.partial_fit(X, ["dog"] * 8)
    with pytest.raises(ValueError, match="1-D"):
        learner.partial_fit(X, y[:, None])
    with pytest.raises(ValueError, match="2-D"):
        learner.partial_fit(X[0], y[:1])
    with pytest.raises(ValueError, match="NaN"):
        learner.partial_fit(torch.full((8, 8), float("nan")), y)
    assert not learner.is_fitted  # nothing above changed the learner
    learner.partial_fit(X, y)
    with pytest.raises(ValueError, match=r"5 features.*8 features"):
        learner.predict(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"12 features.*8 features"):
        learner.partial_fit(torch.randn(2, 12), [0, 1])
    assert learner.classes_.tolist() == [int(v) for v in dict.fromkeys(y.tolist())]


@pytest.mark.parametrize("name", NAMES)
def test_blobs_learned_incrementally_are_classified_accurately(name):
    labels = [10 * c + 3 for c in range(10)]
    X, y, centres = blobs(labels, 40, d=32, seed=11, spread=1.5)
    g = torch.Generator().manual_seed(12)
    Xt = torch.cat([centres[lab] + 1.5 * torch.randn(30, 32, generator=g) for lab in labels])
    yt = torch.tensor(labels).repeat_interleave(30)
    width = {"analytic": {"buffer_size": 512}, "dsal": {"buffer_size": 512}, "ranpac": {"projection_size": 256}}
    learner = make_learner(name, **width.get(name, {}))
    for session in range(5):  # two new classes per session
        mask = torch.isin(y, torch.tensor(labels[2 * session : 2 * session + 2]))
        learner.partial_fit(X[mask], y[mask])
    acc = (learner.predict(Xt) == yt).float().mean().item()
    assert acc > 0.95, acc


# ----------------------------------------------------------------------------- NCM


def test_ncm_means_equal_batch_means_across_splits_and_recurrence():
    X, y, _ = blobs([4, 2, 9], 30, seed=13)
    learner = NCMLearner()
    for chunk in torch.arange(len(y)).split(7):  # classes recur in every chunk
        learner.partial_fit(X[chunk], y[chunk])
    for row, lab in enumerate(learner.classes_):
        want = X[y == lab].double().mean(0)
        assert torch.allclose(learner.means_[row], want, rtol=0, atol=1e-12)
    assert learner.class_counts.tolist() == [30, 30, 30]


def test_ncm_uses_cosine_not_euclidean_distance():
    learner = NCMLearner(NCMLearner.Config(temperature=0.5))
    learner.partial_fit([[1.0, 0.0], [1.0, 0.0]], [1, 1])
    learner.partial_fit([[4.0, 6.0], [6.0, 4.0]], [2, 2])  # mean (5, 5)
    x = torch.tensor([[5.0, 1.0]])  # Euclidean-nearest to (5, 5); cosine-nearest to (1, 0)
    assert learner.predict(x).tolist() == [1]
    cos = torch.tensor([[5 / 26**0.5, 6 / (26**0.5 * 2**0.5)]])
    assert torch.allclose(learner.decision_function(x), cos.float(), atol=1e-6)
    assert torch.allclose(learner.predict_proba(x), torch.softmax(cos / 0.5, 1).float(), atol=1e-6)


# ----------------------------------------------------------------------------- analytic


def _random_stream(rng: np.random.Generator, d: int):
    """Batches with random sizes (1 included), random class subsets, recurring classes."""
    pool = rng.choice(200, size=int(rng.integers(2, 7)), replace=False)
    centres = {int(c): rng.normal(0, 2, d) for c in pool}
    for _ in range(int(rng.integers(3, 9))):
        subset = rng.choice(pool, size=int(rng.integers(1, len(pool) + 1)), replace=False)
        n = int(rng.choice([1, 1, 2, 5, 17, 40]))
        y = rng.choice(subset, size=n)
        X = np.stack([centres[int(c)] + rng.normal(0, 1, d) for c in y])
        yield torch.tensor(X, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("seed", range(10))
def test_analytic_incremental_equals_joint_ridge(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 12))
    cfg = {
        "buffer_size": int(rng.choice([0, 16, 48])),
        "gamma": float(rng.choice([0.01, 0.1, 1.0])),
        "block_size": int(rng.choice([1, 3, 1024])),
        "seed": seed,
    }
    learner = make_learner("analytic", **cfg)
    Xs, ys = [], []
    for X, y in _random_stream(rng, d):
        learner.partial_fit(X, y)
        Xs.append(X)
        ys.append(y)
        X_all, y_all = torch.cat(Xs), torch.cat(ys)
        assert learner.classes_.tolist() == list(dict.fromkeys(y_all.tolist()))
        W = joint_ridge(learner.expand(X_all), one_hot_in_order(y_all, learner.classes_), cfg["gamma"])
        assert learner.weights_.shape == W.shape
        assert rel_err(learner.weights_, W) < 1e-6, (cfg, rel_err(learner.weights_, W))


def test_analytic_single_sample_batches_in_any_order_match_joint():
    X, y, _ = blobs([5, 1, 8, 3], 12, seed=14)
    one_by_one = make_learner("analytic", buffer_size=32, seed=3)
    for i in torch.randperm(len(y), generator=torch.Generator().manual_seed(0)):
        one_by_one.partial_fit(X[i : i + 1], y[i : i + 1])
    W = joint_ridge(one_by_one.expand(X), one_hot_in_order(y, one_by_one.classes_), 0.1)
    assert rel_err(one_by_one.weights_, W) < 1e-6
    at_once = make_learner("analytic", buffer_size=32, seed=3).partial_fit(X, y)
    # Same data, different class order: the same weights up to a column permutation.
    perm = [at_once.classes_.tolist().index(c) for c in one_by_one.classes_.tolist()]
    assert rel_err(at_once.weights_[:, perm], one_by_one.weights_) < 1e-6
    assert torch.equal(at_once.predict(X), one_by_one.predict(X))


def test_analytic_block_size_does_not_change_the_result():
    X, y, _ = blobs([0, 1, 2], 50, seed=15)
    big = make_learner("analytic", buffer_size=40, block_size=4096).partial_fit(X, y)
    small_blocks = make_learner("analytic", buffer_size=40, block_size=7).partial_fit(X, y)
    assert rel_err(small_blocks.weights_, big.weights_) < 1e-9
    assert rel_err(small_blocks.stats.gram, big.stats.gram) < 1e-12


def test_analytic_buffer_size_zero_is_ridge_on_the_embedding():
    X, y, _ = blobs([3, 1], 20, d=6, seed=16)
    learner = make_learner("analytic", buffer_size=0, gamma=0.5)
    learner.partial_fit(X[:13], y[:13]).partial_fit(X[13:], y[13:])
    assert learner.buffer.projection.numel() == 0
    assert torch.equal(learner.expand(X), X.double())
    W = joint_ridge(X.double(), one_hot_in_order(y, learner.classes_), 0.5)
    assert learner.weights_.shape == (6, 2)
    assert rel_err(learner.weights_, W) < 1e-6


def test_analytic_expansion_is_seeded_relu_of_the_embedding():
    X, y, _ = blobs([0, 1], 5, d=4)
    a = make_learner("analytic", buffer_size=24, seed=5).partial_fit(X, y)
    b = make_learner("analytic", buffer_size=24, seed=5).partial_fit(X, y)
    c = make_learner("analytic", buffer_size=24, seed=6).partial_fit(X, y)
    H = a.expand(X)
    assert H.shape == (10, 24) and H.dtype == torch.float64 and (H >= 0).all() and (H == 0).any()
    assert torch.equal(H, torch.relu(X.double() @ a.buffer.projection.double()))
    assert torch.equal(a.buffer.projection, b.buffer.projection)
    assert not torch.equal(a.buffer.projection, c.buffer.projection)
    with pytest.raises(NotFittedError):
        make_learner("analytic").expand(X)


def test_analytic_default_config_matches_joint():
    learner = AnalyticLearner()
    assert learner.config.buffer_size == 2048 and learner.config.gamma == 0.1
    X, y, _ = blobs([2, 0, 4], 30, d=16, seed=17)
    learner.partial_fit(X[:45], y[:45]).partial_fit(X[45:], y[45:])
    W = joint_ridge(learner.expand(X), one_hot_in_order(y, learner.classes_), 0.1)
    assert rel_err(learner.weights_, W) < 1e-6
    assert learner.nbytes() >= 2048 * 2048 * 8  # the M x M float64 solver state dominates


def test_joint_ridge_solves_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    H, Y = torch.randn(30, 5, generator=g), torch.randn(30, 2, generator=g)
    W = joint_ridge(H, Y, 0.3)
    H64, Y64 = H.double(), Y.double()
    assert W.dtype == torch.float64
    A = H64.T @ H64 + 0.3 * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(A @ W, H64.T @ Y64, atol=1e-10)
    with pytest.raises(ValueError, match="gamma"):
        joint_ridge(H, Y, 0.0)
    with pytest.raises(ValueError, match="share n"):
        joint_ridge(H, Y[:-1], 0.1)
