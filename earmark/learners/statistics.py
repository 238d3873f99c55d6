"""Additive per-class statistics in float64: what the closed-form learners accumulate, forget and merge.

The closed-form heads are solved from sums over samples (counts, sums, Grams ``sum h h'``,
cross-correlations ``H'Y``). Learning adds to them, forgetting subtracts, merging adds two sets;
the solve comes after, from whatever the statistics are. So "incremental equals joint" and "forget
equals retrain without" are the same identity: the statistics do not depend on the order or the
split in which samples arrived, up to float64 rounding.

Forgetting a whole class needs that class's own Gram. Storing a D x D Gram per class would cost
``D^2`` floats each (32 MiB at D = 2048); instead :class:`ClassFactors` keeps a square-root factor
``F_c`` with ``F_c' F_c = G_c``: an orthogonal mix of the class's rows, at most ``min(n_c, D)`` rows
of width D. It reveals the class's Gram and nothing finer: no sample can be read back from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from earmark.learners.base import ResizableBuffersModule


def _factor(rows: Tensor) -> Tensor:
    """A factor F with ``F'F = rows' rows`` and at most ``min(m, D)`` rows, none of them a sample.

    For m <= D, ``F = V' rows`` with V the eigenvectors of the small m x m ``rows rows'`` (an
    orthogonal mix of the rows); beyond D rows, ``F = sqrt(L) V'`` from the D x D Gram. Small
    eigendecompositions rather than ``linalg.qr``: LAPACK's QR of a wide matrix with few rows took
    seconds instead of a millisecond with two OpenMP threads on a busy 2-core machine.
    """
    m, width = rows.shape
    if m == 0:
        return rows
    if m <= width:
        _, vecs = torch.linalg.eigh(rows @ rows.T)
        return vecs.T @ rows
    vals, vecs = torch.linalg.eigh(rows.T @ rows)
    return (vecs * vals.clamp_min(0).sqrt()).T


def _pinv_psd(S: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (S + S.T))
    inv = torch.where(vals > vals.abs().max() * 1e-12, 1.0 / vals, torch.zeros_like(vals))
    return (vecs * inv) @ vecs.T


class ClassFactors(ResizableBuffersModule):
    """Per-class Gram factors ``F_c`` (``F_c' F_c = sum over the class of h h'``), packed in one tensor.

    ``rows`` stacks every class's factor (classes in column order); ``sizes[c]`` is class c's row count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("sizes", torch.zeros(0, dtype=torch.long))

    def reset(self, width: int) -> None:
        self.rows = torch.zeros(0, width, dtype=torch.float64, device=self.rows.device)
        self.sizes = torch.zeros(0, dtype=torch.long, device=self.rows.device)

    def grow(self, k: int) -> None:
        self.sizes = torch.cat([self.sizes, self.sizes.new_zeros(k)])

    def factor(self, col: int) -> Tensor:
        start = int(self.sizes[:col].sum())
        return self.rows[start : start + int(self.sizes[col])]

    def _split(self) -> list[Tensor]:
        return list(torch.split(self.rows, self.sizes.tolist())) if len(self.sizes) else []

    def _rebuild(self, parts: list[Tensor]) -> None:
        """One concatenation per operation (not per class), so work stays linear in the class count."""
        width = self.rows.shape[1]
        self.rows = torch.cat(parts) if parts else self.rows.new_zeros(0, width)
        self.sizes = torch.as_tensor([p.shape[0] for p in parts], dtype=torch.long, device=self.sizes.device)

    def add(self, H: Tensor, cols: Tensor) -> None:
        """Fold rows ``H`` (float64) into the factors of their classes."""
        parts = self._split()
        for col in torch.unique(cols).tolist():
            parts[col] = _factor(torch.cat([parts[col], H[cols == col]]))
        self._rebuild(parts)

    def remove(self, H: Tensor, cols: Tensor) -> None:
        """Take rows that were added earlier out of their classes' factors.

        With ``H = Z F`` (the rows lie in the row space of F), ``F'F - H'H = F'(I - Z'Z)F``: one
        small eigendecomposition of ``I - Z'Z`` (r x r) gives the new factor; eigenvalues that
        rounding pushes below zero are the directions the removal emptied.
        """
        parts = self._split()
        for col in torch.unique(cols).tolist():
            F = parts[col]
            Z = H[cols == col] @ F.T @ _pinv_psd(F @ F.T)  # (k, r): H = Z F
            M = torch.eye(F.shape[0], dtype=F.dtype, device=F.device) - Z.T @ Z
            vals, vecs = torch.linalg.eigh(0.5 * (M + M.T))
            keep = vals > 1e-10
            parts[col] = (vecs[:, keep] * vals[keep].sqrt()).T @ F
        self._rebuild(parts)

    def gram(self, col: int) -> Tensor:
        F = self.factor(col)
        return F.T @ F

    def drop(self, col: int) -> Tensor:
        """Remove class ``col``; returns its Gram."""
        parts = self._split()
        G = parts[col].T @ parts[col]
        self._rebuild(parts[:col] + parts[col + 1 :])
        return G

    def merge(self, other: ClassFactors, cols: Tensor) -> None:
        """Fold another set of factors in; ``cols[j]`` is our column for the other's class j."""
        parts, theirs = self._split(), other._split()
        for j, col in enumerate(cols.tolist()):
            if theirs[j].shape[0]:
                parts[col] = _factor(torch.cat([parts[col], theirs[j].to(self.rows.device)]))
        self._rebuild(parts)

    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + self.sizes.numel() * self.sizes.element_size()

    def check(self, n_classes: int, width: int) -> list[str]:
        bad = []
        if tuple(self.sizes.shape) != (n_classes,):
            bad.append(f"factor sizes {tuple(self.sizes.shape)} != ({n_classes},)")
        elif int(self.sizes.sum()) != self.rows.shape[0]:
            bad.append(f"factor rows {self.rows.shape[0]} != sum of sizes {int(self.sizes.sum())}")
        if self.rows.ndim != 2 or self.rows.shape[1] != width:
            bad.append(f"factor rows {tuple(self.rows.shape)} are not of width {width}")
        return bad


