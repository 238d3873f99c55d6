"""Analytic class-incremental learning (ACIL / G-ACIL): a recursive ridge on a random ReLU buffer.

Split as in Analytic-continual-learning: a frozen random **buffer** expands embeddings, the ridge's
**statistics** accumulate (``earmark.learners.statistics``) and are **solved** after each change, and the
**learner** wraps them behind the incremental protocol. After any sequence of batches (any class
order, any split, classes recurring in several sessions) the weights equal the joint ridge solution on
all data seen, which ``joint_ridge`` computes directly. ``RecursiveRidge`` is ACIL's recursive form of
the same update (DS-AL's streams use it); it cannot forget, since it keeps only the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from earmark.learners.base import (
    LEARNERS,
    ArrayLike,
    IncrementalLearner,
    LearnerConfig,
    ResizableBuffersModule,
)
from earmark.learners.statistics import RidgeStatistics


def joint_ridge(H: Tensor, Y: Tensor, gamma: float) -> Tensor:
    """The joint (all data at once) ridge solution ``solve(H'H + gamma I, H'Y)`` in float64.

    The upper bound the recursive learner must match; also a reference for tests and reports.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if H.ndim != 2 or Y.ndim != 2 or H.shape[0] != Y.shape[0]:
        raise ValueError(f"H (n, D) and Y (n, C) must share n; got {tuple(H.shape)} and {tuple(Y.shape)}")
    H = H.to(torch.float64)
    Y = Y.to(device=H.device, dtype=torch.float64)
    A = H.T @ H
    A.diagonal().add_(gamma)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(H.T @ Y, L)
    return torch.linalg.solve(A, H.T @ Y)


class RandomReLUBuffer(ResizableBuffersModule):
    """Frozen expansion ``h = ReLU(f W_B)``, W_B ~ N(0, 1) of shape (d, M); ``size=0`` is the identity.

    W_B is drawn on the CPU from a generator seeded with ``seed`` when the width d is first known,
    then moved to the module's device, so the same seed gives the same buffer on every device.
    It is stored float32; the expansion is computed in float64 for the solver.
    """

    def __init__(self, size: int, seed: int) -> None:
        super().__init__()
        self.size = size
        self.seed = seed
        self.register_buffer("projection", torch.zeros(0, 0, dtype=torch.float32))

    def out_features(self, d: int) -> int:
        return self.size if self.size > 0 else d

    def build(self, d: int) -> None:
        if self.size > 0:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            W = torch.randn(d, self.size, generator=g, dtype=torch.float32)
            self.projection = W.to(self.projection.device)

    def forward(self, X: Tensor) -> Tensor:
        X = X.to(torch.float64)
        if self.size == 0:
            return X
        return F.relu(X @ self.projection.to(torch.float64))


def check_same_buffer(ours: RandomReLUBuffer, theirs: RandomReLUBuffer) -> None:
    """Statistics add up only in the same expanded space."""
    if not torch.equal(ours.projection, theirs.projection.to(ours.projection.device)):
        raise ValueError("cannot merge: the learners' random projections differ (another seed or width)")


class RecursiveRidge(ResizableBuffersModule):
    """Recursive least squares with ridge prior, float64: ``R = (gamma I + sum X'X)^-1``, ``W = R sum X'Y``.

    Per block (X, Y), with P = X R and K = (I + X R X')^-1 (by Cholesky, never an explicit inverse):
    ``W <- W + P' K (Y - X W)`` (since the updated R times X' equals P' K) and ``R <- R - P' K P``.
    Batches are split into blocks of at most ``block_size`` rows to bound the b x b factorization;
    the result is the same for any split. New outputs (classes) are zero columns of W.
    """

    def __init__(self, gamma: float, block_size: int) -> None:
        super().__init__()
        self.gamma = gamma
        self.block_size = block_size
        self.register_buffer("R", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("W", torch.zeros(0, 0, dtype=torch.float64))

    def reset(self, n_features: int) -> None:
        dev = self.R.device
        self.R = torch.eye(n_features, dtype=torch.float64, device=dev) / self.gamma
        self.W = torch.zeros(n_features, 0, dtype=torch.float64, device=dev)

    def add_outputs(self, k: int) -> None:
        self.W = torch.cat([self.W, self.W.new_zeros(self.W.shape[0], k)], dim=1)

    def update(self, X: Tensor, Y: Tensor) -> None:
        for start in range(0, X.shape[0], self.block_size):
            self._update_block(X[start : start + self.block_size], Y[start : start + self.block_size])

    def _update_block(self, X: Tensor, Y: Tensor) -> None:
        P = X @ self.R  # (b, D); R is symmetric, so R X' = P'
        S = X @ P.T
        S.diagonal().add_(1.0)
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) == 0:
            KP = torch.cholesky_solve(P, L)
            KE = torch.cholesky_solve(Y - X @ self.W, L)
        else:  # S = I + X R X' is SPD in exact arithmetic; fall back on LU if rounding says otherwise
            KP = torch.linalg.solve(S, P)
            KE = torch.linalg.solve(S, Y - X @ self.W)
        self.W += P.T @ KE
        R = self.R - P.T @ KP
        self.R = 0.5 * (R + R.T)  # keep R symmetric against rounding drift

    def forward(self, H: Tensor) -> Tensor:
        return H @ self.W


