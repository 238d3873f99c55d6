"""The ridge learners' cached low-rank solver: fast answers that stay equal to a fresh Cholesky of the statistics."""

from __future__ import annotations

import copy

import torch

from earmark.learners import make_learner
from earmark.learners.statistics import LowRankSolver, RidgeStatistics
from tests.learner_data import blobs, rel_err
from tests.test_forget import fit, sessions


def fresh_solve(stats: RidgeStatistics, lam: float) -> torch.Tensor:
    A = stats.gram.clone()
    A.diagonal().add_(lam)
    return torch.linalg.solve(A, stats.targets)


def test_learns_and_forgets_reuse_one_factorization_and_equal_a_fresh_solve():
    X, y, _ = blobs(list(range(8)), 30, d=12, seed=0)
    learner = make_learner("analytic", buffer_size=96, gamma=100.0).partial_fit(X, y)
    solver = learner.stats.solver
    assert solver.factorizations == 1
    X2, y2, _ = blobs([8, 9, 3], 4, d=12, seed=1)  # two new classes and a recurring one
    learner.partial_fit(X2, y2)
    learner.forget_samples(X2[:2], y2[:2])
    learner.forget_class(5)
    assert solver.factorizations == 1, "small changes must not refactor"
    assert len(solver.U) > 0
    assert rel_err(learner.weights, fresh_solve(learner.stats, 100.0)) < 1e-10


def test_the_error_probe_sends_an_inaccurate_low_rank_answer_back_to_a_full_solve():
    # A weak ridge and a class that dominates its directions: removing it makes Woodbury's capacitance
    # ill-conditioned (its answer is off by about 1e-10 here), so the probe must refuse it.
    _, _, batches = sessions(seed=7)
    learner = fit("analytic", batches)
    solver = learner.stats.solver
    learner.forget_class(3)
    assert solver.rejected == 1
    ref = fresh_solve(learner.stats, learner.config.gamma)
    assert rel_err(learner.weights, ref) < 1e-11


def test_a_probe_that_always_fails_means_every_solve_is_a_fresh_cholesky():
    X, y, _ = blobs(list(range(4)), 20, d=8, seed=2)
    learner = make_learner("analytic", buffer_size=32, gamma=5.0).partial_fit(X, y)
    learner.stats.solver.tol = learner.stats.solver.slack = 0.0
    X2, y2, _ = blobs([1], 3, d=8, seed=3)
    learner.partial_fit(X2, y2)
    assert learner.stats.solver.rejected == 1
    assert learner.stats.solver.factorizations == 2
    assert len(learner.stats.solver.U) == 0


def test_too_many_changed_rows_refactor_and_a_load_or_merge_invalidates():
    X, y, _ = blobs(list(range(4)), 20, d=8, seed=4)
    learner = make_learner("analytic", buffer_size=32, gamma=5.0).partial_fit(X, y)
    learner.stats.solver.max_rows = 5
    X2, y2, _ = blobs([0, 1], 3, d=8, seed=5)  # 6 rows > 5
    learner.partial_fit(X2, y2)
    assert learner.stats.solver.factorizations == 2
    other = copy.deepcopy(learner)
    other.load_state_dict(learner.state_dict())
    assert not other.stats.solver.ready
    learner.merge(make_learner("analytic", buffer_size=32, gamma=5.0).partial_fit(*blobs([7], 4, d=8, seed=6)[:2]))
    assert rel_err(learner.weights, fresh_solve(learner.stats, 5.0)) < 1e-11


def test_a_new_lambda_refactors_and_the_solver_is_not_state():
    stats = RidgeStatistics()
    stats.reset(6)
    stats.grow(2)
    H = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stats.learn(H, torch.tensor([0, 1] * 5))
    a = stats.solve(1.0)
    b = stats.solve(2.0)
    assert stats.solver.factorizations == 2 and stats.solver.lam == 2.0
    assert not torch.allclose(a, b)
    assert set(stats.state_dict()) == {"gram", "targets", "factors.rows", "factors.sizes"}
    assert isinstance(stats.solver, LowRankSolver)


def test_a_deep_copy_shares_the_factor_but_not_what_changes_in_place():
    X, y, _ = blobs(list(range(4)), 20, d=8, seed=8)
    learner = make_learner("analytic", buffer_size=32, gamma=50.0).partial_fit(X, y)
    twin = copy.deepcopy(learner)
    assert twin.stats.solver.L is learner.stats.solver.L
    X2, y2, _ = blobs([9], 3, d=8, seed=9)
    twin.partial_fit(X2, y2)
    assert learner.n_classes_ == 4 and len(learner.stats.solver.U) == 0  # the original is untouched
    assert rel_err(twin.weights, fresh_solve(twin.stats, 50.0)) < 1e-10
    assert rel_err(learner.weights, fresh_solve(learner.stats, 50.0)) < 1e-10