class RidgeStatistics(ResizableBuffersModule):
    """``G = H'H``, ``Q = H'Y`` (one-hot Y) and per-class factors, float64: a ridge is one solve away.

    ``class_factors=False`` saves the factors' memory; then a whole class cannot be forgotten
    (samples still can: their rows come back by re-embedding).
    """

    def __init__(self, class_factors: bool = True) -> None:
        super().__init__()
        self.register_buffer("gram", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(0, 0, dtype=torch.float64))
        self.factors = ClassFactors() if class_factors else None

    def reset(self, width: int) -> None:
        kw = {"dtype": torch.float64, "device": self.gram.device}
        self.gram = torch.zeros(width, width, **kw)
        self.targets = torch.zeros(width, 0, **kw)
        if self.factors is not None:
            self.factors.reset(width)

    def grow(self, k: int) -> None:
        self.targets = torch.cat([self.targets, self.targets.new_zeros(self.targets.shape[0], k)], dim=1)
        if self.factors is not None:
            self.factors.grow(k)

    def add(self, H: Tensor, cols: Tensor, sign: float = 1.0) -> None:
        G = self.gram + sign * (H.T @ H)
        self.gram = 0.5 * (G + G.T)
        self.targets.index_add_(1, cols, H.T, alpha=sign)

    def learn(self, H: Tensor, cols: Tensor) -> None:
        self.add(H, cols)
        if self.factors is not None:
            self.factors.add(H, cols)

    def unlearn(self, H: Tensor, cols: Tensor) -> None:
        self.add(H, cols, sign=-1.0)
        if self.factors is not None:
            self.factors.remove(H, cols)

    def drop_class(self, col: int) -> None:
        if self.factors is None:
            raise ValueError("this learner keeps no per-class factors (class_factors=False): it cannot forget a "
                             "whole class; forget its clips instead")
        G = self.gram - self.factors.drop(col)
        self.gram = 0.5 * (G + G.T)
        self.targets = torch.cat([self.targets[:, :col], self.targets[:, col + 1 :]], dim=1)

    def merge(self, other: RidgeStatistics, cols: Tensor) -> None:
        """Add another learner's statistics; ``cols[j]`` is our column for its class j."""
        self.gram = self.gram + other.gram.to(self.gram.device)
        self.targets.index_add_(1, cols.to(self.gram.device), other.targets.to(self.gram.device))
        if self.factors is not None:
            if other.factors is None:
                raise ValueError("cannot merge statistics without class factors into ones that keep them")
            self.factors.merge(other.factors, cols)

    def solve(self, lam: float) -> Tensor:
        """``(G + lam I)^-1 Q`` by Cholesky (LU when rounding makes the system indefinite)."""
        A = self.gram.clone()
        A.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_solve(self.targets, L)
        return torch.linalg.solve(A, self.targets)

    def check(self, n_classes: int, width: int) -> list[str]:
        bad = []
        if tuple(self.gram.shape) != (width, width):
            bad.append(f"gram {tuple(self.gram.shape)} != ({width}, {width})")
        if tuple(self.targets.shape) != (width, n_classes):
            bad.append(f"targets {tuple(self.targets.shape)} != ({width}, {n_classes})")
        if self.factors is not None:
            bad += self.factors.check(n_classes, width)
        return bad
