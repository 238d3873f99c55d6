"""Open-set metrics against hand-computed values, the threshold rule, rejection and its storage."""

import json
import math

import numpy as np
import pytest
import torch

from earmark.calibration import (
    UNKNOWN,
    Calibrator,
    HeldOutCalibration,
    OpenSetCalibration,
    UnknownDetector,
    background_distances,
    known_score,
    known_score_from,
    mahalanobis_distances,
)
from earmark.learners import make_learner
from earmark.metrics.openset import auroc, far_at_tar, rejection_rates, threshold_at_tar
from tests.learner_data import blobs

# --------------------------------------------------------------------------- metrics by hand


def test_auroc_by_hand_with_ties():
    known, unknown = [3, 2, 2, 1], [2, 1, 0]
    # pairs won: 3 -> 3; each 2 -> 1 + 1 + tie 0.5 = 2.5; 1 -> tie 0.5 + 1 = 1.5; total 9.5 of 12
    assert auroc(known, unknown) == pytest.approx(9.5 / 12)
    assert auroc([1, 1], [1, 1, 1]) == pytest.approx(0.5)  # all tied: chance
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0
    assert math.isnan(auroc([], [1])) and math.isnan(auroc([1], []))


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    k, u = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 30).astype(float)  # many ties
    pairs = (k[:, None] > u[None, :]).sum() + 0.5 * (k[:, None] == u[None, :]).sum()
    assert auroc(k, u) == pytest.approx(pairs / (40 * 30))


def test_far_at_tar_by_hand_with_ties():
    known, unknown = [3, 2, 2, 1], [2, 1, 0]
    # 95% of 4 known -> all 4 must be accepted: threshold 1, unknown >= 1: {2, 1}
    assert threshold_at_tar(known, 0.95) == 1.0
    assert far_at_tar(known, unknown, 0.95) == pytest.approx(2 / 3)
    # 50% -> the 2nd largest known, 2; its tie accepts 3 of 4 known; unknown >= 2: {2}
    assert threshold_at_tar(known, 0.5) == 2.0
    assert far_at_tar(known, unknown, 0.5) == pytest.approx(1 / 3)
    assert far_at_tar(known, unknown, 0.75) == pytest.approx(1 / 3)
    # 0.95 * 20 = 19 exactly: the 19th largest of 1..20 (= 2), not the 20th
    assert threshold_at_tar(np.arange(1, 21), 0.95) == 2.0
    assert far_at_tar(np.arange(1, 21), [1.5, 2.0, 2.5], 0.95) == pytest.approx(2 / 3)
    assert math.isnan(far_at_tar([], [1.0])) and math.isnan(far_at_tar([1.0], []))
    with pytest.raises(ValueError):
        threshold_at_tar([1.0], 0.0)


def test_rejection_rates():
    r = rejection_rates([0.1, 0.5, 0.9, 0.5], [0.2, 0.6], threshold=0.5)
    assert r == {"false_rejection": 0.25, "false_acceptance": 0.5}  # a score equal to the threshold is accepted


# --------------------------------------------------------------------------- the threshold rule


def test_detector_threshold_is_the_conformal_order_statistic():
    det = UnknownDetector(target_frr=0.05).fit(np.arange(1, 100, dtype=float))  # 99 scores: floor(0.05 * 100) = 5
    assert det.threshold == 5.0 and det.n_samples == 99
    assert det.reject([4.9, 5.0, 6.0]).tolist() == [True, False, False]
    # too few scores to reject anything at 5%
    assert UnknownDetector(target_frr=0.05).fit([1.0, 2.0, 3.0]).threshold == -math.inf


def test_detector_false_rejection_on_fresh_scores_near_target():
    rng = np.random.default_rng(1)
    n_val, n_fresh, target = 2000, 200_000, 0.05
    det = UnknownDetector(target_frr=target).fit(rng.normal(size=n_val))
    frr = float(det.reject(rng.normal(size=n_fresh)).float().mean())
    tol = 4 * math.sqrt(target * (1 - target) * (1 / n_val + 1 / n_fresh))  # sampling of both sets
    assert abs(frr - target) < tol, (frr, tol)
    # averaged over many small calibration sets the rate is at most the target (here exactly 5 / 100)
    rates = [float(UnknownDetector(target_frr=target).fit(rng.normal(size=99)).reject(rng.normal(size=2000))
                   .float().mean()) for _ in range(300)]
    assert abs(np.mean(rates) - 0.05) < 4 * np.std(rates) / math.sqrt(300) + 0.002


