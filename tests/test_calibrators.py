"""The calibrators beyond one temperature: score transforms, class-balanced fits, top-label maps."""

import json
import math

import numpy as np
import pytest
import torch

from earmark.calibration import (
    Calibrator,
    HeldOutCalibration,
    TopLabelMap,
    class_balanced_weights,
    default_calibrator,
    fit_temperature,
    recalibrate_top,
    temperature_nll,
    transform_scores,
)
from earmark.learners import make_learner
from earmark.metrics.calibration import expected_calibration_error, negative_log_likelihood
from tests.learner_data import blobs


def ridge_like(n=12000, C=10, power=1.0, seed=0):
    """Labels drawn from probabilities p; the 'learner' reports p ** (1 / power), in [0, 1] like a ridge head.

    softmax(s / T) cannot reproduce p from these scores; softmax(log(s) / T) with T = 1 / power does.
    """
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, C, generator=g, dtype=torch.float64)
    p = torch.softmax(z, 1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    return p ** (1.0 / power), y


def top_label_warped(n=6000, C=10, seed=0):
    """Top-1 confidences from a softmax, but the top-1 is right with probability 0.25 + 0.5 * conf ** 3.

    Its true classes are otherwise uniform among the rest. No temperature fixes a hit rate of that shape
    (nearly flat, then steep); a monotone map of the top-1 confidence does.
    """
    g = torch.Generator().manual_seed(seed)
    s = 2.0 * torch.randn(n, C, generator=g, dtype=torch.float64)
    p = torch.softmax(s, 1)
    conf, top = p.max(1)
    hit = torch.rand(n, generator=g, dtype=torch.float64) < 0.25 + 0.5 * conf**3
    other = (top + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
    return s, torch.where(hit, top, other)


def ece(p, y):
    return expected_calibration_error(p, y)


# --------------------------------------------------------------------------- pieces


def test_weighted_temperature_equals_repeated_rows():
    s, y = ridge_like(n=300, power=1.0)
    s = torch.log(s)
    w = torch.ones(300, dtype=torch.float64)
    w[:100] = 3.0
    repeated_s, repeated_y = torch.cat([s[:100], s[:100], s]), torch.cat([y[:100], y[:100], y])
    T_w, T_r = fit_temperature(s, y, weights=w), fit_temperature(repeated_s, repeated_y)
    assert T_w == pytest.approx(T_r, rel=1e-6)
    assert temperature_nll(s, y, T_w, w) == pytest.approx(temperature_nll(repeated_s, repeated_y, T_r), rel=1e-9)
    with pytest.raises(ValueError, match="weights"):
        fit_temperature(s, y, weights=-w)


def test_class_balanced_weights_count_every_class_once():
    y = torch.tensor([3, 3, 3, 1, 7, 7])
    w = class_balanced_weights(y)
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5], dtype=torch.float64))
    assert len(class_balanced_weights(torch.zeros(0, dtype=torch.long))) == 0


def test_log_transform_is_strictly_monotone_below_its_floor_too():
    s = torch.tensor([[0.5, -0.2, 1e-6, 1.3, 1e-3]], dtype=torch.float64)
    out = transform_scores(s, "log", floor=1e-3)
    tangent = lambda v: math.log(1e-3) + (v - 1e-3) / 1e-3  # noqa: E731
    expected = torch.tensor([[math.log(0.5), tangent(-0.2), tangent(1e-6), math.log(1.3), math.log(1e-3)]])
    assert torch.allclose(out, expected.double())
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64).reshape(1, -1)
    assert bool((transform_scores(grid, "log").diff() > 0).all())
    with pytest.raises(ValueError, match="transform"):
        transform_scores(s, "sqrt")


