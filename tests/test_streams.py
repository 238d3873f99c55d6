"""Blurry (Si-Blurry style) scenarios and the online test-then-train protocol."""

from pathlib import Path

import numpy as np
import pytest
import torch

from earmark.data.dataset import AudioDataset
from earmark.learners import AnalyticLearner, joint_ridge, make_learner
from earmark.metrics import AccuracyMatrix
from earmark.scenarios import BlurryIncremental, ClassIncremental, Session, evaluate_online, online_stream

torch.set_num_threads(1)


def make_dataset(n_classes: int = 12, train_per_class: int = 20, test_per_class: int = 3) -> AudioDataset:
    """Fake paths only; classes interleaved so indices do not coincide with classes."""
    targets, folds = [], []
    for rep in range(train_per_class + test_per_class):
        for c in range(n_classes):
            targets.append(c)
            folds.append(1 if rep < train_per_class else 2)
    paths = [Path(f"/fake/{i}.wav") for i in range(len(targets))]
    names = [f"class{c:02d}" for c in range(n_classes)]
    return AudioDataset("synthetic", Path("/fake"), paths, np.array(targets), names, np.array(folds))


@pytest.fixture
def ds() -> AudioDataset:
    return make_dataset()


def blurry(ds: AudioDataset, **kw) -> BlurryIncremental:
    train, test = ds.split(2)
    kw.setdefault("num_sessions", 4)
    kw.setdefault("disjoint_fraction", 0.5)
    kw.setdefault("blurry_fraction", 0.3)
    return BlurryIncremental(ds, train, test, **kw)


