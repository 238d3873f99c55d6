"""The closed-form heads on frozen embeddings: streaming LDA, RanPAC, FeTrIL, TEEN and DS-AL."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from earmark.learners import (
    LEARNERS,
    DSALLearner,
    FeTrILLearner,
    IncrementalLearner,
    NCMLearner,
    RanPACLearner,
    StreamingLDALearner,
    TEENLearner,
    joint_ridge,
    make_learner,
)
from tests.learner_data import blobs, one_hot_in_order, rel_err

NEW = ["lda", "ranpac", "fetril", "teen", "dsal"]
CLASSES = {
    "lda": StreamingLDALearner,
    "ranpac": RanPACLearner,
    "fetril": FeTrILLearner,
    "teen": TEENLearner,
    "dsal": DSALLearner,
}
# Small widths keep the tests fast; the defaults are checked separately.
SMALL = {"ranpac": {"projection_size": 64}, "dsal": {"buffer_size": 64}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP hand-off costs that dominate (10-40x on a
    busy 2-core machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(name: str, **kw) -> IncrementalLearner:
    return make_learner(name, **{**SMALL.get(name, {}), **kw})


def random_stream(rng: np.random.Generator, d: int):
    """Batches of random sizes (1 included) over random class subsets; classes recur."""
    pool = rng.choice(200, size=int(rng.integers(2, 6)), replace=False)
    centres = {int(c): rng.normal(0, 2, d) for c in pool}
    for _ in range(int(rng.integers(3, 7))):
        subset = rng.choice(pool, size=int(rng.integers(1, len(pool) + 1)), replace=False)
        n = int(rng.choice([1, 2, 5, 17, 40]))
        y = rng.choice(subset, size=n)
        X = np.stack([centres[int(c)] + rng.normal(0, 1, d) for c in y])
        yield torch.tensor(X, dtype=torch.float32), torch.tensor(y)


# ----------------------------------------------------------------------------- registry and configs


@pytest.mark.parametrize("name", NEW)
def test_registered_with_json_friendly_dataclass_config(name):
    cls = LEARNERS.get(name)
    assert cls is CLASSES[name] and cls.name == name
    assert dataclasses.is_dataclass(cls.Config)
    cfg = cls.Config()
    assert cls.Config(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    assert isinstance(make_learner(name), cls)


def test_defaults_and_their_sources():
    assert StreamingLDALearner.Config().shrinkage == 1e-4  # Deep SLDA
    r = RanPACLearner.Config()
    assert r.projection_size == 2048 and r.val_fraction == 0.2 and r.search_min_per_class == 10
    assert r.ridge_grid == [10.0**k for k in range(-8, 9)]  # the paper's grid
    t = TEENLearner.Config()
    assert (t.alpha, t.tau, t.temperature) == (0.5, 16.0, 1 / 16)  # TEEN code: shift_weight 0.5, softmax_t 16
    s = DSALLearner.Config()
    assert (s.gamma, s.gamma_comp, s.compensation_ratio, s.comp_activation) == (0.1, 0.1, 0.6, "tanh")


@pytest.mark.parametrize(
    "name, bad",
    [
        ("lda", {"shrinkage": -0.1}),
        ("lda", {"shrinkage": 1.5}),
        ("ranpac", {"projection_size": -1}),
        ("ranpac", {"val_fraction": 0.0}),
        ("ranpac", {"search_min_per_class": 0}),
        ("ranpac", {"ridge_min_log10": 3, "ridge_max_log10": 2}),
        ("fetril", {"optimizer": "sgd"}),
        ("fetril", {"lr": 0.0}),
        ("fetril", {"weight_decay": -1.0}),
        ("teen", {"alpha": 1.5}),
        ("teen", {"tau": 0.0}),
        ("dsal", {"gamma_comp": 0.0}),
        ("dsal", {"compensation_ratio": -1.0}),
        ("dsal", {"comp_activation": "softsign"}),
    ],
)
def test_invalid_config_values_raise(name, bad):
    with pytest.raises(ValueError):
        make_learner(name, **bad)


# ----------------------------------------------------------------------------- protocol


# The protocol (labels, proba, state round trips, nbytes, accuracy on blobs) is tested for every
# registered learner, these included, in tests/test_learners.py.


# ----------------------------------------------------------------------------- streaming LDA


def batch_lda(X: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, eps: float):
    X = X.double()
    means = torch.stack([X[y == c].mean(0) for c in classes])
    centred = torch.cat([X[y == c] - means[i] for i, c in enumerate(classes)])
    cov = centred.T @ centred / len(X)
    A = (1 - eps) * cov + eps * torch.eye(X.shape[1], dtype=torch.float64)
    W = torch.linalg.solve(A, means.T)
    return means, cov, W, -0.5 * (means.T * W).sum(0)


@pytest.mark.parametrize("seed", range(6))
def test_lda_equals_batch_lda_after_any_split_and_order(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 10))
    eps = float(rng.choice([1e-4, 0.1, 0.5]))
    learner = make_learner("lda", shrinkage=eps)
    Xs, ys = [], []
    for X, y in random_stream(rng, d):
        learner.partial_fit(X, y)
        Xs.append(X)
        ys.append(y)
        X_all, y_all = torch.cat(Xs), torch.cat(ys)
        means, cov, W, b = batch_lda(X_all, y_all, learner.classes_, eps)
        assert rel_err(learner.means_, means) < 1e-6
        assert learner.class_counts.tolist() == [int((y_all == c).sum()) for c in learner.classes_]
        if cov.norm() > 0:
            assert rel_err(learner.covariance_, cov) < 1e-6
        assert rel_err(learner.weights_, W) < 1e-6 and rel_err(learner.bias_, b) < 1e-6
        want = X_all.double() @ W + b
        assert torch.allclose(learner.decision_function(X_all), want.float(), rtol=1e-4, atol=1e-3)


def test_lda_one_sample_at_a_time_equals_one_batch():
    X, y, _ = blobs([5, 1, 8], 12, seed=14)
    one = make_learner("lda")
    for i in range(len(y)):
        one.partial_fit(X[i : i + 1], y[i : i + 1])
    whole = make_learner("lda").partial_fit(X, y)
    assert torch.equal(one.classes_, whole.classes_)
    assert rel_err(one.scatter, whole.scatter) < 1e-10 and rel_err(one.means_, whole.means_) < 1e-12


def test_lda_uses_the_shared_covariance_where_nearest_mean_fails():
    # The classes differ by (1, 0); the shared covariance is long (std 10) along (1, 1) and thin (std 0.1)
    # along (1, -1). Nearest-mean sees the difference drowned in variance; the discriminant does not.
    g = torch.Generator().manual_seed(0)
    n = 200
    axes = torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2**0.5
    noise = (torch.randn(2 * n, 2, generator=g) * torch.tensor([10.0, 0.1])) @ axes
    shift = torch.cat([torch.tensor([[0.5, 0.0]]).expand(n, 2), torch.tensor([[-0.5, 0.0]]).expand(n, 2)])
    X = noise + shift + torch.tensor([3.0, -3.0])
    y = torch.tensor([0, 1]).repeat_interleave(n)
    lda = make_learner("lda").partial_fit(X[:100], y[:100]).partial_fit(X[100:], y[100:])
    ncm = NCMLearner().partial_fit(X, y)
    assert (lda.predict(X) == y).float().mean() > 0.99
    assert (ncm.predict(X) == y).float().mean() < 0.6


def test_lda_shrinkage_changes_the_weights_as_documented():
    X, y, _ = blobs([0, 1, 2], 4, d=6, seed=3)
    for eps in (1e-4, 0.9):
        learner = make_learner("lda", shrinkage=eps).partial_fit(X, y)
        _, _, W, _ = batch_lda(X, y, learner.classes_, eps)
        assert rel_err(learner.weights_, W) < 1e-6
    few = make_learner("lda").partial_fit(X[:2], y[:2])  # fewer samples than dimensions: still solvable
    assert torch.isfinite(few.decision_function(X)).all()


# ----------------------------------------------------------------------------- RanPAC


def test_ranpac_statistics_equal_sums_over_all_data_and_weights_solve_the_chosen_ridge():
    rng = np.random.default_rng(3)
    learner = make_learner("ranpac", projection_size=48, seed=1)
    Xs, ys = [], []
    for X, y in random_stream(rng, 6):
        learner.partial_fit(X, y)
        Xs.append(X)
        ys.append(y)
        X_all, y_all = torch.cat(Xs), torch.cat(ys)
        H = learner.expand(X_all)
        Y = one_hot_in_order(y_all, learner.classes_)
        assert rel_err(learner.gram_, H.T @ H) < 1e-12
        assert rel_err(learner.targets_, H.T @ Y) < 1e-12
        lam = learner.ridges_[-1]
        assert lam in learner.config.ridge_grid
        G = H.T @ H + lam * torch.eye(H.shape[1], dtype=torch.float64)
        assert rel_err(G @ learner.weights_, H.T @ Y) < 1e-8
        assert torch.allclose(learner.decision_function(X_all), (H @ learner.weights_).float(), atol=1e-5)
    assert len(learner.ridges_) == len(Xs)  # one lambda per call


def test_ranpac_ridge_is_the_validation_argmin_of_each_call():
    X, y, _ = blobs([0, 1, 2, 3], 25, d=6, seed=5, spread=2.0)
    # search_min_per_class=1: search on every call as the paper does (a 50-row part has classes under 10 rows)
    learner = make_learner("ranpac", projection_size=32, seed=2, search_min_per_class=1)
    G = torch.zeros(32, 32, dtype=torch.float64)
    Q = torch.zeros(32, 0, dtype=torch.float64)
    for session, part in enumerate(torch.arange(len(y)).split(50)):
        learner.partial_fit(X[part], y[part])
        H = learner.expand(X[part])
        Y = one_hot_in_order(y[part], learner.classes_)
        Q = torch.cat([Q, Q.new_zeros(32, Y.shape[1] - Q.shape[1])], dim=1)
        fit, val = learner.validation_split(len(part), session)
        assert len(val) == 10 and sorted(torch.cat([fit, val]).tolist()) == list(range(len(part)))
        Gf, Qf = G + H[fit].T @ H[fit], Q + H[fit].T @ Y[fit]
        eye = torch.eye(32, dtype=torch.float64)
        losses = [
            float((H[val] @ torch.linalg.solve(Gf + lam * eye, Qf) - Y[val]).square().mean())
            for lam in learner.config.ridge_grid
        ]
        chosen = learner.config.ridge_grid.index(learner.ridges_[session])
        assert losses[chosen] <= min(losses) * (1 + 1e-9) + 1e-15
        G, Q = G + H.T @ H, Q + H.T @ Y
    assert len(set(learner.ridges_)) >= 1 and len(learner.ridges_) == 2


def test_ranpac_split_is_seeded_and_single_sample_calls_keep_the_ridge():
    a, b = make_learner("ranpac", projection_size=16, seed=4), make_learner("ranpac", projection_size=16, seed=4)
    assert torch.equal(a.validation_split(30, 0)[1], b.validation_split(30, 0)[1])
    assert not torch.equal(a.validation_split(30, 0)[1], a.validation_split(30, 1)[1])
    assert not torch.equal(a.validation_split(30, 0)[1], make_learner("ranpac", seed=5).validation_split(30, 0)[1])
    X, y, _ = blobs([0, 1], 10, seed=6)
    a.partial_fit(X[:1], y[:1])
    assert a.ridges_ == [a.config.fallback_ridge]
    a.partial_fit(X, y)
    a.partial_fit(X[:1], y[:1])
    assert a.ridges_[2] == a.ridges_[1]


def test_ranpac_new_classes_add_zero_columns_to_q():
    X, y, _ = blobs([0, 1], 10, seed=8)
    learner = make_learner("ranpac", projection_size=16).partial_fit(X, y)
    before = learner.targets_
    learner.partial_fit(X[:3], [0, 0, 5])
    H = learner.expand(X[:3])
    added = H.T @ F.one_hot(torch.tensor([0, 0, 2]), 3).double()
    assert torch.allclose(learner.targets_[:, :2], before + added[:, :2], rtol=0, atol=1e-9)
    assert torch.allclose(learner.targets_[:, 2], added[:, 2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3])
def test_ranpac_keeps_its_lambda_on_few_shot_sessions_so_novel_classes_are_learned(seed):
    # 20 overlapping base classes x 30 samples, then three 5-way 5-shot sessions. Searching lambda on a
    # 5-clip validation part picked 1e6-1e7 here, where W ~ Q / lambda and 5-shot columns never win: novel
    # accuracy 0.00 for both seeds. Kept from the base session (1e3), the novel classes are learned.
    g = torch.Generator().manual_seed(seed)
    centres = {c: torch.randn(32, generator=g) * 1.5 for c in range(35)}
    X, y, _ = blobs(list(range(20)), 30, d=32, seed=1, spread=1.5, centres=centres)
    learner = make_learner("ranpac", projection_size=128).partial_fit(X, y)
    for s in range(3):
        X, y, _ = blobs(list(range(20 + 5 * s, 25 + 5 * s)), 5, d=32, seed=2 + s, spread=1.5, centres=centres)
        assert not learner.searches(torch.zeros(5, dtype=torch.long))  # 5 shots < search_min_per_class
        learner.partial_fit(X, y)
    assert learner.ridges_ == [learner.ridges_[0]] * 4
    Xt, yt, _ = blobs(list(range(20, 35)), 40, d=32, seed=9, spread=1.5, centres=centres)
    novel = (learner.predict(Xt) == yt).float().mean().item()
    assert novel > 0.25, novel  # chance is 1/35


def test_ranpac_pinned_ridge_is_used_on_every_call():
    X, y, _ = blobs([0, 1], 10, seed=6)
    learner = make_learner("ranpac", projection_size=16, ridge_min_log10=2, ridge_max_log10=2)
    learner.partial_fit(X[:1], y[:1]).partial_fit(X, y).partial_fit(X[:4], y[:4])
    assert learner.ridges_ == [100.0] * 3  # no fallback_ridge on a 1-sample first call, no search


def test_ranpac_default_width():
    learner = RanPACLearner()
    learner.buffer.build(4)  # what the first fit does; fitting at M=2048 costs ~2.5 s, kept out of the unit tests
    assert learner.buffer.projection.shape == (4, 2048)
    assert learner.buffer.out_features(4) == 2048


# ----------------------------------------------------------------------------- FeTrIL


def test_fetril_pseudo_features_are_translated_features_of_the_most_cosine_similar_new_class():
    learner = make_learner("fetril")
    # Old classes 10 (mean (1, 0)) and 11 (mean (0, 2)).
    learner.partial_fit(torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 2.0]]), [10, 10, 11])
    # New class 20 has mean (4, 0.4): cosine-nearest to class 10; class 21 mean (1, 1.5): nearest to 11.
    # (Euclidean nearest to class 10 would be 21, so the choice tests cosine.)
    X = torch.tensor([[3.0, 0.4], [5.0, 0.4], [1.0, 1.0], [1.0, 2.0]])
    y = torch.tensor([20, 20, 21, 21])
    pseudo, labels = learner.pseudo_features(X, y)
    mu10, mu11 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mu20, mu21 = torch.tensor([4.0, 0.4]), torch.tensor([1.0, 1.5])
    want = torch.cat([X[:2] - mu20 + mu10, X[2:] - mu21 + mu11]).double()
    assert labels.tolist() == [10, 10, 11, 11]
    assert torch.allclose(pseudo, want, atol=1e-12)
    # A class present in the batch gets no pseudo-features; an unfitted learner makes none.
    assert make_learner("fetril").pseudo_features(X, y)[0].shape == (0, 2)
    _, labels = learner.pseudo_features(X, torch.tensor([20, 20, 10, 10]))
    assert set(labels.tolist()) == {11}


def test_fetril_keeps_old_classes_after_a_session_without_their_data():
    old, new = [0, 1, 2, 3], [4, 5, 6, 7]
    X, y, centres = blobs(old + new, 30, d=12, seed=21)
    Xt, yt, _ = blobs(old + new, 25, d=12, seed=22, centres=centres)
    learner = make_learner("fetril")
    learner.partial_fit(X[torch.isin(y, torch.tensor(old))], y[torch.isin(y, torch.tensor(old))])
    learner.partial_fit(X[torch.isin(y, torch.tensor(new))], y[torch.isin(y, torch.tensor(new))])
    pred = learner.predict(Xt)
    old_mask = torch.isin(yt, torch.tensor(old))
    assert (pred[old_mask] == yt[old_mask]).float().mean() > 0.8  # chance is 1/8
    assert (pred == yt).float().mean() > 0.9
    # Same history without pseudo-features (fresh classifier on new classes only) forgets them.
    plain = make_learner("fetril", warm_start=False)
    plain.partial_fit(X[torch.isin(y, torch.tensor(new))], y[torch.isin(y, torch.tensor(new))])
    assert (plain.predict(Xt)[old_mask] == yt[old_mask]).float().mean() == 0


def test_fetril_adam_is_seeded_and_deterministic():
    X, y, _ = blobs([0, 1, 2], 20, seed=23)
    kw = {"optimizer": "adam", "epochs": 5, "batch_size": 16}
    a = make_learner("fetril", **kw).partial_fit(X[:30], y[:30]).partial_fit(X[30:], y[30:])
    b = make_learner("fetril", **kw).partial_fit(X[:30], y[:30]).partial_fit(X[30:], y[30:])
    c = make_learner("fetril", seed=1, **kw).partial_fit(X[:30], y[:30]).partial_fit(X[30:], y[30:])
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert int(a.n_sessions) == 2
    assert (a.predict(X) == y).float().mean() > 0.9


# ----------------------------------------------------------------------------- TEEN


def test_teen_calibrated_prototype_equals_the_hand_formula():
    learner = make_learner("teen", alpha=0.75, tau=2.0)
    learner.partial_fit(torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]]), [0, 0, 1])  # base means (3, 0), (0, 3)
    learner.partial_fit(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), [5, 5])  # novel mean (2, 2)
    assert learner.n_base_classes_ == 2
    c = 1 / 2**0.5  # cos((1, 1), (1, 0)) = cos((1, 1), (0, 1))
    w = torch.softmax(torch.tensor([2.0 * c, 2.0 * c], dtype=torch.float64), 0)  # equal weights: 0.5, 0.5
    delta = w[0] * torch.tensor([1.0, 0.0]) + w[1] * torch.tensor([0.0, 1.0])
    delta = delta / delta.norm()
    want = 0.75 * torch.tensor([c, c]) + 0.25 * delta
    protos = learner.prototypes_
    assert torch.allclose(protos[2], want.double(), atol=1e-12)
    # Base prototypes are the (unit) base means, untouched.
    assert torch.allclose(protos[:2], torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_teen_calibration_pulls_toward_the_similar_base_class_and_recomputes_on_recurrence():
    learner = make_learner("teen", alpha=0.5, tau=16.0)
    learner.partial_fit(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), [0, 1])
    learner.partial_fit(torch.tensor([[1.0, 0.2, 1.0]]), [7])
    p_new = F.normalize(torch.tensor([1.0, 0.2, 1.0], dtype=torch.float64), dim=0)
    cos = torch.tensor([p_new[0], p_new[1]])
    w = torch.softmax(16 * cos, 0)
    delta = F.normalize(w[0] * torch.tensor([1.0, 0, 0]) + w[1] * torch.tensor([0, 1.0, 0]), dim=0).double()
    assert torch.allclose(learner.prototypes_[2], 0.5 * p_new + 0.5 * delta, atol=1e-12)
    assert learner.prototypes_[2][0] > learner.prototypes_[2][1]  # pulled mostly toward base class 0
    # The novel class recurs: its running mean moves to (1, 0.6, 1) and the calibration follows.
    learner.partial_fit(torch.tensor([[1.0, 1.0, 1.0]]), [7])
    p_new = F.normalize(torch.tensor([1.0, 0.6, 1.0], dtype=torch.float64), dim=0)
    w = torch.softmax(16 * p_new[:2], 0)
    delta = F.normalize(w[0] * torch.tensor([1.0, 0, 0]) + w[1] * torch.tensor([0, 1.0, 0]), dim=0).double()
    assert torch.allclose(learner.prototypes_[2], 0.5 * p_new + 0.5 * delta, atol=1e-12)
    assert learner.n_base_classes_ == 2  # recurrence does not make a class base


def test_teen_with_alpha_one_is_ncm_and_base_scores_are_ncms():
    X, y, _ = blobs([3, 1, 4, 5], 8, seed=31)
    first = torch.isin(y, torch.tensor([3, 1]))
    teen1 = make_learner("teen", alpha=1.0).partial_fit(X[first], y[first]).partial_fit(X[~first], y[~first])
    ncm = NCMLearner().partial_fit(X[first], y[first]).partial_fit(X[~first], y[~first])
    assert torch.allclose(teen1.decision_function(X), ncm.decision_function(X), atol=1e-6)
    teen = make_learner("teen").partial_fit(X[first], y[first]).partial_fit(X[~first], y[~first])
    assert torch.allclose(teen.decision_function(X)[:, :2], ncm.decision_function(X)[:, :2], atol=1e-6)
    assert not torch.allclose(teen.decision_function(X)[:, 2:], ncm.decision_function(X)[:, 2:], atol=1e-3)
    assert torch.allclose(teen.predict_proba(X), torch.softmax(teen.decision_function(X) * 16, 1), atol=1e-5)


# ----------------------------------------------------------------------------- DS-AL


@pytest.mark.parametrize("seed", range(4))
def test_dsal_main_stream_equals_joint_ridge_and_comp_stream_fits_the_cleansed_residuals(seed):
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 10))
    cfg = {"buffer_size": int(rng.choice([16, 40])), "gamma": 0.1, "gamma_comp": float(rng.choice([0.1, 1.0]))}
    learner = make_learner("dsal", seed=seed, **cfg)
    Xs, ys, targets = [], [], []
    for X, y in random_stream(rng, d):
        learner.partial_fit(X, y)
        Xs.append(X)
        ys.append(y)
        X_all, y_all = torch.cat(Xs), torch.cat(ys)
        Y_all = one_hot_in_order(y_all, learner.classes_)
        W_main = joint_ridge(learner.expand(X_all), Y_all, cfg["gamma"])
        assert rel_err(learner.weights_, W_main) < 1e-6
        # The comp stream's target for this call: Y - H W_main, columns of absent classes zeroed.
        Y = one_hot_in_order(y, learner.classes_)
        residual = Y - learner.expand(X) @ learner.weights_
        residual[:, (Y.sum(0) == 0)] = 0
        targets = [torch.cat([t, t.new_zeros(len(t), Y.shape[1] - t.shape[1])], dim=1) for t in targets]
        targets.append(residual)
        W_comp = joint_ridge(learner.comp_features(X_all), torch.cat(targets), cfg["gamma_comp"])
        assert rel_err(learner.comp_weights_, W_comp) < 1e-6
    H, Hc = learner.expand(X_all), learner.comp_features(X_all)
    assert torch.allclose(Hc, torch.tanh(X_all.double() @ learner.buffer.projection.double()))
    want = H @ learner.weights_ + 0.6 * Hc @ learner.comp_weights_
    assert torch.allclose(learner.decision_function(X_all), want.float(), atol=1e-5)


def test_dsal_without_compensation_is_acil():
    X, y, _ = blobs([0, 1, 2, 3], 15, seed=41)
    dsal = make_learner("dsal", buffer_size=32, seed=3, compensation_ratio=0.0)
    acil = make_learner("analytic", buffer_size=32, seed=3)
    for part in torch.arange(len(y)).split(20):
        dsal.partial_fit(X[part], y[part])
        acil.partial_fit(X[part], y[part])
    assert torch.allclose(dsal.decision_function(X), acil.decision_function(X), atol=1e-6)
    with_comp = make_learner("dsal", buffer_size=32, seed=3)
    for part in torch.arange(len(y)).split(20):
        with_comp.partial_fit(X[part], y[part])
    assert not torch.allclose(with_comp.decision_function(X), acil.decision_function(X), atol=1e-3)


def test_dsal_comp_state_with_another_buffer_size_is_rejected():
    X, y, _ = blobs([1, 2], 6)
    state = make_learner("dsal", buffer_size=16).partial_fit(X, y).state_dict()
    assert {"comp_solver.R", "comp_solver.W", "solver.R", "buffer.projection"} <= set(state)
    with pytest.raises(ValueError, match="buffer_size=32"):
        make_learner("dsal", buffer_size=32).load_state_dict(state)