def test_isotonic_map_is_monotone_and_fits_a_monotone_rate():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(3000, generator=g, dtype=torch.float64)
    hit = (torch.rand(3000, generator=g, dtype=torch.float64) < p**2).double()
    m = TopLabelMap("isotonic").fit(p, hit)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    out = m(grid)
    assert bool((out[1:] >= out[:-1] - 1e-12).all())
    assert float((out - grid**2).abs().mean()) < 0.04
    # PAV by hand: (0, 1, 0, 1) -> 0, 0.5, 0.5, 1 at x = 0, 1, 2, 3
    m = TopLabelMap("isotonic").fit(torch.tensor([0.0, 0.1, 0.2, 0.3]), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert m(torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)).tolist() == pytest.approx([0, 0.5, 0.5, 1])


def test_recalibrate_top_keeps_argmax_and_sums_to_one():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(3 * torch.randn(500, 8, generator=g, dtype=torch.float64), 1)
    p[0] = torch.zeros(8, dtype=torch.float64)
    p[0, 3] = 1.0  # a saturated row
    for top in (TopLabelMap("platt", a=0.3, b=-2.0), TopLabelMap("histogram", knots=[0.5], values=[0.05, 0.1]),
                TopLabelMap("isotonic", knots=[0.0, 1.0], values=[0.0, 0.2])):
        q = recalibrate_top(p, top)
        assert torch.equal(q.argmax(1), p.argmax(1)), top.kind
        assert torch.allclose(q.sum(1), torch.ones(500, dtype=torch.float64))
        assert bool((q >= 0).all())
    # where the map is not pushed up by the runner-up, the other classes keep their ratios
    top = TopLabelMap("platt", a=1.0, b=0.3)
    q = recalibrate_top(p, top)
    r = 5
    order = p[r].argsort(descending=True)
    a, b = order[1], order[2]
    assert float(q[r, a] / q[r, b]) == pytest.approx(float(p[r, a] / p[r, b]))
    assert float(q[r].max()) == pytest.approx(float(top(p[r].max().reshape(1))[0]))


# --------------------------------------------------------------------------- ECE lower on miscalibrated problems


def test_log_transform_fixes_ridge_like_scores_that_temperature_cannot():
    s, y = ridge_like(power=2.0)
    fit, held = slice(0, 6000), slice(6000, None)
    plain = Calibrator().fit(s[fit], y[fit])
    logged = Calibrator(transform="log", floor=1e-6).fit(s[fit], y[fit])
    assert logged.temperature == pytest.approx(1 / 2, rel=0.1)
    raw = torch.softmax(s[held], 1)
    e_raw, e_t, e_log = ece(raw, y[held]), ece(plain.proba(s[held]), y[held]), ece(logged.proba(s[held]), y[held])
    assert e_log < 0.02 and e_log < e_t / 2 and e_log < e_raw / 2, (e_raw, e_t, e_log)
    assert negative_log_likelihood(logged.proba(s[held]), y[held]) < negative_log_likelihood(
        plain.proba(s[held]), y[held])
    assert torch.equal(logged.proba(s[held]).argmax(1), s[held].argmax(1))


@pytest.mark.parametrize("kind", ["platt", "histogram", "isotonic"])
def test_top_label_map_lowers_ece_where_temperature_cannot(kind):
    s, y = top_label_warped()
    fit, held = slice(0, 3000), slice(3000, None)
    plain = Calibrator().fit(s[fit], y[fit])
    top = Calibrator(top_label=TopLabelMap(kind, bins=10)).fit(s[fit], y[fit])
    assert top.temperature == pytest.approx(plain.temperature)
    p_t, p_top = plain.proba(s[held]), top.proba(s[held])
    e_t, e_top = ece(p_t, y[held]), ece(p_top, y[held])
    assert e_top < 0.04 and e_top < e_t / 2, (e_t, e_top)
    assert torch.equal(p_top.argmax(1), s[held].argmax(1))
    assert torch.allclose(p_top.sum(1), torch.ones(len(p_top)), atol=1e-6)