def test_detector_round_trip_and_validation():
    det = UnknownDetector(score="energy", target_frr=0.1).fit(np.linspace(0, 1, 50))
    d = json.loads(json.dumps(det.to_dict()))
    assert UnknownDetector.from_dict(d) == det
    unfitted = UnknownDetector()
    assert unfitted.to_dict()["threshold"] is None
    assert UnknownDetector.from_dict(json.loads(json.dumps(unfitted.to_dict()))) == unfitted
    with pytest.raises(ValueError, match="score kind"):
        UnknownDetector(score="nope")
    with pytest.raises(ValueError, match="target_frr"):
        UnknownDetector(target_frr=1.0)


# --------------------------------------------------------------------------- scores


def test_score_kinds_by_hand():
    s = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(known_score_from(s, "max_score"), torch.tensor([2.0, 1.0], dtype=torch.float64))
    msp = known_score_from(s, "msp", temperature=2.0)
    assert msp[0] == pytest.approx(1 / (1 + math.exp(-1))) and msp[1] == pytest.approx(0.5)
    energy = known_score_from(s, "energy", temperature=2.0)
    assert energy[1] == pytest.approx(2.0 * math.log(2 * math.exp(0.5)))
    with pytest.raises(ValueError, match="embeddings"):
        known_score_from(s, "mahalanobis")


def test_mahalanobis_matches_explicit_inverse():
    X, y, _ = blobs([0, 1, 2], 30, d=5, seed=2)
    lda = make_learner("lda", shrinkage=0.2).partial_fit(X, y)
    Q = torch.randn(7, 5, dtype=torch.float64)
    eps = 0.2
    P = torch.linalg.inv((1 - eps) * lda.covariance_ + eps * torch.eye(5, dtype=torch.float64))
    diff = Q[:, None, :] - lda.means_[None, :, :]
    want = torch.einsum("ncd,de,nce->nc", diff, P, diff)
    assert torch.allclose(mahalanobis_distances(lda, Q), want, rtol=1e-9, atol=1e-9)
    with pytest.raises(TypeError, match="LDA-style"):
        mahalanobis_distances(make_learner("ncm").partial_fit(X, y), Q)


def test_relative_mahalanobis_matches_one_gaussian_of_all_clips():
    X, y, _ = blobs([0, 1, 2], 30, d=5, seed=2)
    lda = make_learner("lda", shrinkage=0.2).partial_fit(X, y)
    Q = torch.randn(7, 5, dtype=torch.float64)
    Xd = X.double()
    mu = Xd.mean(0)
    cov = (Xd - mu).T @ (Xd - mu) / len(Xd)  # equal classes: within + between = the pooled covariance
    P = torch.linalg.inv(0.8 * cov + 0.2 * torch.eye(5, dtype=torch.float64))
    want = torch.einsum("nd,de,ne->n", Q - mu, P, Q - mu)
    assert torch.allclose(background_distances(lda, Q), want, rtol=1e-9, atol=1e-9)
    rel = known_score(lda, Q, "relative_mahalanobis")
    assert torch.allclose(rel, want - mahalanobis_distances(lda, Q).min(1).values)
    with pytest.raises(TypeError, match="LDA-style"):
        known_score(make_learner("ncm").partial_fit(X, y), Q, "relative_mahalanobis")


# --------------------------------------------------------------------------- detection on separable data


def _open_set_data(seed=0, d=16, known=6, unknown=4, per_class=500):
    labels = list(range(known + unknown))
    X, y, centres = blobs(labels, per_class, d=d, seed=seed, spread=1.0)
    Xf, yf, _ = blobs(labels, per_class, d=d, seed=seed + 7, spread=1.0, centres=centres)
    k, kf = y < known, yf < known
    return X[k], y[k], Xf[kf], Xf[~kf]


@pytest.mark.parametrize("name,params,score", [("lda", {"shrinkage": 0.1}, "mahalanobis"),
                                               ("lda", {"shrinkage": 0.1}, "relative_mahalanobis"),
                                               ("ncm", {}, "max_score"),
                                               ("analytic", {"buffer_size": 256, "gamma": 1.0}, "energy")])
