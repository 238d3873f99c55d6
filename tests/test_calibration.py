"""Temperature scaling, the calibration metrics and the held-out (shadow learner) calibration."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from earmark.calibration import (
    Calibrator,
    HeldOutCalibration,
    fit_temperature,
    known_score,
    stratified_holdout,
    temperature_nll,
)
from earmark.data.dataset import AudioDataset
from earmark.experiments.evaluate import evaluate_learner, evaluate_open_set
from earmark.learners import make_learner
from earmark.learners.lda import LDAConfig, StreamingLDALearner
from earmark.metrics.calibration import calibration_bins, expected_calibration_error, negative_log_likelihood
from earmark.scenarios import ClassIncremental
from tests.learner_data import blobs


def miscalibrated(n=4000, C=10, true_T=1.0, scale=4.0, seed=0):
    """Labels drawn from softmax(z / true_T); the 'learner' reports z * scale, so the right T is true_T * scale."""
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randint(0, C, (n,), generator=g)
    z = torch.randn(n, C, generator=g, dtype=torch.float64)
    z[torch.arange(n), y0] += 2.0
    y = torch.multinomial(torch.softmax(z / true_T, 1), 1, generator=g).squeeze(1)
    return z * scale, y


# --------------------------------------------------------------------------- metrics by hand


def test_ece_by_hand():
    # top-1 confidences 0.9 (hit), 0.9 (miss), 0.6 (hit), 0.5 (a tie)
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.5, 0.5]])
    y = np.array([0, 1, 1, 1])  # last row: argmax goes to column 0 (tie, lowest), so a miss at conf 0.5
    # bins of width 1/15: 0.9 -> bin 13 (0.8667, 0.9333]; 0.6 -> bin 8 (0.5333, 0.6]; 0.5 -> bin 7 (0.4667, 0.5333]
    bins = calibration_bins(proba, y)
    assert bins["count"][13] == 2 and bins["count"][8] == 1 and bins["count"][7] == 1 and bins["count"].sum() == 4
    expected = (2 * abs(0.5 - 0.9) + 1 * abs(1.0 - 0.6) + 1 * abs(0.0 - 0.5)) / 4
    assert expected_calibration_error(proba, y) == pytest.approx(expected)


def test_ece_bin_edges_are_right_inclusive():
    # 1/15 exactly belongs to the first bin; 1.0 to the last
    edges = np.linspace(0, 1, 16)
    proba = np.array([[edges[1], 0.0], [edges[1] + 1e-9, 0.0], [1.0, 0.0], [0.0, 0.0]])
    count = calibration_bins(proba, [0, 0, 0, 0])["count"]
    assert count[0] == 2 and count[1] == 1 and count[14] == 1  # 0 itself also goes to the first bin


def test_nll_by_hand_and_floor():
    proba = np.array([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    y = np.array([0, 1, 1])
    expected = -(math.log(0.5) + math.log(0.75) + math.log(1e-12)) / 3
    assert negative_log_likelihood(proba, y) == pytest.approx(expected)
    assert math.isnan(negative_log_likelihood(np.zeros((0, 2)), []))
    assert math.isnan(expected_calibration_error(np.zeros((0, 2)), []))


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("scale", [4.0, 0.25])  # over- and underconfident raw scores
def test_temperature_recovers_the_scale_and_lowers_ece(scale):
    s, y = miscalibrated(scale=scale)
    fit, held = slice(0, 2000), slice(2000, None)
    T = fit_temperature(s[fit], y[fit])
    assert abs(T / scale - 1) < 0.1
    raw = torch.softmax(s[held], 1)
    cal = Calibrator().fit(s[fit], y[fit]).proba(s[held])
    ece_raw, ece_cal = expected_calibration_error(raw, y[held]), expected_calibration_error(cal, y[held])
    assert ece_cal < 0.04 < ece_raw
    assert ece_cal < ece_raw / 3
    assert negative_log_likelihood(cal, y[held]) < negative_log_likelihood(raw, y[held])
    # the argmax is untouched
    assert torch.equal(cal.argmax(1), raw.argmax(1))


def test_temperature_is_the_nll_minimum():
    s, y = miscalibrated(n=500, seed=3)
    T = fit_temperature(s, y)
    best = temperature_nll(s, y, T)
    for f in (0.9, 0.99, 1.01, 1.1):
        assert temperature_nll(s, y, T * f) > best


def test_temperature_edge_cases():
    # constant scores and no rows: T = 1
    assert fit_temperature(torch.ones(5, 3), [0, 1, 2, 0, 1]) == 1.0
    assert fit_temperature(torch.zeros(0, 3), []) == 1.0
    # perfectly separated: beta at the top of the bracket (very confident), never inf
    s = torch.eye(4, dtype=torch.float64).repeat(3, 1)
    y = torch.arange(4).repeat(3)
    T = fit_temperature(s, y)
    assert 0 < T < 1e-3 and math.isfinite(T)
    # informative the wrong way round: the bottom of the bracket (near-uniform)
    assert fit_temperature(-s, y) > 10
    with pytest.raises(ValueError, match="targets"):
        fit_temperature(s, y + 4)


def test_calibrator_round_trip():
    s, y = miscalibrated(n=300)
    cal = Calibrator().fit(s, y)
    back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back == cal and back.n_samples == 300
    assert torch.equal(back.proba(s), cal.proba(s))
    with pytest.raises(ValueError):
        Calibrator(temperature=0.0)


# --------------------------------------------------------------------------- held-out calibration


def test_stratified_holdout():
    y = np.array([0] * 10 + [1] * 5 + [2] * 2 + [3])
    fit, held = stratified_holdout(y, 0.2, seed=1)
    assert sorted(fit.tolist() + held.tolist()) == list(range(len(y)))
    counts = np.bincount(y[held.numpy()], minlength=4)
    assert counts.tolist() == [2, 1, 1, 0]  # a lone clip stays for fitting; every class keeps one to fit
    again = stratified_holdout(y, 0.2, seed=1)
    assert torch.equal(again[1], held)
    assert not torch.equal(stratified_holdout(y, 0.2, seed=1, step=1)[1], held)


SPREAD = 4.5  # about 75% accuracy: room for miscalibration


def _sessions(seed=0, d=16, per_class=100):
    X, y, centres = blobs(list(range(12)), per_class, d=d, seed=seed, spread=SPREAD)
    Xt, yt, _ = blobs(list(range(12)), 100, d=d, seed=seed + 100, spread=SPREAD, centres=centres)
    groups = [range(0, 6), range(6, 9), range(9, 12)]
    return X, y, Xt, yt, groups


@pytest.mark.parametrize("name,params", [("ncm", {}), ("lda", {"shrinkage": 0.1}),
                                         ("analytic", {"buffer_size": 128, "gamma": 1.0}),
                                         ("ranpac", {"projection_size": 128})])
def test_held_out_calibration_lowers_ece_on_fresh_data(name, params):
    X, y, Xt, yt, groups = _sessions()
    learner = make_learner(name, **params)
    cal = HeldOutCalibration(learner, seed=0)
    for g in groups:
        m = torch.isin(y, torch.tensor(list(g)))
        learner.partial_fit(X[m], y[m])
        calibration = cal.update(X[m], y[m])
    assert learner.n_classes_ == 12 and cal.shadow.n_classes_ == 12
    assert len(cal.pool_y) == 12 * 20  # 20% of 100 per class
    cols = torch.argsort(learner.classes_)[torch.searchsorted(torch.sort(learner.classes_).values, yt)]
    raw = learner.predict_proba(Xt)
    calibrated = calibration.proba(learner, Xt)
    ece_raw = expected_calibration_error(raw, cols)
    ece_cal = expected_calibration_error(calibrated, cols)
    assert ece_cal < 0.06, (ece_raw, ece_cal)
    assert ece_cal < ece_raw or ece_raw < 0.06


def test_held_out_calibration_state_round_trip():
    X, y, _, _, groups = _sessions(per_class=20)
    cal = HeldOutCalibration(make_learner("lda", shrinkage=0.1), score="mahalanobis")
    for g in groups[:2]:
        m = torch.isin(y, torch.tensor(list(g)))
        cal.update(X[m], y[m])
    tensors, meta = cal.state()
    back = HeldOutCalibration.from_state(make_learner("lda", shrinkage=0.1), tensors, json.loads(json.dumps(meta)))
    assert back.calibration == cal.calibration and back.steps == 2
    m = torch.isin(y, torch.tensor(list(groups[2])))
    cal.update(X[m], y[m])
    back.update(X[m], y[m])  # continues exactly where the original is
    assert back.calibration == cal.calibration
    with pytest.raises(ValueError, match="unfitted"):
        HeldOutCalibration(cal.shadow)


# --------------------------------------------------------------------------- the harness loop


def _dataset_with_embeddings(n_classes=8, train=12, test=6, d=10, seed=0):
    X_tr, y_tr, centres = blobs(list(range(n_classes)), train, d=d, seed=seed, spread=1.5)
    X_te, y_te, _ = blobs(list(range(n_classes)), test, d=d, seed=seed + 1, spread=1.5, centres=centres)
    X = torch.cat([X_tr, X_te])
    targets = torch.cat([y_tr, y_te]).numpy()
    folds = np.array([1] * len(y_tr) + [2] * len(y_te))
    paths = [Path(f"/fake/{i}.wav") for i in range(len(targets))]
    ds = AudioDataset("synthetic", Path("/fake"), paths, targets, [f"c{c}" for c in range(n_classes)], folds)
    train_idx, test_idx = ds.split(2)
    sc = ClassIncremental(ds, train_idx, test_idx, initial_increment=4, increment=2, shots=5, seed=0)
    return sc, X, {i: i for i in range(len(targets))}


def test_evaluate_open_set_matches_evaluate_learner():
    sc, X, row_of = _dataset_with_embeddings()
    plain, _ = evaluate_learner(make_learner("ncm"), sc, X, row_of)
    matrix, seconds, rows = evaluate_open_set(make_learner("ncm"), sc, X, row_of, extra_scores=("energy",))
    assert np.array_equal(matrix.correct, plain.correct) and np.array_equal(matrix.counts, plain.counts)
    assert len(seconds) == len(rows) == len(sc) == 3
    assert [r["unknown_test_clips"] for r in rows] == [4 * 6, 2 * 6, 0]
    for r in rows[:-1]:
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["far95"] <= 1.0 and "auroc_energy" in r
    last = rows[-1]
    assert last["auroc"] is None and last["far95"] is None and last["false_acceptance"] is None
    assert last["auroc_energy"] is None
    json.dumps(rows, allow_nan=False)


def test_evaluate_open_set_mahalanobis_from_a_density_beside_other_heads():
    # lda reads its own Gaussians; ncm and analytic a density (an LDA at shrinkage 1e-4) kept beside them:
    # the same data, so the same Mahalanobis figures as lda at that shrinkage, session by session
    sc, X, row_of = _dataset_with_embeddings()
    kinds = ("mahalanobis", "relative_mahalanobis")
    _, _, ref = evaluate_open_set(make_learner("lda", shrinkage=1e-4), sc, X, row_of, extra_scores=kinds)
    for name in ("ncm", "analytic"):
        _, _, rows = evaluate_open_set(make_learner(name), sc, X, row_of, extra_scores=kinds)
        for r, q in zip(rows[:-1], ref[:-1], strict=True):
            for k in ("auroc_mahalanobis", "auroc_relative_mahalanobis"):
                assert r[k] is not None and r[k] == pytest.approx(q[k], abs=1e-12)
    _, _, rows = evaluate_open_set(make_learner("ncm"), sc, X, row_of, extra_scores=("energy",))
    assert "auroc_mahalanobis" not in rows[0]  # no density unless a Mahalanobis score asks for one


def _same_gaussians(a, b):
    order_a, order_b = torch.argsort(a.classes_), torch.argsort(b.classes_)
    return (torch.equal(a.classes_[order_a], b.classes_[order_b]) and torch.allclose(a.covariance_, b.covariance_)
            and torch.allclose(a.means_[order_a], b.means_[order_b]))


def _density_calibration(name="ncm", target_frr=0.05):
    return HeldOutCalibration(make_learner(name), score="relative_mahalanobis", seed=3, target_frr=target_frr)


def test_density_forgets_and_merges_as_the_joint_density():
    X, y, _ = blobs([0, 1, 2], 20, d=6, seed=4, spread=1.0)
    a = _density_calibration()
    a.update(X, y)
    assert a.density is not None and a.shadow_density is not None
    ref = StreamingLDALearner(LDAConfig(shrinkage=1e-4)).partial_fit(X[y != 2], y[y != 2])
    a.forget(label=2)
    assert sorted(a.density.classes_.tolist()) == [0, 1] and _same_gaussians(a.density, ref)
    # forgetting clips: the density drops all of them, the shadow's density the ones it learned
    b = _density_calibration()
    b.update(X, y)
    gone = torch.arange(0, 60, 7)
    b.forget(X[gone], y[gone])
    keep = torch.ones(60, dtype=torch.bool)
    keep[gone] = False
    ref = StreamingLDALearner(LDAConfig(shrinkage=1e-4)).partial_fit(X[keep], y[keep])
    assert _same_gaussians(b.density, ref)
    assert int(b.shadow_density.class_counts.sum()) == int(b.shadow.class_counts.sum())
    # merging two halves' calibrations: the densities add up to the density of all
    c, d = _density_calibration(), _density_calibration()
    c.update(X[:30], y[:30])
    d.update(X[30:], y[30:])
    c.merge(d, {0: 0, 1: 1, 2: 2})
    ref = StreamingLDALearner(LDAConfig(shrinkage=1e-4)).partial_fit(X, y)
    assert _same_gaussians(c.density, ref)
    with pytest.raises(ValueError, match="densities"):
        c.merge(HeldOutCalibration(make_learner("ncm")), {})


def test_density_round_trips_and_scores_the_pool_with_the_shadows():
    X, y, _ = blobs([0, 1, 2, 3], 15, d=6, seed=5, spread=1.0)
    cal = _density_calibration("analytic", target_frr=0.25)
    cal.update(X, y)
    # the threshold comes from the shadow's density: the pool's clips are new to it
    pool_known = known_score(cal.shadow, cal.pool_X, "relative_mahalanobis", density=cal.shadow_density)
    j = math.floor(0.25 * (len(pool_known) + 1))
    assert cal.calibration.detector.n_samples == len(pool_known) and j >= 1
    assert cal.calibration.detector.threshold == pytest.approx(float(torch.sort(pool_known).values[j - 1]))
    tensors, meta = cal.state()
    assert meta["density"] == {"shrinkage": 1e-4} and any(k.startswith("shadow_density.") for k in tensors)
    back = HeldOutCalibration.from_state(make_learner("analytic"), tensors, meta)
    Z = X[:7] + 0.3
    assert torch.equal(back.score(make_learner("analytic").partial_fit(X, y), Z),
                       cal.score(make_learner("analytic").partial_fit(X, y), Z))
    assert back.nbytes() == cal.nbytes() > cal.shadow.nbytes() + cal.pool_X.numel() * 4
    frozen = cal.frozen()
    assert torch.equal(frozen.predict(make_learner("analytic").partial_fit(X, y), Z).score,
                       cal.score(make_learner("analytic").partial_fit(X, y), Z))
    # saved without a density (before it existed): loads without one
    old = HeldOutCalibration(make_learner("ncm"), score="max_score")
    old.update(X, y)
    t, m = old.state()
    m.pop("density")
    assert HeldOutCalibration.from_state(make_learner("ncm"), t, m).density is None
    with pytest.raises(ValueError, match="keeps its own"):
        HeldOutCalibration(make_learner("lda"), score="relative_mahalanobis", density=True)
    with pytest.raises(ValueError, match="needs the density"):
        HeldOutCalibration(make_learner("ncm"), score="mahalanobis", density=False)


def test_ece_sampling_floor():
    # a perfectly calibrated predictor: its measured ECE on n rows is about the floor, and the floor shrinks ~ 1/sqrt(n)
    from earmark.metrics.calibration import ece_sampling_floor

    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, 400)
    proba = np.stack([conf, 1 - conf], 1)
    floor = ece_sampling_floor(proba)
    measured = [expected_calibration_error(proba, (rng.random(400) >= conf).astype(int)) for _ in range(200)]
    assert abs(np.mean(measured) - floor) < 0.005
    big = np.repeat(proba, 16, axis=0)
    assert ece_sampling_floor(big) == pytest.approx(floor / 4, rel=0.25)
    assert math.isnan(ece_sampling_floor(np.zeros((0, 2))))


def test_validation_clips_replace_the_held_out_share_and_are_not_learned():
    X, y, _ = blobs([0, 1, 2], 20, d=6, seed=4, spread=2.0)
    Xv, yv, _ = blobs([0, 1, 2], 5, d=6, seed=5, spread=2.0)
    cal = HeldOutCalibration(make_learner("lda", shrinkage=0.1))
    cal.update(X, y, held_out=(Xv, yv))
    assert torch.equal(cal.pool_X, Xv) and torch.equal(cal.pool_y, yv)  # only the validation clips
    full = make_learner("lda", shrinkage=0.1).partial_fit(X, y)
    assert torch.allclose(cal.shadow.means_, full.means_)  # the shadow learned the whole session, not them
    assert cal.calibration.calibrator.n_samples == 15
    cal.update(X[:6] + 10, y[:6] + 3)  # a later session without validation clips: a held-out share again
    assert len(cal.pool_y) > 15


def test_evaluate_open_set_takes_validation_clips_by_session():
    sc, X, row_of = _dataset_with_embeddings()
    # stand-in validation clips: the last session's test items of session-0 classes (test figures are unaffected:
    # they are still tested, only added to the calibration pool as well)
    test0 = sc[0].test_indices
    _, _, plain = evaluate_open_set(make_learner("ncm"), sc, X, row_of)
    _, _, rows = evaluate_open_set(make_learner("ncm"), sc, X, row_of, validation_indices=test0)
    assert rows[0]["temperature"] != plain[0]["temperature"]
    assert rows[0]["accuracy"] == plain[0]["accuracy"] and rows[0]["ece_floor"] >= 0


@pytest.mark.parametrize("name", ["ncm", "lda", "analytic", "ranpac"])
def test_calibration_bytes_are_counted_without_building_the_state(name):
    X, y, _ = blobs(list(range(5)), 12, d=16, seed=0)
    params = {"analytic": {"buffer_size": 64}, "ranpac": {"projection_size": 64}}.get(name, {})
    cal = HeldOutCalibration(make_learner(name, **params))
    cal.update(X, y)
    tensors, _ = cal.state()
    assert cal.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values()) > 0
