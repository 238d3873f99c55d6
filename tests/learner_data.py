"""Synthetic embeddings shared by the learner tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def blobs(
    labels: list[int], per_class: int, d: int = 8, seed: int = 0, spread: float = 1.0, centres=None
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Gaussian blobs around random centres (one per label), shuffled."""
    g = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = {lab: torch.randn(d, generator=g) * 3 for lab in labels}
    X = torch.cat([centres[lab] + spread * torch.randn(per_class, d, generator=g) for lab in labels])
    y = torch.tensor(labels).repeat_interleave(per_class)
    perm = torch.randperm(len(y), generator=g)
    return X[perm], y[perm], centres


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def one_hot_in_order(y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    col = {int(c): i for i, c in enumerate(classes)}
    return F.one_hot(torch.tensor([col[int(v)] for v in y]), len(classes)).to(torch.float64)