def test_unknown_classes_rejected_known_ones_at_the_target_rate(name, params, score):
    X, y, X_known, X_unknown = _open_set_data()
    learner = make_learner(name, **params).partial_fit(X, y)
    cal = HeldOutCalibration(make_learner(name, **params), score=score, target_frr=0.05, max_per_class=None)
    calibration = cal.update(X, y)
    n_val = len(cal.pool_y)
    assert n_val == 6 * 100
    known = calibration.predict(learner, X_known)
    unknown = calibration.predict(learner, X_unknown)
    frr = float(known.rejected.float().mean())
    tol = 4 * math.sqrt(0.05 * 0.95 * (1 / n_val + 1 / len(X_known)))
    assert abs(frr - 0.05) < tol, (frr, tol)
    assert float(unknown.rejected.float().mean()) > 0.9
    assert bool((unknown.labels == UNKNOWN).all() == unknown.rejected.all())
    assert auroc(known.score, unknown.score) > 0.97


def test_predict_threshold_override_and_disable():
    X, y, X_known, X_unknown = _open_set_data(per_class=100)
    learner = make_learner("ncm").partial_fit(X, y)
    cal = HeldOutCalibration(make_learner("ncm"), score="msp").update(X, y)
    Xq = torch.cat([X_known[:50], X_unknown[:50]])
    stored = cal.predict(learner, Xq)
    assert stored.threshold == cal.detector.threshold
    never = cal.predict(learner, Xq, threshold=-1.0)  # msp >= 0 > -1: nothing rejected
    always = cal.predict(learner, Xq, threshold=2.0)  # msp <= 1 < 2: everything rejected
    assert not never.rejected.any() and always.rejected.all() and (always.labels == UNKNOWN).all()
    off = cal.predict(learner, Xq, reject_unknown=False)
    assert not off.rejected.any() and torch.equal(off.labels, learner.predict(Xq))
    assert torch.equal(off.best, learner.predict(Xq)) and torch.allclose(off.proba.sum(1), torch.ones(100))
    # the same thing after a JSON round trip
    back = OpenSetCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    again = back.predict(learner, Xq)
    assert torch.equal(again.rejected, stored.rejected) and torch.equal(again.score, stored.score)


def test_known_score_uses_the_calibrated_temperature():
    X, y, _ = blobs([0, 1, 2], 20, d=4, seed=0)
    learner = make_learner("ncm").partial_fit(X, y)
    s = learner.decision_function(X).double()
    a = known_score(learner, X, "msp", Calibrator(temperature=0.5))
    assert torch.allclose(a, torch.softmax(s / 0.5, 1).max(1).values)
    assert torch.allclose(known_score(learner, X, "msp"), torch.softmax(s, 1).max(1).values)


# --------------------------------------------------------------------------- compare reports it


