"""Backbone-updating learners (finetune, joint, replay, icarl, lwf, ewc, fsa) on synthetic spectrograms."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from earmark.encoders import EncoderConfig, build_encoder
from earmark.learners import LEARNERS, ExemplarMemory, backbone_names, herding_order, make_learner

TINY = EncoderConfig(embed_dim=16, depth=1, d_state=2, expand=1, n_mels=16, patch=4, max_frames=32, pool="mean")
FAST = {"encoder": TINY.to_dict(), "epochs": 2, "base_epochs": 2, "head_epochs": 20, "batch_size": 16}
SMALL = {"replay": {"memory_clips": 12}, "icarl": {"memory_clips": 12}, "fsa": {"adapt_epochs": 1}}
NAMES = backbone_names()


def small(name: str, **kw):
    return make_learner(name, **{**FAST, **SMALL.get(name, {}), **kw})


def spectra(labels: list[int], per_class: int, seed: int = 0, noise: float = 0.5):
    """Each class is a fixed random (16 mel x 16 frame) pattern plus noise: separable, like blobs."""
    g = torch.Generator().manual_seed(1000 + seed)
    pattern = {c: torch.randn(16, 16, generator=torch.Generator().manual_seed(c)) for c in labels}
    X = torch.stack([pattern[c] + noise * torch.randn(16, 16, generator=g) for c in labels for _ in range(per_class)])
    y = torch.tensor(labels).repeat_interleave(per_class)
    perm = torch.randperm(len(y), generator=g)
    return X[perm], y[perm]


def accuracy(learner, labels, seed=9):
    X, y = spectra(labels, 10, seed=seed)
    return float((learner.predict(X) == y).float().mean())


def test_every_backbone_learner_is_registered_with_a_dataclass_config():
    assert set(NAMES) == {"finetune", "joint", "replay", "icarl", "lwf", "ewc", "fsa"}
    for name in NAMES:
        cfg = LEARNERS.get(name).Config()
        assert dataclasses.is_dataclass(cfg)
        assert LEARNERS.get(name).input_ndim == 3


@pytest.mark.parametrize("name", NAMES)
def test_protocol_partial_fit_grows_classes_predicts_and_round_trips(name):
    torch.manual_seed(0)
    learner = small(name)
    X, y = spectra([3, 7], 8)
    assert learner.partial_fit(X, y) is learner
    X2, y2 = spectra([7, 11], 8, seed=1)
    learner.partial_fit(X2, y2)
    assert learner.classes_.tolist() == [3, 7, 11]
    proba = learner.predict_proba(X2)
    assert proba.shape == (len(X2), 3)
    torch.testing.assert_close(proba.sum(1), torch.ones(len(X2)))
    assert torch.equal(learner.classes_[proba.argmax(1)], learner.predict(X2))
    # The whole state (encoder, head, exemplars, penalties) survives safetensors into a fresh learner.
    fresh = make_learner(name, **learner.config_dict())
    fresh.load_state_dict(st_load(st_save({k: v.contiguous() for k, v in learner.state_dict().items()})))
    torch.testing.assert_close(fresh.decision_function(X2), learner.decision_function(X2))
    assert fresh.nbytes() == learner.nbytes()


@pytest.mark.parametrize("name", NAMES)
def test_input_errors_name_the_problem(name):
    learner = small(name)
    with pytest.raises(ValueError, match="log-mel"):
        learner.partial_fit(torch.zeros(4, 16), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="mel bands"):
        learner.partial_fit(torch.zeros(4, 8, 16), [0, 0, 1, 1])
    bad = torch.zeros(2, 16, 16)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        learner.partial_fit(bad, [0, 1])


def test_init_encoder_copies_the_given_encoder_and_leaves_it_untouched():
    enc = build_encoder(TINY)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    learner = small("finetune").init_encoder(enc)
    X, y = spectra([0, 1], 8)
    learner.partial_fit(X, y)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in learner.encoder.state_dict().items())
    with pytest.raises(RuntimeError, match="before the first partial_fit"):
        learner.init_encoder(enc)


def sessions():
    return [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def run_sessions(learner, groups, per_class=12):
    for i, classes in enumerate(groups):
        X, y = spectra(classes, per_class, seed=i)
        learner.partial_fit(X, y)
    return learner


def old_accuracy(learner):
    """Mean accuracy over the class groups learned before the last session."""
    return sum(accuracy(learner, g) for g in sessions()[:-1]) / (len(sessions()) - 1)


def test_finetune_forgets_where_replay_does_not():
    torch.manual_seed(0)
    ft = run_sessions(small("finetune", epochs=6, base_epochs=6), sessions())
    torch.manual_seed(0)
    rp = run_sessions(small("replay", epochs=6, base_epochs=6, memory_clips=27), sessions())
    # Finetuning on the last session alone pushes every prediction to its classes; replay keeps the old ones.
    assert old_accuracy(ft) < 0.1
    assert old_accuracy(rp) > 0.5
    assert accuracy(ft, sessions()[-1]) > 0.9 and accuracy(rp, sessions()[-1]) > 0.9


@pytest.mark.parametrize("name", ["icarl", "lwf", "ewc", "fsa", "joint"])
def test_methods_against_forgetting_beat_finetune_on_old_classes(name):
    torch.manual_seed(0)
    ft = run_sessions(small("finetune", epochs=6, base_epochs=6), sessions())
    torch.manual_seed(0)
    kw = {"ewc": {"ewc_lambda": 1e4}, "fsa": {"adapt_epochs": 6}}.get(name, {})
    other = run_sessions(small(name, epochs=6, base_epochs=6, **kw), sessions())
    assert old_accuracy(other) > old_accuracy(ft) + 0.3


def test_replay_memory_is_class_balanced_within_the_budget_and_counted_in_bytes():
    learner = run_sessions(small("replay", memory_clips=10, epochs=1), sessions())
    counts = torch.bincount(learner.memory.cols, minlength=9)
    assert counts.tolist() == [1] * 9  # 10 // 9 classes = 1 each
    per_item = ExemplarMemory.bytes_per_item((16, 16))
    assert learner.memory.data.dtype == torch.float16
    assert learner.memory.data.numel() * 2 + learner.memory.cols.numel() * 8 == 9 * per_item
    tensors = list(learner.parameters()) + list(learner.buffers())
    assert learner.nbytes() == sum(t.numel() * t.element_size() for t in tensors)


def test_replay_budget_in_bytes_converts_to_clips():
    per_item = ExemplarMemory.bytes_per_item((16, 16))
    learner = run_sessions(small("replay", memory_bytes=6 * per_item + 5, epochs=1), sessions()[:2])
    assert len(learner.memory) == 6  # 6 clips over 6 classes


def test_joint_keeps_every_clip_and_refuses_a_budget():
    learner = run_sessions(small("joint", epochs=1), sessions(), per_class=4)
    assert len(learner.memory) == 9 * 4
    with pytest.raises(ValueError, match="replay"):
        make_learner("joint", memory_clips=5)


def test_herding_picks_the_sample_closest_to_the_mean_first_and_prefixes_stay_good():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 4, generator=g) + 3
    order = herding_order(emb, 10)
    f = torch.nn.functional.normalize(emb.double(), dim=1)
    mu = f.mean(0)
    assert int(order[0]) == int(((f - mu) ** 2).sum(1).argmin())
    assert len(set(order.tolist())) == 10
    # The mean of the first k herded samples approaches the class mean faster than the first k samples.
    err_herd = (f[order[:5]].mean(0) - mu).norm()
    err_first = (f[:5].mean(0) - mu).norm()
    assert err_herd < err_first


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it():
    learner = run_sessions(small("ewc", epochs=1), sessions()[:1])
    assert learner.fisher.shape == learner.anchor.shape and float(learner.fisher.sum()) > 0
    x = torch.zeros(1, 16, 16)
    assert float(learner._extra_loss(x, None, None)) == 0.0
    with torch.no_grad():
        for p in learner.encoder.parameters():
            p.add_(0.1)
    assert float(learner._extra_loss(x, None, None)) > 0.0


def test_fsa_film_trains_only_the_adapters_and_later_sessions_leave_the_encoder_alone():
    torch.manual_seed(0)
    enc = build_encoder(TINY)
    learner = small("fsa", adapter="film", adapt_epochs=3).init_encoder(enc)
    run_sessions(learner, sessions()[:1])
    for k, v in enc.state_dict().items():
        assert torch.equal(v, learner.encoder.state_dict()[k]), k
    assert float(learner.film_scale.abs().sum()) > 0
    snapshot = {k: v.clone() for k, v in learner.state_dict().items() if not k.startswith("head.")}
    X, y = spectra([3, 4], 6, seed=1)
    learner.partial_fit(X, y)
    for k, v in snapshot.items():
        if k in ("class_labels", "class_counts", "sessions_seen", "head_weight", "head_bias"):
            continue
        assert torch.equal(v, learner.state_dict()[k]), k
    assert learner.head.classes_.tolist() == [0, 1, 2, 3, 4]


def test_fsa_head_must_be_closed_form():
    with pytest.raises(ValueError, match="closed-form"):
        make_learner("fsa", head="replay")


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"batch_size": 0}, {"lr": 0.0}])
def test_invalid_schedule_values_raise(bad):
    with pytest.raises(ValueError):
        make_learner("finetune", **bad)
