"""A scikit-learn estimator around earmark's learners on embeddings (``pip install earmark[sklearn]``).

:class:`IncrementalClassifier` wraps any learner that reads embeddings ``(n, d)`` (``ncm``, ``teen``,
``lda``, ``analytic``, ``ranpac``, ``dsal``, ``fetril``; not the backbone learners, which train on log-mel)
behind scikit-learn's conventions, so it works in a ``Pipeline``, with ``clone``, ``GridSearchCV`` etc.::

    clf = IncrementalClassifier("lda", {"shrinkage": 0.1}).fit(X_base, y_base)
    clf.partial_fit(X_new, y_new)        # labels never seen before become new classes
    clf.predict(X)                       # original label values (ints, strings, ...)

* ``fit`` starts a fresh learner; ``partial_fit`` continues (the first call starts one). The label set
  is open: any hashable, sortable labels (ints, strings) are accepted, and labels not seen so far are
  added. ``classes_`` is the sorted array of labels seen, and the columns of ``predict_proba`` and
  ``decision_function`` follow it (they are permuted from the learner's first-appearance order).
  ``partial_fit``'s ``classes`` argument is accepted for API compatibility: earmark learners need
  samples of a class to score it, so a listed class gets a column when its first samples arrive.
* Binary problems follow scikit-learn: ``decision_function`` is 1-D, ``s_1 - s_0`` (positive means
  ``classes_[1]``), which ranks samples as ``predict_proba[:, 1]`` does.
* Outputs are numpy float64 (the learners return float32 tensors). ``learner_`` is the fitted earmark
  learner, e.g. to save it or export it to ONNX (:func:`earmark.export.export_onnx`).

``sklearn.utils.estimator_checks.check_estimator`` passes for ``ncm``, ``lda`` and ``analytic`` with
no check skipped and none expected to fail (``tests/test_sklearn.py``; scikit-learn 1.9). Checks on
sample weights do not run: ``fit`` takes no ``sample_weight`` (the learners have no weighted update).
scikit-learn itself skips two checks when their dependency is missing: the array-API check (needs
``SCIPY_ARRAY_API=1``; the adapter converts inputs to numpy) and the pandas-input check (needs pandas).

Importing ``earmark`` does not import this module or scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from earmark.learners.base import LEARNERS, IncrementalLearner, make_learner

__all__ = ["IncrementalClassifier", "embedding_learners"]


def embedding_learners() -> list[str]:
    """Registered learners that read embeddings ``(n, d)``: the ones this adapter can wrap."""
    return [name for name in LEARNERS.names() if LEARNERS.get(name).input_ndim == 2]


class IncrementalClassifier(ClassifierMixin, BaseEstimator):
    """scikit-learn classifier over an earmark learner: ``learner`` names it, ``params`` its config overrides.

    ``IncrementalClassifier("analytic", {"buffer_size": 1024, "gamma": 1.0})`` wraps
    ``make_learner("analytic", buffer_size=1024, gamma=1.0)``. Both arguments are stored as given
    (scikit-learn's convention); they are validated by ``fit`` / the first ``partial_fit``.
    """

    def __init__(self, learner: str = "analytic", params: dict[str, Any] | None = None) -> None:
        self.learner = learner
        self.params = params

    # ----------------------------------------------------------------- fitting

    def fit(self, X: Any, y: Any) -> IncrementalClassifier:
        """Fit a fresh learner on (X, y); any previous state is discarded."""
        X, y = validate_data(self, X, y, reset=True, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self._start()
        return self._learn(X, y)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> IncrementalClassifier:
        """Learn from one more batch; the first call starts the learner. Unseen labels become classes.

        ``classes`` (all labels that may ever appear) is optional and only checked for consistency with
        ``y``: a class gets its column when its first samples arrive.
        """
        first = not hasattr(self, "learner_")
        X, y = validate_data(self, X, y, reset=first, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        if classes is not None:
            missing = np.setdiff1d(np.unique(y), np.asarray(classes))
            if len(missing):
                raise ValueError(f"partial_fit: y has labels {missing.tolist()} not in classes={list(classes)}")
        if first:
            self._start()
        return self._learn(X, y)

    def _start(self) -> None:
        if not isinstance(self.learner, str):
            raise TypeError(f"learner must be a learner name (str), got {type(self.learner).__name__}")
        if LEARNERS.get(self.learner).input_ndim != 2:
            raise ValueError(
                f"learner {self.learner!r} trains on log-mel, not embeddings; "
                f"learners on embeddings: {', '.join(embedding_learners())}"
            )
        params = {} if self.params is None else dict(self.params)
        self.learner_: IncrementalLearner = make_learner(self.learner, **params)
        self.classes_ = np.zeros(0)
        self._label_ids: dict[Any, int] = {}

    def _learn(self, X: np.ndarray, y: np.ndarray) -> IncrementalClassifier:
        y = column_or_1d(y)
        uniq, inverse = np.unique(y, return_inverse=True)
        for label in uniq.tolist():
            self._label_ids.setdefault(label, len(self._label_ids))
        ids = np.array([self._label_ids[label] for label in uniq.tolist()], dtype=np.int64)[inverse]
        self.learner_.partial_fit(torch.tensor(X), torch.from_numpy(ids))
        seen = np.concatenate([self.classes_, uniq]) if len(self.classes_) else uniq
        self.classes_ = np.unique(seen)
        return self

    # ----------------------------------------------------------------- prediction

    def _columns(self) -> np.ndarray:
        """For each entry of ``classes_``, its column in the learner's outputs."""
        column_of_id = np.empty(len(self.classes_), dtype=np.int64)
        column_of_id[self.learner_.classes_.cpu().numpy()] = np.arange(len(self.classes_))
        return column_of_id[[self._label_ids[label] for label in self.classes_.tolist()]]

    def _outputs(self, X: Any, method: str) -> np.ndarray:
        check_is_fitted(self, "learner_")
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        out = getattr(self.learner_, method)(torch.tensor(X))
        return out.cpu().double().numpy()[:, self._columns()]

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores ``(n, n_classes)`` in ``classes_`` order; binary: ``(n,)``, positive for ``classes_[1]``."""
        scores = self._outputs(X, "decision_function")
        if scores.shape[1] == 2:
            return scores[:, 1] - scores[:, 0]
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X: Any) -> np.ndarray:
        """The learner's ``predict_proba`` ``(n, n_classes)``, columns in ``classes_`` order."""
        return self._outputs(X, "predict_proba")

    def predict_log_proba(self, X: Any) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Original label values of the highest-scoring class."""
        best = self._outputs(X, "decision_function").argmax(axis=1)
        return self.classes_[best]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
