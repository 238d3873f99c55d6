import json
from pathlib import Path

import numpy as np
import pytest

from earmark.data.dataset import AudioDataset
from earmark.scenarios import ClassIncremental, Session


def make_dataset(n_classes=10, train_per_class=8, test_per_class=3, short_class=None, short_count=2):
    """Fake paths only: items interleaved across classes so indices do not coincide with classes."""
    targets, folds = [], []
    for rep in range(train_per_class + test_per_class):
        for c in range(n_classes):
            if c == short_class and rep >= short_count and rep < train_per_class:
                continue
            targets.append(c)
            folds.append(1 if rep < train_per_class else 2)
    names = [f"class{c:02d}" for c in range(n_classes)]
    paths = [Path(f"/fake/{i}.wav") for i in range(len(targets))]
    return AudioDataset("synthetic", Path("/fake"), paths, np.array(targets), names, np.array(folds))


@pytest.fixture
def ds():
    return make_dataset()


def scenario(ds, **kw):
    train, test = ds.split(2)
    kw.setdefault("initial_increment", 4)
    kw.setdefault("increment", 2)
    return ClassIncremental(ds, train, test, **kw)


def test_default_order_is_seeded_permutation(ds):
    a, b, c = scenario(ds, seed=0), scenario(ds, seed=0), scenario(ds, seed=1)
    assert sorted(a.class_order.tolist()) == list(range(10))
    assert a.class_order.tolist() == b.class_order.tolist()
    assert a.class_order.tolist() != c.class_order.tolist()
    assert a.class_order.tolist() != list(range(10))  # actually shuffled
    assert a.class_order.tolist() == np.random.default_rng(0).permutation(10).tolist()


def test_given_order_respected_and_label_map(ds):
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    s = scenario(ds, class_order=order)
    assert s.class_order.tolist() == order
    assert s.label_map == {f"class{c:02d}": k for k, c in enumerate(order)}
    assert s.inverse_label_map == {k: f"class{c:02d}" for k, c in enumerate(order)}
    assert s.nb_classes == 10


def test_sessions_partition_classes(ds):
    s = scenario(ds, class_order=list(range(10))[::-1])
    assert len(s) == 4 and s.nb_sessions == 4
    assert [len(c) for c in s.session_classes] == [4, 2, 2, 2]
    allc = np.concatenate(s.session_classes)
    assert allc.tolist() == list(range(10))
    for i, sess in enumerate(s):
        assert isinstance(sess, Session) and sess.index == i
        assert sess.classes.tolist() == s.session_classes[i].tolist()
        assert sess.seen_classes.tolist() == np.concatenate(s.session_classes[: i + 1]).tolist()
    assert s[-1].index == 3 and s[-4].index == 0
    with pytest.raises(IndexError):
        s[4]
    with pytest.raises(IndexError):
        s[-5]


def test_increment_as_list(ds):
    s = scenario(ds, initial_increment=5, increment=[1, 3, 1])
    assert [len(c) for c in s.session_classes] == [5, 1, 3, 1]
    assert s.increments == [1, 3, 1]


def test_dense_targets(ds):
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    s = scenario(ds, class_order=order)
    idx = np.arange(len(ds))
    dense = s.dense_targets(idx)
    assert (np.asarray(order)[dense] == ds.targets).all()
    assert dense[ds.targets == 3].tolist() == [0] * int((ds.targets == 3).sum())
    # training labels of session 1 are exactly dense ids 4, 5
    assert set(s.dense_targets(s[1].train_indices).tolist()) == {4, 5}


def test_dense_targets_rejects_classes_outside_scenario(ds):
    s = scenario(ds, class_order=[0, 1, 2, 3, 4, 5], initial_increment=4, increment=2)
    with pytest.raises(ValueError, match="class09"):
        s.dense_targets(np.flatnonzero(ds.targets == 9)[:1])


def test_num_classes_restricts_order(ds):
    s = scenario(ds, num_classes=6, initial_increment=4, increment=1)
    full = scenario(ds)
    assert s.class_order.tolist() == full.class_order[:6].tolist()
    assert len(s) == 3
    # test items of classes outside the scenario are never used
    assert set(ds.targets[s[-1].test_indices].tolist()) == set(s.class_order.tolist())


def test_test_indices_are_seen_classes_test_items(ds):
    train, test = ds.split(2)
    s = scenario(ds)
    for sess in s:
        seen_original = s.class_order[sess.seen_classes]
        expected = np.sort(test[np.isin(ds.targets[test], seen_original)])
        assert sess.test_indices.tolist() == expected.tolist()
        assert set(sess.test_indices.tolist()) <= set(test.tolist())
        # training items come from the train split and only from the new classes
        assert set(sess.train_indices.tolist()) <= set(train.tolist())
        assert set(s.dense_targets(sess.train_indices).tolist()) == set(sess.classes.tolist())
    assert len(s[0].test_indices) == 4 * 3 and len(s[-1].test_indices) == 10 * 3


