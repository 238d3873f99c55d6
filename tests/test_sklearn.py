"""The scikit-learn adapter: check_estimator, open label sets with arbitrary labels, Pipeline and clone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from earmark.sklearn import IncrementalClassifier, embedding_learners  # noqa: E402

# No check is skipped or expected to fail (see the module docstring of earmark.sklearn).
ESTIMATORS = [
    IncrementalClassifier("ncm"),
    IncrementalClassifier("lda", {"shrinkage": 0.1}),
    IncrementalClassifier("analytic", {"buffer_size": 64}),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_compatible(estimator, check) -> None:
    check(estimator)


def _blobs(seed: int = 0, n: int = 30, labels=("dog", "cat", "bird")) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(labels), 8)) * 4
    y = np.array(labels)[np.arange(n) % len(labels)]
    X = centers[np.arange(n) % len(labels)] + rng.normal(size=(n, 8))
    return X, y


@pytest.mark.parametrize("name", ["ncm", "lda", "analytic"])
def test_string_labels_round_trip(name: str) -> None:
    X, y = _blobs()
    clf = IncrementalClassifier(name, {"buffer_size": 64} if name == "analytic" else None).fit(X, y)
    assert clf.classes_.tolist() == ["bird", "cat", "dog"]
    assert clf.n_features_in_ == 8
    pred = clf.predict(X)
    assert set(pred.tolist()) <= {"bird", "cat", "dog"} and (pred == y).mean() > 0.9
    proba = clf.predict_proba(X)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (clf.classes_[proba.argmax(1)] == pred).all()
    assert clf.decision_function(X).shape == (30, 3)


def test_partial_fit_grows_classes() -> None:
    X, y = _blobs(labels=(3, 1, 7, 20))
    old = y != 20
    clf = IncrementalClassifier("lda", {"shrinkage": 0.1}).partial_fit(X[old], y[old])
    assert clf.classes_.tolist() == [1, 3, 7]
    assert clf.predict_proba(X).shape == (30, 3)
    clf.partial_fit(X[~old], y[~old])
    assert clf.classes_.tolist() == [1, 3, 7, 20]
    assert clf.predict_proba(X).shape == (30, 4)
    assert (clf.predict(X) == y).mean() > 0.9
    # The same as a batch fit: LDA's statistics are exact under any split.
    batch = IncrementalClassifier("lda", {"shrinkage": 0.1}).fit(X, y)
    np.testing.assert_allclose(clf.decision_function(X), batch.decision_function(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not in classes"):
        clf.partial_fit(X[:3], y[:3], classes=[1, 2])


def test_pipeline_with_scaler_and_clone() -> None:
    X, y = _blobs(seed=1)
    pipe = make_pipeline(StandardScaler(), IncrementalClassifier("analytic", {"buffer_size": 128, "gamma": 1.0}))
    pipe.fit(X, y)
    assert pipe.score(X, y) > 0.9
    params = pipe.get_params()
    assert params["incrementalclassifier__learner"] == "analytic"
    pipe.set_params(incrementalclassifier__learner="ncm", incrementalclassifier__params=None)
    twin = clone(pipe)
    assert twin.get_params()["incrementalclassifier__learner"] == "ncm"
    assert not hasattr(twin[-1], "learner_")
    np.testing.assert_array_equal(twin.fit(X, y).predict(X), pipe.fit(X, y).predict(X))


def test_rejects_log_mel_learners() -> None:
    assert "ncm" in embedding_learners() and "replay" not in embedding_learners()
    X, y = _blobs()
    with pytest.raises(ValueError, match="log-mel"):
        IncrementalClassifier("replay").fit(X, y)
    with pytest.raises(ValueError, match="unknown option"):
        IncrementalClassifier("ncm", {"nope": 1}).fit(X, y)


def test_import_earmark_does_not_import_sklearn() -> None:
    code = "import sys, earmark, earmark.learners; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