def test_compare_reports_open_set_per_session(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import earmark.experiments.compare as compare_mod
    from earmark.experiments import RunConfig
    from tests.test_calibration import _dataset_with_embeddings

    scenario, X, row_of = _dataset_with_embeddings()
    encoder = SimpleNamespace(encoder=torch.nn.Linear(2, 2))
    prep = SimpleNamespace(scenario=scenario, X=X, row_of=row_of, embedder=encoder,
                           inputs_for=lambda learner: X, total_bytes=lambda learner: learner.nbytes(),
                           training={"checkpoint": str(tmp_path / "encoder.partial.safetensors")})
    monkeypatch.setattr(compare_mod, "prepare", lambda config, embed_train_pool=False, writer=None: prep)
    monkeypatch.setattr(compare_mod, "encoder_summary", lambda prep: {"fake": True})
    config = RunConfig(out=str(tmp_path / "c"), learners=["ncm", "lda"], learner_params={"lda": {"shrinkage": 0.1}},
                       progress=False)
    results = compare_mod.compare(config, trials=2)
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "FAR@95" in printed and "ECE cal" in printed
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    for name in ("ncm", "lda"):
        rows = saved["learners"][name]["open_set_mean"]
        assert [r["session"] for r in rows] == [0, 1, 2]
        assert rows[0]["auroc"] is not None and 0 <= rows[0]["far95"] <= 1
        assert rows[-1]["auroc"] is None and rows[-1]["far95"] is None  # no classes left to come
        trials = saved["learners"][name]["trials"]
        assert len(trials) == 2 and len(trials[1]["open_set"]) == 3
        # the accuracy column is the accuracy matrix's seen accuracy, averaged over trials
        assert rows[1]["accuracy"] == pytest.approx(np.mean([t["seen_accuracy"][1] for t in trials]))
    assert results["learners"]["ncm"]["open_set_mean"] == saved["learners"]["ncm"]["open_set_mean"]


# --------------------------------------------------------------------------- the Model


@pytest.fixture(scope="module")
def tone_clips(tmp_path_factory):
    import soundfile as sf

    from tests.audio_fixtures import FREQS, RATE, write_class

    root = tmp_path_factory.mktemp("tones")
    clips = {name: write_class(root, name, freq, 40) for name, freq in FREQS.items()}
    rng = np.random.default_rng(0)
    (root / "noise").mkdir()
    clips["noise"] = []
    for i in range(10):  # broadband noise: a sound unlike any tone, for the untrained test encoder too
        path = root / "noise" / f"noise-{i}.wav"
        sf.write(path, (0.3 * rng.standard_normal(RATE)).astype(np.float32), RATE)
        clips["noise"].append(path)
    return clips


@pytest.fixture(scope="module")
def tone_embedder():
    from earmark.audio import AudioConfig
    from earmark.encoders.config import resolve_config
    from earmark.encoders.embedder import AudioEmbedder

    torch.manual_seed(0)
    return AudioEmbedder(resolve_config("fast"), AudioConfig(clip_seconds=1.0))


def test_model_rejects_an_unknown_sound_and_keeps_its_threshold_through_save_load(
    tone_embedder, tone_clips, tmp_path, capsys
):
    from earmark.model import Model

    model = Model.from_embedder(tone_embedder, "lda", {"shrinkage": 0.5})
    for name in ("low", "mid", "high"):
        model.learn(tone_clips[name][:35], name)
    cal = model.calibration.calibration
    assert cal.calibrator.n_samples == 21 and math.isfinite(cal.detector.threshold)  # 7 held out of 35 per label
    assert cal.detector.score == "relative_mahalanobis"
    known = [p for n in ("low", "mid", "high") for p in tone_clips[n][35:]]
    whistle = tone_clips["noise"]  # never taught
    preds = model.predict(known + whistle, top_k=2)
    rejected = [p.label == "unknown" for p in preds]
    assert sum(rejected[:15]) <= 3  # known sounds: about 5% false rejections (15 clips)
    assert sum(rejected[15:]) >= 5  # the never-taught noise is mostly unknown
    for p in preds:
        if p.label == "unknown":
            # its score (minus the squared Mahalanobis distance to the nearest mean) is below the threshold
            assert len(p.top) == 2 and p.top[1][0] in ("low", "mid", "high") and p.top[0][1] < cal.detector.threshold
    # a float overrides the stored threshold for one call; reject_unknown=False disables it
    assert all(p.label != "unknown" for p in model.predict(whistle, unknown_threshold=-math.inf))
    assert all(p.label == "unknown" for p in model.predict(known[:3], unknown_threshold=math.inf))
    assert all(p.label != "unknown" for p in model.predict(whistle, reject_unknown=False))
    # calibrated probabilities still sum to one over the labels
    full = model.predict(known[:2], top_k=3, reject_unknown=False)
    assert all(abs(sum(v for _, v in p.top) - 1) < 1e-5 for p in full)
    model.save(tmp_path / "m")
    loaded = Model.load(tmp_path / "m")
    assert loaded.calibration.calibration == cal
    assert [p.to_dict() for p in loaded.predict(known + whistle, top_k=2)] == [p.to_dict() for p in preds]
    # the CLI: the stored threshold, an override and --no-unknown
    from earmark.cli import main

    files = [str(whistle[0]), str(known[0])]
    capsys.readouterr()
    cli = ["predict", str(tmp_path / "m"), *files, "--window", "1s"]
    assert main(cli) == 0
    lines = [x.split("\t") for x in capsys.readouterr().out.strip().splitlines()]
    assert [x[2] for x in lines] == [preds[15].label, preds[0].label]
    assert main([*cli, "--unknown-threshold", "inf"]) == 0
    assert [x.split("\t")[2] for x in capsys.readouterr().out.strip().splitlines()] == ["unknown", "unknown"]
    assert main([*cli, "--no-unknown"]) == 0
    assert "unknown" not in capsys.readouterr().out
    # learning more continues the calibration; forgetting a label removes it from the shadow and the pool
    loaded.learn(tone_clips["whistle"][10:25], "whistle")
    assert "whistle" in loaded.labels and loaded.calibration.shadow.n_classes_ == 4
    loaded.forget("whistle")
    assert loaded.calibration.shadow.n_classes_ == 3 and len(loaded.calibration.pool_y) == 21
    assert loaded.calibration.calibration.detector.threshold == pytest.approx(cal.detector.threshold)
    # forgetting files: pool clips and shadow clips both go exactly
    loaded.forget(files=tone_clips["low"][:35])
    assert loaded.calibration.shadow.n_classes_ == 2 and len(loaded.calibration.pool_y) == 14
