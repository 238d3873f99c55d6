"""Elastic weight consolidation (Kirkpatrick et al.): a quadratic pull toward earlier weights, by Fisher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from earmark.learners.backbone import BackboneConfig, BackboneLearner, new_class_ce
from earmark.learners.base import LEARNERS


@dataclass
class EWCConfig(BackboneConfig):
    """``ewc_lambda`` weighs the penalty (lambda / 2) sum_i F_i (theta_i - theta*_i)^2.

    The diagonal Fisher is the empirical one (squared gradients of the cross-entropy, batch by batch)
    and is merged across sessions weighted by how many classes each covered, as PyCIL does. Its scale
    depends on the model, so ``ewc_lambda`` needs tuning (``earmark tune``); 1000 is a middle value.
    """

    ewc_lambda: float = 1000.0
    fisher_batch_size: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.fisher_batch_size < 1:
            raise ValueError("fisher_batch_size must be >= 1")


@LEARNERS.register("ewc")
class EWCLearner(BackboneLearner):
    """Finetune plus the EWC penalty on the encoder's parameters (two extra copies of them in memory)."""

    Config = EWCConfig
    name = "ewc"

    def __init__(self, config: EWCConfig | None = None) -> None:
        super().__init__(config)
        self._register_ewc_buffers()

    def init_encoder(self, encoder: torch.nn.Module) -> EWCLearner:
        super().init_encoder(encoder)
        self._register_ewc_buffers()
        return self

    def _register_ewc_buffers(self) -> None:
        # One flat vector each: anchor weights and their Fisher (empty until the first session ends).
        self.register_buffer("anchor", torch.zeros(0, device=self.device))
        self.register_buffer("fisher", torch.zeros(0, device=self.device))

    def _flat_params(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.encoder.parameters()])

    def _classification_loss(self, logits: Tensor, cols: Tensor) -> Tensor:
        return new_class_ce(logits, cols, self.n_old_classes)

    def _extra_loss(self, x: Tensor, logits: Tensor, embedding: Tensor) -> Tensor | None:
        if not len(self.fisher):
            return None
        diff = self._flat_params() - self.anchor
        return 0.5 * self.config.ewc_lambda * (self.fisher * diff * diff).sum()

    def _fisher(self, X: Tensor, cols: Tensor) -> Tensor:
        params = list(self.encoder.parameters())
        total = torch.zeros(sum(p.numel() for p in params), device=self.device)
        bs = self.config.fisher_batch_size
        self.encoder.eval()
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            try:
                for i in range(0, len(X), bs):
                    logits = self._logits(self.encoder(X[i : i + bs]))
                    loss = F.cross_entropy(logits, cols[i : i + bs])
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                      for g, p in zip(grads, params, strict=True)])
                    total += flat.pow(2) * len(X[i : i + bs])
            finally:
                for p in params:
                    p.requires_grad_(False)
        return total / max(1, len(X))

    def _after_session(self, X: Tensor, cols: Tensor) -> None:
        new = self._fisher(X, cols)
        if len(self.fisher):
            alpha = self.n_old_classes / self.n_classes_
            new = alpha * self.fisher + (1 - alpha) * new
        self.fisher = new
        self.anchor = self._flat_params().detach().clone()

    def _check_state(self) -> None:
        super()._check_state()
        n = sum(p.numel() for p in self.encoder.parameters())
        for name in ("anchor", "fisher"):
            t = getattr(self, name)
            if t.ndim != 1 or len(t) not in (0, n):
                raise ValueError(f"{name} has {len(t)} entries, expected 0 or {n}")
