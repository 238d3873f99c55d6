"""The class-incremental learner protocol: ``partial_fit`` on frozen embeddings with an open label set.

Learners follow scikit-learn's manners (``partial_fit`` returns ``self``; ``predict``,
``predict_proba``, ``decision_function``, ``classes_``) and river's open label set: a batch may carry
labels never seen before, which are appended to ``classes_`` in order of first appearance, and a
class may recur in later batches. All learned state lives in tensors registered on the module, so
``state_dict`` is the whole learner (the config is a JSON-serializable dataclass kept beside it).
Buffers whose shapes depend on the data (class count, feature width) are resized on load, so a
state dict loads into a fresh, unfitted learner of the same config.

Public outputs are float32 (``decision_function``, ``predict_proba``); learners compute internally
in float64 so that incremental updates stay exact.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from earmark.registry import Registry

ArrayLike = Any  # Tensor, numpy array or nested sequence


class NotFittedError(RuntimeError):
    """A learner was asked to predict (or expand) before it saw any data."""


class ForgetUnsupportedError(ValueError):
    """The learner cannot remove what it learned exactly (its state is not a sum over samples)."""


class MergeUnsupportedError(ValueError):
    """The learner's state is not additive: two learners cannot be combined into the learner of the union."""


@dataclass
class LearnerConfig:
    """Base for learner configs: plain JSON-friendly fields only, so ``dataclasses.asdict`` round-trips."""

    def result_dict(self) -> dict:
        """The fields that decide what is learned (for checkpoint fingerprints): all of them, unless a
        config has fields that only say how (e.g. a checkpoint interval)."""
        return dataclasses.asdict(self)


class ResizableBuffersModule(nn.Module):
    """A module whose buffers may change shape as data arrive; loading resizes them to the stored shape.

    ``nn.Module.load_state_dict`` copies into existing tensors and refuses shape mismatches; learners
    grow with every new class, so before copying we replace each buffer by an empty tensor of the
    incoming shape (keeping our dtype and device). After loading, ``_check_state`` verifies that
    the shapes are consistent with each other and with the config.
    """

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is None or key not in state_dict:
                continue
            src = state_dict[key]
            if isinstance(src, Tensor) and src.shape != buf.shape:
                self._buffers[name] = torch.empty(src.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _LeftOut(nn.Module):
    """Stands in a frozen learner for a submodule it does not keep; any use of it says so."""

    def __init__(self, owner: str, name: str) -> None:
        super().__init__()
        self._what = f"{owner}.{name}"

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            return super().__getattr__(attr)
        raise RuntimeError(f"{self._what} is not kept in a frozen (read-only) learner; use the learner it was "
                           "frozen from")


LEARNERS: Registry[type[IncrementalLearner]] = Registry("learner")


def make_learner(name: str, **overrides: Any) -> IncrementalLearner:
    """Build a registered learner from its name and config overrides (unknown keys are an error)."""
    cls = LEARNERS.get(name)
    valid = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for learner {name!r}; "
            f"valid options: {', '.join(sorted(valid)) or 'none'}"
        )
    return cls(cls.Config(**overrides))


