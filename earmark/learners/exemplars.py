"""A class-balanced exemplar memory chosen by herding, stored as float16 log-mel (counted in bytes).

Herding (Welling 2009, as used by iCaRL) picks, one at a time, the sample that keeps the running mean
of the chosen set closest to the class mean in (L2-normalized) embedding space. The order is
greedy, so any prefix is itself a good summary: when the budget per class shrinks as classes
arrive, each class keeps the first ``m`` of its stored exemplars and nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from earmark.learners.base import ResizableBuffersModule


def herding_order(emb: Tensor, m: int) -> Tensor:
    """Indices of ``m`` rows of ``emb`` in herding order (all rows if ``m`` exceeds them)."""
    f = F.normalize(emb.double(), dim=1)
    mu = f.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(f), dtype=torch.bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = ((mu - (running + f) / k) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += f[i]
    return torch.as_tensor(chosen, dtype=torch.long)


class ExemplarMemory(ResizableBuffersModule):
    """Stored exemplars (log-mel, float16) and their class columns, grouped by class in herding order."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("data", torch.zeros(0, 0, 0, dtype=torch.float16))
        self.register_buffer("cols", torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.cols)

    @staticmethod
    def bytes_per_item(shape: tuple[int, ...]) -> int:
        """Bytes one stored exemplar of spectrogram shape ``(n_mels, frames)`` costs (data + its label)."""
        return int(torch.Size(shape).numel()) * 2 + 8

    def items(self) -> tuple[Tensor, Tensor]:
        """(log-mel float32, columns) of every stored exemplar."""
        return self.data.float(), self.cols

    def update(
        self,
        X: Tensor,
        cols: Tensor,
        per_class: int | None,
        embed: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Add the classes in ``(X, cols)`` and cut every class to ``per_class`` exemplars (None: keep all).

        A class present in the batch is re-selected from its old exemplars plus the new samples; other
        classes keep a prefix of their herding order. Without ``embed`` the selection is the first
        samples in order (random when the data are shuffled), which is the plain-replay ablation.
        """
        old_data, old_cols = self.items()
        if not len(old_data):
            old_data = X.new_zeros((0, *X.shape[1:]))
        elif old_data.shape[1:] != X.shape[1:]:
            raise ValueError(f"exemplars have shape {tuple(old_data.shape[1:])}, new data {tuple(X.shape[1:])}")
        keep_x, keep_c = [], []
        for c in torch.unique(torch.cat([old_cols, cols.to(old_cols.device)])).tolist():
            new = cols == c
            old = old_cols == c
            if bool(new.any()):
                cand = torch.cat([old_data[old].to(X.device), X[new]])
                m = len(cand) if per_class is None else per_class
                order = herding_order(embed(cand), m) if embed is not None and m < len(cand) else torch.arange(
                    min(m, len(cand)))
                chosen = cand[order.to(cand.device)]
            else:
                chosen = old_data[old][: len(old_data) if per_class is None else per_class]
            keep_x.append(chosen.to(self.data.device))
            keep_c.append(torch.full((len(chosen),), c, dtype=torch.long, device=self.cols.device))
        self.data = torch.cat(keep_x).half() if keep_x else self.data
        self.cols = torch.cat(keep_c) if keep_c else self.cols


__all__ = ["ExemplarMemory", "herding_order"]