def test_gram_rows_wait_unfolded_until_read_and_every_reader_sees_the_whole_sum():
    g = torch.Generator().manual_seed(3)
    stats = RidgeStatistics()
    stats.reset(16)
    stats.grow(3)
    H = torch.randn(40, 16, generator=g, dtype=torch.float64)
    cols = torch.arange(40) % 3
    stats.learn(H[:30], cols[:30])
    stats.solve(0.5)  # the first solve factorizes (folds)
    for i in range(30, 40):  # single-row learns: deferred, answered by products with the pending rows
        stats.learn(H[i:i + 1], cols[i:i + 1])
        W = stats.solve(0.5)
    assert stats._pending and stats.solver.factorizations == 1
    want = H.T @ H
    raw = stats._buffers["gram"]
    assert not torch.allclose(raw, want)  # the stored part lacks the pending rows ...
    twin = copy.deepcopy(stats)
    assert rel_err(stats.state_dict()["gram"], want) < 1e-13  # ... a save folds them ...
    assert not stats._pending
    assert rel_err(twin.gram, want) < 1e-13  # ... and so does any read of .gram
    A = want.clone()
    A.diagonal().add_(0.5)
    assert rel_err(W, torch.linalg.solve(A, stats.targets)) < 1e-10
    stats.unlearn(H[35:], cols[35:])
    assert stats._pending
    assert rel_err(stats.gram, H[:35].T @ H[:35]) < 1e-12


def test_too_many_pending_rows_fold_on_their_own():
    stats = RidgeStatistics(class_factors=False)
    stats.reset(8)
    stats.grow(1)
    H = torch.randn(stats.max_pending, 8, dtype=torch.float64)
    for i in range(stats.max_pending - 1):
        stats.add(H[i:i + 1], torch.zeros(1, dtype=torch.long))
    assert len(stats._pending) == stats.max_pending - 1
    stats.add(H[-1:], torch.zeros(1, dtype=torch.long))
    assert not stats._pending and rel_err(stats._buffers["gram"], H.T @ H) < 1e-13


def test_class_factor_rows_wait_and_every_read_sees_them_mixed_in():
    from earmark.learners.statistics import ClassFactors

    g = torch.Generator().manual_seed(5)
    f = ClassFactors()
    f.reset(6)
    f.grow(2)
    H = torch.randn(9, 6, generator=g, dtype=torch.float64)
    cols = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 0])
    for i in range(9):
        f.add(H[i:i + 1], cols[i:i + 1])
    assert f._pending and f._buffers["rows"].shape[0] == 0
    n_before = f.unfolded_bytes()
    assert n_before == (6 + 2) * 6 * 8  # class 0 keeps at most 6 (= width) rows, class 1 its 2
    saved = f.state_dict()
    assert not f._pending and saved["rows"].shape == (8, 6) and saved["sizes"].tolist() == [6, 2]
    for c in (0, 1):
        want = H[cols == c].T @ H[cols == c]
        assert rel_err(f.gram(c), want) < 1e-12
    f.add(H[:1] * 2, torch.tensor([1]))
    F = f.drop(0)  # a read folds first, then the class goes
    assert rel_err(F.T @ F, H[cols == 0].T @ H[cols == 0]) < 1e-12
    assert rel_err(f.gram(0), H[cols == 1].T @ H[cols == 1] + 4 * H[:1].T @ H[:1]) < 1e-12


def test_a_calibration_shadow_skips_the_error_probe_and_stays_close():
    from earmark.calibration import HeldOutCalibration

    X, y, _ = blobs(list(range(6)), 20, d=12, seed=2)
    learner = make_learner("analytic", buffer_size=64, gamma=10.0)
    cal = HeldOutCalibration(learner)
    assert learner.stats.solver.probe and not cal.shadow.stats.solver.probe
    cal.update(X[:60], y[:60])
    for i in range(60, 70):  # one clip at a time: low-rank answers, none probed
        cal.update(X[i:i + 1], y[i:i + 1])
    assert cal.shadow.stats.solver.factorizations == 1 and len(cal.shadow.stats.solver.U) > 0
    assert rel_err(cal.shadow.weights, fresh_solve(cal.shadow.stats, 10.0)) < 1e-8