@dataclass
class AnalyticConfig(LearnerConfig):
    """Hyperparameters of the analytic learner.

    ``buffer_size`` (M): width of the random ReLU expansion; 0 means no expansion (ridge on the
    embedding itself). Larger M separates classes better but the solver keeps an M x M float64
    matrix (M=2048: 32 MiB, M=8192 as in the ACIL paper: 512 MiB) and each sample costs O(M^2).
    2048 is a CPU-friendly default. ``gamma``: ridge strength (0.1 as in ACIL). ``seed``: seeds W_B.
    ``block_size``: rows expanded at a time; bounds the b x M temporaries. Results do not depend on it.
    ``class_factors``: keep per-class Gram factors (at most ``min(n_c, M)`` x M float64 per class) so a
    whole class can be forgotten exactly; without them only samples can be.
    """

    buffer_size: int = 2048
    gamma: float = 0.1
    seed: int = 0
    block_size: int = 1024
    class_factors: bool = True

    def __post_init__(self) -> None:
        if self.buffer_size < 0:
            raise ValueError(f"buffer_size must be >= 0 (0 = no expansion), got {self.buffer_size}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@LEARNERS.register("analytic")
class AnalyticLearner(IncrementalLearner):
    """ACIL / G-ACIL: ridge on ReLU(f W_B), equal to the joint ridge on all data seen.

    Targets are one-hot over all classes seen so far. The learner keeps the ridge's sufficient
    statistics (``G = H'H``, ``Q = H'Y`` and per-class Gram factors, :class:`RidgeStatistics`) and
    solves ``W = (G + gamma I)^-1 Q`` by Cholesky after each change. That is ACIL's recursive update
    (:class:`RecursiveRidge`) written as accumulate-then-solve: the same weights after any split or
    order, and the same arithmetic for learning, exact forgetting (subtract, solve again) and merging.
    Scores are the ridge outputs ``h W`` (computed in float64, returned float32 by
    ``decision_function``); ``predict_proba`` is their softmax, a ranking-preserving normalization,
    not a calibrated probability.
    """

    Config = AnalyticConfig
    name = "analytic"
    can_forget = True
    can_merge = True
    learning_only = ("stats",)  # a frozen copy scores with the buffer and the weights alone

    def __init__(self, config: AnalyticConfig | None = None) -> None:
        super().__init__(config)
        self.buffer = RandomReLUBuffer(self.config.buffer_size, self.config.seed)
        self.stats = RidgeStatistics(class_factors=self.config.class_factors)
        self.register_buffer("weights", torch.zeros(0, 0, dtype=torch.float64))

    @property
    def weights_(self) -> Tensor:
        """Ridge weights ``(D, n_classes)`` in float64, columns in ``classes_`` order (a copy)."""
        self._require_fitted()
        return self.weights.clone()

    @torch.no_grad()
    def expand(self, X: ArrayLike) -> Tensor:
        """Buffer features H = ReLU(X W_B) (or X itself when ``buffer_size=0``), float64 ``(n, D)``."""
        self._require_fitted()
        return self.buffer(self._as_features(X))

    def _init_state(self, d: int) -> None:
        self.buffer.build(d)
        self.stats.reset(self.buffer.out_features(d))

    def _grow(self, k: int) -> None:
        self.stats.grow(k)

    def _blocks(self, X: Tensor, cols: Tensor):
        for start in range(0, X.shape[0], self.config.block_size):
            yield self.buffer(X[start : start + self.config.block_size]), cols[start : start + self.config.block_size]

    def _update(self, X: Tensor, cols: Tensor) -> None:
        for H, c in self._blocks(X, cols):
            self.stats.learn(H, c)
        self._solve()

    def _downdate(self, X: Tensor, cols: Tensor) -> None:
        for H, c in self._blocks(X, cols):
            self.stats.unlearn(H, c)
        self._solve()

    def _remove_class(self, col: int) -> None:
        self.stats.drop_class(col)
        self._solve()

    def _merge(self, other: IncrementalLearner, cols: Tensor) -> None:
        check_same_buffer(self.buffer, other.buffer)
        self.stats.merge(other.stats, cols)

    def _refresh(self) -> None:
        self._solve()

    def _solve(self) -> None:
        self.weights = self.stats.solve(self.config.gamma)

    def _scores(self, X: Tensor) -> Tensor:
        return self.buffer(X) @ self.weights

    def _check_state(self) -> None:
        super()._check_state()
        c, d, m = self.n_classes_, self.n_features_in_, self.config.buffer_size
        if not self.is_fitted:
            if self.buffer.projection.numel() or self.stats.gram.numel() or self.weights.numel():
                raise ValueError("inconsistent analytic state: statistics or buffer present but no classes")
            return
        D = self.buffer.out_features(d)
        want_proj = (d, m) if m > 0 else (0, 0)
        bad = self.stats.check(c, D)
        if tuple(self.buffer.projection.shape) != want_proj:
            bad.append(f"projection {tuple(self.buffer.projection.shape)} != {want_proj}")
        if tuple(self.weights.shape) != (D, c):
            bad.append(f"weights {tuple(self.weights.shape)} != {(D, c)}")
        if bad:
            raise ValueError(
                f"analytic state does not match buffer_size={m}, d={d}, {c} classes: {'; '.join(bad)}"
            )
