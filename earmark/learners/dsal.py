"""DS-AL: dual-stream analytic learning, an ACIL main stream plus a compensation stream on its residual.

Zhuang et al., "DS-AL: A Dual-Stream Analytic Learning for Exemplar-Free Class-Incremental Learning"
(AAAI 2024), following the reference code (ZHUANGHP/Analytic-continual-learning, ``analytic/DSAL.py``):
one random projection ``Z = f W_B`` feeds two recursive ridges. The main stream learns one-hot
targets on ``ReLU(Z)`` exactly as ACIL. The compensation stream learns, on ``tanh(Z)`` (another
activation gives it different features), the main stream's residual ``Y - ReLU(Z) W_main`` computed
right after the main stream absorbed the call, with the residual columns of previous classes cleared
(previous label cleansing), so it only sharpens the classes being learned now. Output:
``main + C * compensation``.

Exactness: the main stream is weight-invariant, i.e. equal to the joint ridge on all data seen for
any split and order (as ACIL). The compensation stream equals the joint ridge of ``act(Z)`` on the
stacked per-call cleansed residuals, but those targets depend on the main stream at each call, so
the compensation stream (and the output) does depend on how the data were split into calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from earmark.learners.analytic import AnalyticConfig, RandomReLUBuffer, RecursiveRidge
from earmark.learners.base import LEARNERS, ArrayLike, IncrementalLearner

_ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "identity": lambda z: z,
}


@dataclass
class DSALConfig(AnalyticConfig):
    """Hyperparameters of DS-AL; ``buffer_size``, ``gamma`` (main stream), ``seed``, ``block_size`` as ``analytic``.

    ``gamma_comp``: ridge strength of the compensation stream (0.1 in the reference scripts, like
    gamma). ``compensation_ratio`` (C): weight of the compensation stream in the output. The reference
    README recommends a grid search over [0, 2]: best 0.6 on CIFAR-100 (the default here), 1.5 on
    ImageNet-1k; tune it for audio. ``comp_activation``: one of tanh (the paper's), sigmoid, relu,
    identity. The buffer in the paper is 8192 wide (CIFAR-100) or 16384 (ImageNet); each stream keeps an
    M x M float64 matrix, so 2048 is the CPU default.
    """

    gamma_comp: float = 0.1
    compensation_ratio: float = 0.6
    comp_activation: str = "tanh"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.gamma_comp > 0:
            raise ValueError(f"gamma_comp must be > 0, got {self.gamma_comp}")
        if self.compensation_ratio < 0:
            raise ValueError(f"compensation_ratio must be >= 0, got {self.compensation_ratio}")
        if self.comp_activation not in _ACTIVATIONS:
            raise ValueError(f"comp_activation must be one of {sorted(_ACTIVATIONS)}, got {self.comp_activation!r}")


@LEARNERS.register("dsal")
class DSALLearner(IncrementalLearner):
    """ACIL main stream (``buffer`` + recursive ``solver``) plus ``comp_solver`` on the residual.

    ``weights_`` / ``expand`` are the main stream's, ``comp_weights_`` / ``comp_features`` the
    compensation stream's. Scores: ``expand(X) W_main + C * comp_features(X) W_comp``. The
    compensation stream is fitted to the main stream's residual *at the time* of each session, so the
    state is not a sum over samples: DS-AL can neither forget exactly nor merge.
    """

    Config = DSALConfig
    name = "dsal"

    def __init__(self, config: DSALConfig | None = None) -> None:
        super().__init__(config)
        self.buffer = RandomReLUBuffer(self.config.buffer_size, self.config.seed)
        self.solver = RecursiveRidge(self.config.gamma, self.config.block_size)
        self.comp_solver = RecursiveRidge(self.config.gamma_comp, self.config.block_size)

    @property
    def weights_(self) -> Tensor:
        """Main-stream ridge weights ``(D, n_classes)`` in float64 (a copy)."""
        self._require_fitted()
        return self.solver.W.clone()

    @torch.no_grad()
    def expand(self, X: ArrayLike) -> Tensor:
        """Main-stream features H = ReLU(X W_B) (X itself when ``buffer_size=0``), float64 ``(n, D)``."""
        self._require_fitted()
        return self.buffer(self._as_features(X))

    @property
    def comp_weights_(self) -> Tensor:
        """Compensation-stream weights ``(D, n_classes)`` in float64 (a copy)."""
        self._require_fitted()
        return self.comp_solver.W.clone()

    @torch.no_grad()
    def comp_features(self, X: ArrayLike) -> Tensor:
        """Compensation-stream features ``act(X W_B)`` (``act(X)`` when ``buffer_size=0``), float64."""
        self._require_fitted()
        return self._comp_features(self._as_features(X))

    def _comp_features(self, X: Tensor) -> Tensor:
        Z = X.to(torch.float64)
        if self.buffer.size > 0:
            Z = Z @ self.buffer.projection.to(torch.float64)
        return _ACTIVATIONS[self.config.comp_activation](Z)

    def _init_state(self, d: int) -> None:
        self.buffer.build(d)
        self.solver.reset(self.buffer.out_features(d))
        self.comp_solver.reset(self.buffer.out_features(d))

    def _grow(self, k: int) -> None:
        self.solver.add_outputs(k)
        self.comp_solver.add_outputs(k)

    def _update(self, X: Tensor, cols: Tensor) -> None:
        H = self.buffer(X)
        Y = F.one_hot(cols, self.n_classes_).to(torch.float64)
        self.solver.update(H, Y)
        residual = Y - self.solver(H)
        # Previous label cleansing: keep only the columns of classes present in this call (the reference
        # keeps the current phase's classes; a class recurring in this call counts as current).
        current = torch.zeros(self.n_classes_, dtype=torch.bool, device=self.device)
        current[cols] = True
        residual[:, ~current] = 0.0
        self.comp_solver.update(self._comp_features(X), residual)

    def _scores(self, X: Tensor) -> Tensor:
        main = self.solver(self.buffer(X))
        return main + self.config.compensation_ratio * self.comp_solver(self._comp_features(X))

    def _check_state(self) -> None:
        super()._check_state()
        d, m = self.n_features_in_, self.config.buffer_size
        streams = {"main": self.solver, "compensation": self.comp_solver}
        if not self.is_fitted:
            if self.buffer.projection.numel() or any(s.R.numel() or s.W.numel() for s in streams.values()):
                raise ValueError("inconsistent DS-AL state: solver or buffer state present but no classes")
            return
        D = self.buffer.out_features(d)
        want_proj = (d, m) if m > 0 else (0, 0)
        bad = [f"projection {tuple(self.buffer.projection.shape)} != {want_proj}"] if (
            tuple(self.buffer.projection.shape) != want_proj) else []
        for name, st in streams.items():
            if tuple(st.R.shape) != (D, D) or tuple(st.W.shape) != (D, self.n_classes_):
                bad.append(f"{name} R {tuple(st.R.shape)}, W {tuple(st.W.shape)}")
        if bad:
            raise ValueError(
                f"DS-AL state does not match buffer_size={m}, d={d}, {self.n_classes_} classes: {'; '.join(bad)}"
            )