class IncrementalLearner(ResizableBuffersModule):
    """Base class: input validation, the growing label set and the predict/proba plumbing.

    Subclasses implement the hooks ``_init_state(d)`` (allocate data-shaped state on the first
    batch), ``_grow(k)`` (append state for ``k`` new classes), ``_update(X, cols)`` (learn from a
    validated batch whose labels are given as column indices into ``classes_``), ``_scores(X)``
    (float64 ``(n, n_classes)`` scores) and ``_check_state()`` (consistency after loading).
    """

    Config: ClassVar[type] = LearnerConfig
    name: ClassVar[str] = ""
    input_ndim: ClassVar[int] = 2  # 2: embeddings (n, d); 3: log-mel (n, n_mels, frames) for backbone learners
    # Capabilities that callers branch on, declared here rather than probed with getattr:
    can_forget: ClassVar[bool] = False  # forget_class / forget_samples give exactly the retrained-without state
    can_merge: ClassVar[bool] = False  # statistics from two learners add up to the learner of the union
    takes_budget: ClassVar[bool] = False  # a memory budget sizes its exemplar memory (compare --memory-budget)
    # Its session training checkpoints (backbone learners: attributes checkpoint_dir, resume, train_checkpoint);
    # the harness then also saves its state at each session end, so an interrupted run resumes.
    can_checkpoint: ClassVar[bool] = False
    # Submodules only learning reads (the statistics behind a solve): a frozen copy leaves them out.
    learning_only: ClassVar[tuple[str, ...]] = ()
    _frozen = False  # a read-only copy from ``frozen()``: it scores, and refuses to change

    @classmethod
    def needs_encoder(cls) -> bool:
        """Backbone-updating learners read log-mel and train their own copy of the encoder."""
        return cls.input_ndim == 3

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        cfg = self.Config() if config is None else config
        if not isinstance(cfg, self.Config):
            want = self.Config.__qualname__
            raise TypeError(f"{type(self).__name__} expects a {want}, got {type(cfg).__name__}")
        self.config = cfg
        # Labels in column order; feature width d (0 while unfitted). Both are state, so they round-trip.
        self.register_buffer("class_labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("class_counts", torch.zeros(0, dtype=torch.long))  # samples learned per class
        self.register_buffer("feature_dim", torch.zeros((), dtype=torch.long))
        # Runs after this module and its children loaded, also when the learner is nested in another module.
        self.register_load_state_dict_post_hook(_check_after_load)

    # ----------------------------------------------------------------- public API

    @property
    def classes_(self) -> Tensor:
        """Labels in the column order of ``decision_function`` / ``predict_proba`` (a copy)."""
        return self.class_labels.clone()

    @property
    def n_classes_(self) -> int:
        return int(self.class_labels.numel())

    @property
    def n_features_in_(self) -> int:
        """Embedding width seen at the first fit (0 while unfitted)."""
        return int(self.feature_dim.item())

    @property
    def is_fitted(self) -> bool:
        return self.n_classes_ > 0

    @property
    def device(self) -> torch.device:
        return self.class_labels.device

    @torch.no_grad()
    def frozen(self) -> IncrementalLearner:
        """A copy that scores exactly like this learner but cannot change: no statistics, only what scoring reads.

        What a service publishes to its readers after each write: the statistics (``learning_only``, tens of
        MB for the ridge heads) stay with the writer, so a snapshot costs the weights, not the whole state.
        """
        memo: dict[int, Any] = {id(getattr(self, n)): _LeftOut(type(self).__name__, n) for n in self.learning_only}
        out = copy.deepcopy(self, memo)
        out._frozen = True
        if out.is_fitted:
            out._prepare_scoring()
        return out

    def _prepare_scoring(self) -> None:
        """Compute any cache scoring fills lazily, so that readers of a frozen copy never write to it."""

    def _require_mutable(self) -> None:
        if self._frozen:
            raise RuntimeError(f"this {type(self).__name__} is a frozen (read-only) copy: it scores but cannot "
                               "learn, forget or merge; change the learner it was frozen from")

    @torch.no_grad()
    def partial_fit(self, X: ArrayLike, y: ArrayLike) -> IncrementalLearner:
        """Learn from one batch; unseen labels extend ``classes_``. An empty batch is a no-op."""
        self._require_mutable()
        Xt = self._as_features(X)
        yt = self._as_labels(y, len(Xt))
        if len(Xt) == 0:
            return self
        if not self.is_fitted:
            self.feature_dim.fill_(Xt.shape[1])
            self._init_state(Xt.shape[1])
        cols = self._register_labels(yt).to(self.device)
        self._update(Xt, cols)
        self.class_counts += torch.bincount(cols, minlength=self.n_classes_)
        return self

    @torch.no_grad()
    def merge(self, other: IncrementalLearner, *, solve: bool = True) -> IncrementalLearner:
        """Add another learner's statistics (same kind and settings, other data): the learner of the union.

        Labels are matched by value; labels only ``other`` has are appended in its column order.
        ``solve=False`` only adds the statistics (merging many shards: solve once, with the last merge or
        ``refresh()``); until then the learner's scores are stale.
        """
        self._require_mutable()
        if not self.can_merge:
            able = ", ".join(n for n in LEARNERS.names() if LEARNERS.get(n).can_merge)
            raise MergeUnsupportedError(
                f"the {self.name or type(self).__name__} learner's state is not additive, so it cannot merge; "
                f"learners that can: {able}"
            )
        if type(other) is not type(self) or other.config != self.config:
            raise ValueError(f"cannot merge a {other.name} learner with settings {other.config_dict()} into a "
                             f"{self.name} learner with settings {self.config_dict()}")
        if not other.is_fitted:
            return self.refresh() if solve and self.is_fitted else self
        if not self.is_fitted:
            self.load_state_dict({k: v.to(self.device) for k, v in other.state_dict().items()})
            return self
        if other.n_features_in_ != self.n_features_in_:
            raise ValueError(f"cannot merge learners of {other.n_features_in_} and {self.n_features_in_} features")
        cols = self._register_labels(other.class_labels.cpu()).to(self.device)
        self._merge(other, cols)
        self.class_counts.index_add_(0, cols, other.class_counts.to(self.device))
        if solve:
            self.refresh()
        return self

    @torch.no_grad()
    def refresh(self) -> IncrementalLearner:
        """Solve again from the statistics (after merges with ``solve=False``); a no-op for most learners."""
        self._require_mutable()
        self._refresh()
        return self

    def _refresh(self) -> None:
        """Recompute what is derived from the statistics (e.g. a ridge solve)."""

    def relabeled(self, mapping: dict[int, int]) -> IncrementalLearner:
        """A copy whose labels are renamed by ``mapping`` (every label must be mapped, to distinct values)."""
        new = [mapping[int(c)] for c in self.class_labels.tolist()]
        if len(set(new)) != len(new):
            raise ValueError(f"relabeling must keep labels distinct, got {new}")
        out = copy.deepcopy(self)
        out.class_labels = torch.as_tensor(new, dtype=torch.long, device=self.device)
        return out

    @torch.no_grad()
    def forget_class(self, label: int) -> IncrementalLearner:
        """Remove a class and everything learned from it: the state becomes that of never having seen it."""
        self._require_mutable()
        self._require_forget()
        col = self._columns_of(torch.as_tensor([int(label)]))[0]
        self._remove_class(int(col))
        self._drop_column(int(col))
        return self

    @torch.no_grad()
    def forget_samples(self, X: ArrayLike, y: ArrayLike) -> IncrementalLearner:
        """Remove samples learned earlier (the same embeddings, with their labels); emptied classes go too."""
        self._require_mutable()
        self._require_forget()
        Xt = self._as_features(X)
        yt = self._as_labels(y, len(Xt))
        if len(Xt) == 0:
            return self
        self._require_fitted()
        cols = self._columns_of(yt).to(self.device)
        removed = torch.bincount(cols, minlength=self.n_classes_)
        if bool((removed > self.class_counts).any()):
            col = int(torch.nonzero(removed > self.class_counts)[0])
            raise ValueError(f"cannot forget {int(removed[col])} samples of class {int(self.class_labels[col])}: "
                             f"only {int(self.class_counts[col])} were learned")
        self._downdate(Xt, cols)
        self.class_counts -= removed
        for col in sorted(torch.nonzero(self.class_counts == 0).flatten().tolist(), reverse=True):
            self._remove_class(col)
            self._drop_column(col)
        return self

    @torch.no_grad()
    def decision_function(self, X: ArrayLike) -> Tensor:
        """Per-class scores, float32 ``(n, n_classes)``, columns in ``classes_`` order."""
        return self._checked_scores(X).float()

    @torch.no_grad()
    def predict(self, X: ArrayLike) -> Tensor:
        """Labels (from ``classes_``) of the highest-scoring class, LongTensor ``(n,)``."""
        return self.class_labels[self._checked_scores(X).argmax(dim=1)]

    @torch.no_grad()
    def predict_proba(self, X: ArrayLike) -> Tensor:
        """Softmax of the learner's logits (see ``_proba_logits``), float32 rows summing to 1."""
        return torch.softmax(self._proba_logits(self._checked_scores(X)), dim=1).float()

    def nbytes(self) -> int:
        """Bytes held by all state tensors (buffers and parameters) as saved, for memory-footprint accounting.

        Statistics that fold waiting rows in lazily (``unfolded_bytes``) are counted as folded."""
        tensors = itertools.chain(self.parameters(), self.buffers())
        waiting = sum(m.unfolded_bytes() for m in self.modules() if hasattr(type(m), "unfolded_bytes"))
        return sum(t.numel() * t.element_size() for t in tensors) + waiting

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items())
        return f"{fields}, n_classes={self.n_classes_}, d={self.n_features_in_}"

    # ----------------------------------------------------------------- hooks

    def _init_state(self, d: int) -> None:
        raise NotImplementedError

    def _grow(self, k: int) -> None:
        raise NotImplementedError

    def _update(self, X: Tensor, cols: Tensor) -> None:
        raise NotImplementedError

    def _scores(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def _remove_class(self, col: int) -> None:
        """Take column ``col``'s statistics out (labels and counts are the base class's job)."""
        raise NotImplementedError

    def _downdate(self, X: Tensor, cols: Tensor) -> None:
        """Subtract the contribution of samples ``X`` learned in columns ``cols``."""
        raise NotImplementedError

    def _merge(self, other: IncrementalLearner, cols: Tensor) -> None:
        """Add ``other``'s statistics; ``cols[j]`` is our column for its column j (already grown)."""
        raise NotImplementedError

    def _proba_logits(self, scores: Tensor) -> Tensor:
        """Logits fed to the softmax in ``predict_proba``; the raw scores unless a learner rescales."""
        return scores

    def _check_state(self) -> None:
        """Raise ValueError when loaded tensors are inconsistent; subclasses extend it."""
        labels = self.class_labels
        if labels.ndim != 1:
            raise ValueError(f"class_labels must be 1-D, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.unique().numel() != labels.numel()):
            raise ValueError("class_labels must be distinct non-negative integers")
        if tuple(self.class_counts.shape) != tuple(labels.shape):
            raise ValueError(
                f"inconsistent state: class_counts {tuple(self.class_counts.shape)} for {labels.numel()} classes"
            )
        if (self.n_features_in_ > 0) != self.is_fitted:
            raise ValueError(
                f"inconsistent state: feature_dim={self.n_features_in_} with {self.n_classes_} classes"
            )

    # ----------------------------------------------------------------- validation

    def _require_forget(self) -> None:
        if not self.can_forget:
            able = ", ".join(n for n in LEARNERS.names() if LEARNERS.get(n).can_forget)
            raise ForgetUnsupportedError(
                f"the {self.name or type(self).__name__} learner cannot forget exactly (its state is not a sum over "
                f"samples); learners that can: {able}"
            )

    def _columns_of(self, y: Tensor) -> Tensor:
        """Column index of each label; every label must be known."""
        labels = self.class_labels.cpu()
        unknown = sorted(set(y.tolist()) - set(labels.tolist()))
        if unknown:
            raise ValueError(f"label(s) {unknown} were never learned; known: {labels.tolist()}")
        sorted_labels, order = torch.sort(labels)
        return order[torch.searchsorted(sorted_labels, y.cpu())]

    def _drop_column(self, col: int) -> None:
        keep = torch.arange(self.n_classes_, device=self.device) != col
        self.class_labels = self.class_labels[keep]
        self.class_counts = self.class_counts[keep]
        if not self.is_fitted:  # the last class went: back to a fresh, unfitted learner
            self.load_state_dict(type(self)(self.config).to(self.device).state_dict())

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} has not seen any data yet; call partial_fit(X, y) first"
            )

    def _checked_scores(self, X: ArrayLike) -> Tensor:
        self._require_fitted()
        return self._scores(self._as_features(X))

    def _as_features(self, X: ArrayLike) -> Tensor:
        """A 2-D finite float tensor on the learner's device; checks the width once fitted."""
        if isinstance(X, Tensor):
            t = X.detach()
        else:
            try:
                t = torch.as_tensor(np.asarray(X))
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"X must be a numeric (n, d) array, got {type(X).__name__}: {exc}") from None
        if t.ndim != 2:
            raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"X must be real-valued, got dtype {t.dtype}")
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        if self.is_fitted and t.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {t.shape[1]} features, but this learner was fitted on {self.n_features_in_} features"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError("X contains NaN or infinite values")
        return t.to(self.device)

    @staticmethod
    def _as_labels(y: ArrayLike, n: int) -> Tensor:
        """A 1-D int64 CPU tensor of non-negative labels of length ``n``."""
        if isinstance(y, Tensor):
            t = y.detach().cpu()
        else:
            a = np.asarray(y)
            if a.dtype.kind not in "iuf":
                raise ValueError(f"labels must be non-negative integers, got dtype {a.dtype}")
            t = torch.as_tensor(a)
        if t.ndim != 1:
            raise ValueError(f"y must be 1-D (n_samples,), got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"labels must be non-negative integers, got dtype {t.dtype}")
        if t.is_floating_point() and not (bool(torch.isfinite(t).all()) and bool((t == t.round()).all())):
            raise ValueError("labels must be integers; got non-integer values")
        t = t.long()
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"labels must be non-negative integers; got {int(t.min())}")
        if len(t) != n:
            raise ValueError(f"X and y have different lengths: {n} samples vs {len(t)} labels")
        return t

    def _register_labels(self, y: Tensor) -> Tensor:
        """Append unseen labels in order of first appearance; return each sample's column index."""
        known = self.class_labels.cpu()
        uniq, inv = torch.unique(y, return_inverse=True)
        first = torch.full((len(uniq),), len(y), dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(len(y)), reduce="amin")
        is_new = ~torch.isin(uniq, known)
        new = uniq[is_new][torch.argsort(first[is_new])]
        if len(new):
            self.class_labels = torch.cat([known, new]).to(self.device)
            self.class_counts = torch.cat([self.class_counts, self.class_counts.new_zeros(len(new))])
            self._grow(len(new))
        labels = self.class_labels.cpu()
        sorted_labels, order = torch.sort(labels)
        return order[torch.searchsorted(sorted_labels, y.contiguous())]


def _check_after_load(module: IncrementalLearner, incompatible_keys: Any) -> None:
    module._check_state()
