"""First Session Adaptation (Panos et al.): adapt the encoder on the first session only, then a frozen
encoder under a closed-form head (LDA by default, or the analytic learner).

Adaptation is a full fine-tune when the first session is large, or FiLM adapters (a per-block,
per-channel scale and shift of the residual stream, identity at init) when it is few-shot: the
encoder's own weights then stay as they were and only ``2 x depth x width`` numbers are learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from earmark.learners.backbone import BackboneConfig, BackboneLearner
from earmark.learners.base import LEARNERS, make_learner


@dataclass
class FSAConfig(BackboneConfig):
    """``adapter``: "full" (train the whole encoder), "film" or "none" (the head alone, no adaptation).

    ``adapt_epochs`` of cross-entropy training on the first session (with a temporary linear head);
    later sessions only update the closed-form ``head`` (a learner name, with ``head_params``).
    """

    adapter: str = "full"
    adapt_epochs: int = 5
    head: str = "lda"
    head_params: dict[str, Any] = field(default_factory=lambda: {"shrinkage": 0.1})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter not in ("full", "film", "none"):
            raise ValueError(f"adapter must be 'full', 'film' or 'none', got {self.adapter!r}")
        if self.adapt_epochs < 0:
            raise ValueError("adapt_epochs must be >= 0")


@LEARNERS.register("fsa")
class FSALearner(BackboneLearner):
    """Adapt once, then classify embeddings of the adapted (frozen) encoder with a closed-form head."""

    Config = FSAConfig
    name = "fsa"

    def __init__(self, config: FSAConfig | None = None) -> None:
        super().__init__(config)
        cls = LEARNERS.get(self.config.head)
        if cls.needs_encoder():
            raise ValueError(f"fsa's head must be a closed-form learner on embeddings, got {self.config.head!r}")
        self.head = make_learner(self.config.head, **self.config.head_params)
        self._install_film()

    def init_encoder(self, encoder: nn.Module) -> FSALearner:
        super().init_encoder(encoder)
        self._install_film()
        return self

    def _install_film(self) -> None:
        depth, d = len(self.encoder.layers), self.encoder.config.embed_dim
        self.film_scale = nn.Parameter(torch.zeros(depth, d, device=self.device), requires_grad=False)
        self.film_shift = nn.Parameter(torch.zeros(depth, d, device=self.device), requires_grad=False)
        if self.config.adapter == "film":
            for i, layer in enumerate(self.encoder.layers):
                layer.register_forward_hook(self._film_hook(i))

    def _film_hook(self, i: int):
        def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
            return out * (1 + self.film_scale[i]) + self.film_shift[i]

        return hook

    def _trainable(self) -> list[nn.Parameter]:
        if self.config.adapter == "film":
            return [self.film_scale, self.film_shift]
        return super()._trainable()

    def _learn_session(self, X: Tensor, cols: Tensor, first: bool) -> None:
        if first and self.config.adapter != "none" and self.config.adapt_epochs:
            self._fit_head(X, cols)
            self._train(X, cols, self.config.adapt_epochs)
        self.head.partial_fit(self._embed(X), self.class_labels[cols])

    def _scores(self, X: Tensor) -> Tensor:
        return self.head.decision_function(self._embed(X)).double()

    def _proba_logits(self, scores: Tensor) -> Tensor:
        return self.head._proba_logits(scores)

    def _check_state(self) -> None:
        super()._check_state()
        if self.head.n_classes_ and not torch.equal(self.head.class_labels, self.class_labels):
            raise ValueError("fsa's head classes differ from the learner's classes")
