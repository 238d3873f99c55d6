"""FeTrIL: a linear classifier retrained each session on real new features and translated pseudo-features.

Petit et al., "FeTrIL: Feature Translation for Exemplar-Free Class-Incremental Learning" (WACV 2023).
Only class means are kept from the past. Each session, for every old class c (seen before, absent
from the batch) we pick the present class n whose mean is most similar (cosine) and translate n's
real features onto c: ``f - mu_n + mu_c``, where mu_n is n's mean in this batch (its class mean
when n is new, as in the paper), so the pseudo-features of c have mean mu_c exactly. A linear
classifier over all classes seen is then trained on the real features plus these pseudo-features
(as many pseudo-features per old class as its partner has real ones: memory grows with old classes).

Not exact: unlike the closed-form heads, the result depends on how the data are split into
sessions (the pseudo-features of a class depend on which classes it is paired with) and on the
optimizer; it is deterministic for a given config and history, and a save/load does not change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earmark.learners.base import LEARNERS, ArrayLike, IncrementalLearner, LearnerConfig

_OPTIMIZERS = ("lbfgs", "adam")


def translate_features(X: Tensor, groups: Tensor, old_means: Tensor) -> tuple[Tensor, Tensor]:
    """FeTrIL pseudo-features: for each row c of ``old_means``, the rows of ``X`` of the group whose batch
    mean is most cosine-similar to ``mu_c``, translated by ``mu_c - mean_group``.

    Returns ``(pseudo (m, d), old_index (m,))`` where ``old_index`` is the row of ``old_means``.
    """
    if len(old_means) == 0:
        return X.new_zeros(0, X.shape[1]), torch.zeros(0, dtype=torch.long, device=X.device)
    uniq, inv = torch.unique(groups, return_inverse=True)
    counts = torch.bincount(inv, minlength=len(uniq)).to(X.dtype)
    batch_means = torch.zeros(len(uniq), X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, inv, X)
    batch_means /= counts.unsqueeze(1)
    sim = F.normalize(old_means, dim=1) @ F.normalize(batch_means, dim=1).T
    partner = sim.argmax(dim=1)  # most similar present class for each old class
    feats, owners = [], []
    for c, n in enumerate(partner.tolist()):
        rows = X[inv == n]
        feats.append(rows - batch_means[n] + old_means[c])
        owners.append(torch.full((len(rows),), c, dtype=torch.long, device=X.device))
    return torch.cat(feats), torch.cat(owners)


@dataclass
class FeTrILConfig(LearnerConfig):
    """Hyperparameters of the FeTrIL linear classifier (the paper uses a linear SVM; here softmax regression).

    ``optimizer``: ``"lbfgs"`` (full batch, strong-Wolfe line search, up to ``max_iter`` iterations on a
    convex loss, so the start matters little) or ``"adam"`` (``epochs`` passes of mini-batches
    of ``batch_size``, 0 = full batch, shuffled with a generator seeded by ``seed`` and the session).
    ``lr``: None means 1.0 for L-BFGS and 1e-2 for Adam. ``weight_decay``: L2 penalty on the weights
    (not the bias) added to the mean cross-entropy; it keeps the optimum bounded on separable data.
    ``l2_normalize``: classify ``f / |f|`` (translation happens before normalizing).
    ``warm_start``: start each session from the previous weights (new classes from zero).
    """

    optimizer: str = "lbfgs"
    max_iter: int = 100
    epochs: int = 30
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float = 1e-4
    l2_normalize: bool = True
    warm_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.max_iter < 1 or self.epochs < 1:
            raise ValueError(f"max_iter and epochs must be >= 1, got {self.max_iter} and {self.epochs}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0 = full batch), got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or None, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@LEARNERS.register("fetril")
class FeTrILLearner(IncrementalLearner):
    """Class means (float64 sums and counts) plus a linear classifier ``(n_classes, d)`` retrained per call.

    Scores are the classifier's logits on the (optionally L2-normalized) embedding; ``predict_proba``
    is their softmax. Every ``partial_fit`` call is a session.
    """

    Config = FeTrILConfig
    name = "fetril"

    def __init__(self, config: FeTrILConfig | None = None) -> None:
        super().__init__(config)
        self.register_buffer("class_sums", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("n_sessions", torch.zeros((), dtype=torch.long))

    @property
    def means_(self) -> Tensor:
        """Class means ``(n_classes, d)`` in float64, rows in ``classes_`` order."""
        self._require_fitted()
        return self.class_sums / self.class_counts.unsqueeze(1).to(torch.float64)

    @torch.no_grad()
    def pseudo_features(self, X: ArrayLike, y: ArrayLike) -> tuple[Tensor, Tensor]:
        """The pseudo-features a ``partial_fit(X, y)`` would train on now, float64, and their (old) labels.

        Old classes are those seen before and absent from ``y``; an unfitted learner has none.
        """
        Xt = self._as_features(X).to(torch.float64)
        yt = self._as_labels(y, len(Xt)).to(self.device)
        if not self.is_fitted or len(Xt) == 0:
            return Xt.new_zeros(0, Xt.shape[1]), torch.zeros(0, dtype=torch.long, device=self.device)
        old = ~torch.isin(self.class_labels, yt)
        pseudo, owner = translate_features(Xt, yt, self.means_[old])
        return pseudo, self.class_labels[old][owner]

    # ----------------------------------------------------------------- hooks

    def _init_state(self, d: int) -> None:
        kw = {"dtype": torch.float64, "device": self.device}
        self.class_sums = torch.zeros(0, d, **kw)
        self.weight = torch.zeros(0, d, **kw)
        self.bias = torch.zeros(0, **kw)

    def _grow(self, k: int) -> None:
        d = self.class_sums.shape[1]
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(k, d)])
        self.weight = torch.cat([self.weight, self.weight.new_zeros(k, d)])
        self.bias = torch.cat([self.bias, self.bias.new_zeros(k)])

    def _update(self, X: Tensor, cols: Tensor) -> None:
        X = X.to(torch.float64)
        present = torch.zeros(self.n_classes_, dtype=torch.bool, device=self.device)
        present[cols] = True
        old = torch.nonzero((self.class_counts > 0) & ~present).squeeze(1)
        pseudo, owner = translate_features(X, cols, self.means_[old])
        self.class_sums.index_add_(0, cols, X)
        self._train(torch.cat([X, pseudo]), torch.cat([cols, old[owner]]))
        self.n_sessions += 1

    def _inputs(self, X: Tensor) -> Tensor:
        X = X.to(torch.float64)
        return F.normalize(X, dim=1) if self.config.l2_normalize else X

    def _train(self, X: Tensor, cols: Tensor) -> None:
        cfg = self.config
        c, d = self.weight.shape
        X = self._inputs(X)
        linear = nn.Linear(d, c, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            if cfg.warm_start:
                linear.weight.copy_(self.weight)
                linear.bias.copy_(self.bias)
            else:
                linear.weight.zero_()
                linear.bias.zero_()

        def loss_on(idx: Tensor | None) -> Tensor:
            xb, yb = (X, cols) if idx is None else (X[idx], cols[idx])
            loss = F.cross_entropy(linear(xb), yb)
            return loss + 0.5 * cfg.weight_decay * linear.weight.square().sum()

        with torch.enable_grad():
            if cfg.optimizer == "lbfgs":
                opt = torch.optim.LBFGS(
                    linear.parameters(),
                    lr=1.0 if cfg.lr is None else cfg.lr,
                    max_iter=cfg.max_iter,
                    line_search_fn="strong_wolfe",
                    tolerance_grad=1e-9,
                    tolerance_change=1e-12,
                )

                def closure() -> Tensor:
                    opt.zero_grad()
                    loss = loss_on(None)
                    loss.backward()
                    return loss

                opt.step(closure)
            else:
                opt = torch.optim.Adam(linear.parameters(), lr=1e-2 if cfg.lr is None else cfg.lr)
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(self.n_sessions))
                n = len(X)
                bs = n if cfg.batch_size == 0 else cfg.batch_size
                for _ in range(cfg.epochs):
                    for idx in torch.randperm(n, generator=g).to(self.device).split(bs):
                        opt.zero_grad()
                        loss_on(idx).backward()
                        opt.step()
        self.weight = linear.weight.detach().clone()
        self.bias = linear.bias.detach().clone()

    def _scores(self, X: Tensor) -> Tensor:
        return self._inputs(X) @ self.weight.T + self.bias

    def _check_state(self) -> None:
        super()._check_state()
        c, d = self.n_classes_, self.n_features_in_
        tensors = (self.class_sums, self.class_counts, self.weight, self.bias)
        if self.is_fitted:
            shapes = tuple(tuple(t.shape) for t in tensors)
            if shapes != ((c, d), (c,), (c, d), (c,)):
                raise ValueError(
                    f"inconsistent FeTrIL state: class_sums, class_counts, weight, bias shapes {shapes} "
                    f"for {c} classes of width {d}"
                )
            if bool((self.class_counts <= 0).any()):
                raise ValueError("inconsistent FeTrIL state: every class needs a positive count")
        elif any(t.numel() for t in tensors):
            raise ValueError("inconsistent FeTrIL state: statistics present but no classes")