def test_balanced_fit_follows_the_rare_classes_as_an_equal_test_set_does():
    # classes 0-4: 50 held-out rows each and calibrated scores; classes 5-9: 2 rows each and 4x overconfident
    # scores. A test set with equal rows per class is half rare: the balanced fit serves it better.
    def draw(n_per, classes, scale, seed):
        g = torch.Generator().manual_seed(seed)
        rows = []
        for c in classes:
            z = torch.randn(n_per, 10, generator=g, dtype=torch.float64)
            z[:, c] += 2.5
            y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
            rows.append((z * scale[c], y))
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    scale = {c: 1.0 if c < 5 else 4.0 for c in range(10)}
    s_a, y_a = draw(50, range(5), scale, 0)
    s_b, y_b = draw(6, range(5, 10), scale, 1)  # few rows of each rare class
    s, y = torch.cat([s_a, s_b]), torch.cat([y_a, y_b])
    s_test, y_test = draw(400, range(10), scale, 2)
    plain, balanced = Calibrator().fit(s, y), Calibrator(balanced=True).fit(s, y)
    assert balanced.temperature > plain.temperature
    nll = lambda c: negative_log_likelihood(c.proba(s_test), y_test)  # noqa: E731
    assert nll(balanced) < nll(plain)


# --------------------------------------------------------------------------- storage and the held-out loop


def test_calibrator_round_trip_with_every_setting():
    s, y = top_label_warped(n=600)
    for cal in (Calibrator(transform="log", floor=1e-4, balanced=True, top_label=TopLabelMap("histogram", bins=7)),
                Calibrator(top_label=TopLabelMap("isotonic")), Calibrator(top_label=TopLabelMap("platt"))):
        cal.fit(s.exp() / s.exp().sum(1, keepdim=True), y)
        back = Calibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
        assert back == cal
        assert torch.equal(back.proba(s), cal.proba(s))
        fresh = cal.unfitted()
        assert fresh.n_samples == 0 and fresh.top_label.kind == cal.top_label.kind and fresh.transform == cal.transform
    # a dict from before these settings is plain temperature scaling
    old = Calibrator.from_dict({"temperature": 0.5, "n_samples": 3})
    assert old == Calibrator(temperature=0.5, n_samples=3)
    with pytest.raises(ValueError, match="top-label"):
        TopLabelMap("spline")


@pytest.mark.parametrize("name,params", [("ncm", {}), ("lda", {"shrinkage": 0.1}),
                                         ("analytic", {"buffer_size": 128, "gamma": 1.0}),
                                         ("ranpac", {"projection_size": 128})])
def test_default_calibrator_through_the_held_out_loop(name, params):
    X, y, centres = blobs(list(range(12)), 60, d=16, seed=0, spread=4.5)
    Xt, yt, _ = blobs(list(range(12)), 100, d=16, seed=100, spread=4.5, centres=centres)
    learner = make_learner(name, **params)
    template = default_calibrator(learner)
    cal = HeldOutCalibration(learner, seed=0, calibrator=template)
    for g in (range(0, 6), range(6, 9), range(9, 12)):
        m = torch.isin(y, torch.tensor(list(g)))
        learner.partial_fit(X[m], y[m])
        calibration = cal.update(X[m], y[m])
    fitted = calibration.calibrator
    assert fitted.n_samples == len(cal.pool_y) and fitted.transform == template.transform
    cols = torch.argsort(learner.classes_)[torch.searchsorted(torch.sort(learner.classes_).values, yt)]
    p = calibration.proba(learner, Xt)
    assert torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-5)
    assert torch.equal(p.argmax(1), learner.decision_function(Xt).argmax(1))
    assert ece(p, cols) < 0.08
    tensors, meta = cal.state()
    back = HeldOutCalibration.from_state(make_learner(name, **params), tensors, json.loads(json.dumps(meta)))
    assert back.calibration == calibration
    assert torch.equal(back.calibration.proba(learner, Xt), p)
    assert math.isfinite(back.calibration.detector.threshold)
    np.testing.assert_array_equal(back.pool_y.numpy(), cal.pool_y.numpy())