def test_shots_exact_per_new_class_and_base_all(ds):
    s = scenario(ds, shots=3)
    assert len(s[0].train_indices) == 4 * 8  # session 0 uses every item by default
    for sess in list(s)[1:]:
        labels = s.dense_targets(sess.train_indices)
        assert np.bincount(labels, minlength=10)[sess.classes].tolist() == [3] * len(sess.classes)
        assert len(sess.train_indices) == 3 * len(sess.classes)
    b = scenario(ds, shots=3, base_shots=5)
    labels = b.dense_targets(b[0].train_indices)
    assert np.bincount(labels)[b[0].classes].tolist() == [5] * 4


def test_shots_none_uses_all(ds):
    s = scenario(ds, shots=None)
    for sess in s:
        assert len(sess.train_indices) == 8 * len(sess.classes)


def test_shots_reproducible_and_trials_differ(ds):
    a, b = scenario(ds, shots=2), scenario(ds, shots=2)
    assert all(x.train_indices.tolist() == y.train_indices.tolist() for x, y in zip(a, b, strict=True))
    t1 = a.with_trial(1)
    t1_direct = scenario(ds, shots=2, trial=1)
    assert t1.class_order.tolist() == a.class_order.tolist()
    assert t1.trial == 1
    same = [x.train_indices.tolist() == y.train_indices.tolist() for x, y in zip(t1, t1_direct, strict=True)]
    assert all(same)
    differs = [x.train_indices.tolist() != y.train_indices.tolist() for x, y in zip(a, t1, strict=True)]
    assert not differs[0]  # base session uses all items in both trials
    assert all(differs[1:])
    # test sets never depend on the trial
    assert all(x.test_indices.tolist() == y.test_indices.tolist() for x, y in zip(a, t1, strict=True))


def test_sessions_sampled_independently(ds):
    """Changing what session 1 samples must not change session 2's support set."""
    a = scenario(ds, shots=2, initial_increment=4, increment=[2, 4])
    b = scenario(ds, shots=2, initial_increment=4, increment=[2, 4], class_order=a.class_order)
    assert a[2].train_indices.tolist() == b[2].train_indices.tolist()
    order2 = a.class_order.copy()
    order2[[4, 5]] = order2[[5, 4]]  # swap the two session-1 classes only
    c = scenario(ds, shots=2, initial_increment=4, increment=[2, 4], class_order=order2)
    assert a[2].train_indices.tolist() == c[2].train_indices.tolist()


def test_too_few_items_names_class():
    ds = make_dataset(short_class=7, short_count=2)
    with pytest.raises(ValueError, match=r"class07.*2 training items.*5 shots"):
        scenario(ds, class_order=list(range(10)), shots=5)
    # fine when that class is in the base session, which uses all items
    s = scenario(ds, class_order=[7, *range(7), 8, 9], shots=5)
    assert (ds.targets[s[0].train_indices] == 7).sum() == 2


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"class_order": [0, 1, 2, 2, 4, 5, 6, 7, 8, 9]}, r"duplicate class ids \[2\]"),
        ({"class_order": [0, 1, 2, 3, 4, 5, 6, 7, 8, 12]}, r"unknown class ids \[12\]"),
        ({"initial_increment": 4, "increment": 4}, r"6 remaining classes.*not a multiple of increment 4"),
        ({"initial_increment": 4, "increment": [2, 2]}, r"4 \+ sum\(increment\) 4 = 8.*10 classes"),
        ({"initial_increment": 11}, r"initial_increment 11 is larger than the 10"),
        ({"initial_increment": 0}, r"initial_increment must be >= 1"),
        ({"increment": 0}, r"increment must be >= 1"),
        ({"shots": 0}, r"shots must be >= 1"),
        ({"num_classes": 11}, r"num_classes must be in 1..10"),
    ],
)
def test_invalid_configs(ds, kw, message):
    with pytest.raises(ValueError, match=message):
        scenario(ds, **kw)


def test_overlapping_train_test_rejected(ds):
    train, test = ds.split(2)
    with pytest.raises(ValueError, match="both train_indices and test_indices"):
        ClassIncremental(ds, train, np.concatenate([test, train[:1]]), initial_increment=4, increment=2)


def test_single_session(ds):
    s = scenario(ds, initial_increment=10, increment=5)
    assert len(s) == 1 and len(s[0].test_indices) == 30


def test_to_dict_is_json(ds):
    s = scenario(ds, shots=2, seed=3)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["class_order"] == s.class_order.tolist()
    assert d["class_names"] == [ds.class_names[c] for c in s.class_order]
    assert d["increments"] == [2, 2, 2] and d["initial_increment"] == 4
    assert d["session_classes"] == [c.tolist() for c in s.session_classes]
    assert d["shots"] == 2 and d["seed"] == 3 and d["trial"] == 0
    assert d["label_map"] == s.label_map