def embeddings(ds: AudioDataset, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, dict[int, int]]:
    """Well-separated class clusters, one row per dataset item."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ds.num_classes, dim)) * 3
    X = centers[ds.targets] + rng.normal(size=(len(ds), dim)) * 0.5
    return torch.as_tensor(X, dtype=torch.float32), {i: i for i in range(len(ds))}


# -- blurry scenarios ---------------------------------------------------------------------------------


def test_every_training_item_in_exactly_one_session(ds):
    s = blurry(ds)
    train, _ = ds.split(2)
    allt = np.concatenate([x.train_indices for x in s])
    assert len(allt) == len(np.unique(allt))
    assert sorted(allt.tolist()) == sorted(train.tolist())
    for i, sess in enumerate(s):
        assert isinstance(sess, Session) and sess.index == i
        assert len(sess.train_indices) > 0


def test_classes_recur_and_sessions_are_uneven(ds):
    s = blurry(ds, blurry_fraction=0.3)
    introduced: dict[int, int] = {}
    recurring = 0
    for sess in s:
        present = np.unique(s.dense_targets(sess.train_indices))
        recurring += sum(c in introduced for c in present.tolist())
        for c in present.tolist():
            introduced.setdefault(c, sess.index)
    assert recurring > 0  # some classes seen before show up again
    multi = [c for c in range(s.nb_classes) if sum(c in s.dense_targets(x.train_indices) for x in s) > 1]
    assert len(multi) > 0
    assert not set(multi) & set(s.disjoint_classes.tolist())  # disjoint classes never recur
    assert len(set(len(x.train_indices) for x in s)) > 1
    assert len(set(len(c) for c in s.session_classes)) > 1
    assert len(set(s.session_class_counts())) > 1
    # first appearances are the sessions' new classes
    for sess in s:
        assert sorted(c for c, i in introduced.items() if i == sess.index) == sess.classes.tolist()


def test_no_recurrence_without_blurry_fraction(ds):
    s = blurry(ds, disjoint_fraction=0.0, blurry_fraction=0.0)
    for sess in s:
        assert np.unique(s.dense_targets(sess.train_indices)).tolist() == sess.classes.tolist()


def test_new_classes_partition_and_seen_grow(ds):
    s = blurry(ds)
    allc = np.concatenate(s.session_classes)
    assert allc.tolist() == list(range(s.nb_classes))
    assert all(len(c) >= 1 for c in s.session_classes)
    prev = 0
    for sess in s:
        assert sess.classes.tolist() == s.session_classes[sess.index].tolist()
        assert sess.seen_classes.tolist() == np.concatenate(s.session_classes[: sess.index + 1]).tolist()
        dense = s.dense_targets(sess.test_indices)
        assert set(dense.tolist()) == set(sess.seen_classes.tolist())
        assert len(sess.test_indices) > prev
        prev = len(sess.test_indices)
    assert len(s[-1].test_indices) == len(ds.split(2)[1])
    assert sorted(s.label_map.values()) == list(range(s.nb_classes))
    assert s.label_map[ds.class_names[s.class_order[3]]] == 3
    d = s.to_dict()
    assert d["kind"] == "blurry" and d["session_classes"] == [c.tolist() for c in s.session_classes]
    assert d["train_items"] == [len(x.train_indices) for x in s]


def test_deterministic_per_seed_and_trial(ds):
    a, b, c = blurry(ds, seed=3), blurry(ds, seed=3), blurry(ds, seed=4)

    def fingerprint(s):
        return [x.train_indices.tolist() for x in s], s.class_order.tolist()

    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    t1 = a.with_trial(1)
    assert t1.source_order.tolist() == a.source_order.tolist()
    assert t1.home_sessions.tolist() != [] and t1.disjoint_classes.size == a.disjoint_classes.size
    assert fingerprint(t1)[0] != fingerprint(a)[0]
    assert fingerprint(a.with_trial(0)) == fingerprint(a)


def test_disjoint_only_reduces_to_class_incremental(ds):
    s = blurry(ds, disjoint_fraction=1.0, blurry_fraction=0.3, seed=2)
    sizes = [len(c) for c in s.session_classes]
    train, test = ds.split(2)
    ci = ClassIncremental(ds, train, test, initial_increment=sizes[0], increment=sizes[1:],
                          class_order=s.class_order)
    assert s.class_order.tolist() == s.source_order.tolist()
    assert len(s) == len(ci)
    for a, b in zip(s, ci, strict=True):
        assert a.classes.tolist() == b.classes.tolist()
        assert a.seen_classes.tolist() == b.seen_classes.tolist()
        assert a.train_indices.tolist() == b.train_indices.tolist()
        assert a.test_indices.tolist() == b.test_indices.tolist()


def test_validation(ds):
    with pytest.raises(ValueError, match="num_sessions"):
        blurry(ds, num_sessions=13)
    with pytest.raises(ValueError, match="blurry_fraction"):
        blurry(ds, blurry_fraction=1.0)
    with pytest.raises(ValueError, match="disjoint_fraction"):
        blurry(ds, disjoint_fraction=1.5)


# -- online protocol ----------------------------------------------------------------------------------


def test_online_stream_sees_each_item_once_in_batches(ds):
    s = blurry(ds)
    batches = list(online_stream(s, batch_size=7, seed=1))
    allb = np.concatenate([b.indices for b in batches])
    assert sorted(allb.tolist()) == sorted(np.concatenate([x.train_indices for x in s]).tolist())
    for sess in s:
        mine = [b for b in batches if b.session == sess.index]
        assert [b.step for b in mine] == list(range(len(mine)))
        assert all(len(b.indices) == 7 for b in mine[:-1]) and 1 <= len(mine[-1].indices) <= 7
        assert sorted(np.concatenate([b.indices for b in mine]).tolist()) == sess.train_indices.tolist()
    assert [b.session for b in batches] == sorted(b.session for b in batches)  # sessions in order
    first = np.concatenate([b.indices for b in batches if b.session == 0])
    assert first.tolist() != s[0].train_indices.tolist()  # shuffled
    again = list(online_stream(s, batch_size=7, seed=1))
    assert all(np.array_equal(x.indices, y.indices) for x, y in zip(batches, again, strict=True))
    assert len(list(online_stream(s[0], batch_size=100))) == 1 + (len(s[0].train_indices) - 1) // 100
    with pytest.raises(ValueError, match="batch_size"):
        list(online_stream(s, batch_size=0))


def test_test_then_train_predicts_before_fitting(ds):
    s = blurry(ds)
    X, row_of = embeddings(ds)
    res = evaluate_online(make_learner("ncm"), s, X, row_of, batch_size=4, seed=0)
    batches = list(online_stream(s, batch_size=4, seed=0))
    assert res.batch_sizes.tolist() == [len(b.indices) for b in batches]
    assert res.batch_sessions.tolist() == [b.session for b in batches]
    assert res.batch_correct[0] == 0  # nothing learned yet
    # a batch's items of a class never seen before cannot be predicted correctly by ncm
    seen: set[int] = set()
    bound = []
    for b in batches:
        y = s.dense_targets(b.indices)
        bound.append(int(np.isin(y, list(seen)).sum()))
        seen |= set(y.tolist())
    assert (res.batch_correct <= np.asarray(bound)).all()
    assert (np.asarray(bound) < res.batch_sizes).any()  # the bound is binding somewhere
    assert res.prequential_accuracy() > 0.5  # separable clusters: later batches are mostly right
    assert res.curve.shape == (len(batches),) and np.isclose(res.curve[-1], res.prequential_accuracy())
    assert res.to_dict()["batch_sizes"] == res.batch_sizes.tolist()


def test_final_matrix_matches_manual_computation(ds):
    s = blurry(ds, seed=1)
    X, row_of = embeddings(ds, seed=1)
    res = evaluate_online(make_learner("ncm"), s, X, row_of, batch_size=5, seed=2)
    manual = AccuracyMatrix.empty(len(s))
    Xn = X.double().numpy()
    for sess in s:
        train = np.concatenate([s[j].train_indices for j in range(sess.index + 1)])
        y = s.dense_targets(train)
        classes = np.unique(y)
        means = np.stack([Xn[train[y == c]].mean(0) for c in classes])
        means /= np.linalg.norm(means, axis=1, keepdims=True)
        xt = Xn[sess.test_indices] / np.linalg.norm(Xn[sess.test_indices], axis=1, keepdims=True)
        pred = classes[(xt @ means.T).argmax(1)]
        manual.record(sess.index, s.dense_targets(sess.test_indices), pred, s.session_classes)
    assert np.array_equal(res.matrix.counts, manual.counts)
    assert np.array_equal(res.matrix.correct, manual.correct)
    assert res.matrix.counts[-1].sum() == len(s[-1].test_indices)


def test_skipped_items_are_left_out(ds):
    s = blurry(ds)
    X, row_of = embeddings(ds)
    drop = int(s[1].train_indices[0])
    row_of = {i: r for i, r in row_of.items() if i != drop}
    res = evaluate_online(make_learner("ncm"), s, X, row_of, batch_size=8)
    assert res.batch_sizes.sum() == sum(len(x.train_indices) for x in s) - 1


def test_online_analytic_matches_joint_ridge_with_recurring_classes(ds):
    s = blurry(ds, blurry_fraction=0.4, seed=5)
    assert any(len(np.unique(s.dense_targets(x.train_indices))) > len(x.classes) for x in s)
    X, row_of = embeddings(ds, dim=8)
    learner = make_learner("analytic", buffer_size=64, gamma=1.0)
    assert isinstance(learner, AnalyticLearner)
    res = evaluate_online(learner, s, X, row_of, batch_size=3, seed=0)
    order = np.concatenate([b.indices for b in online_stream(s, batch_size=3, seed=0)])
    y = s.dense_targets(order)
    classes = learner.classes_.cpu().numpy()
    Y = torch.as_tensor(y[:, None] == classes[None, :], dtype=torch.float64)
    W = joint_ridge(learner.expand(X[order]), Y, 1.0)
    assert torch.allclose(learner.weights_, W, atol=1e-8, rtol=1e-6)
    assert res.matrix.last_accuracy() > 0.8
