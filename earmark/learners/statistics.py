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

Solving is kept apart from the statistics (:class:`LowRankSolver`): a full Cholesky of the D x D system
costs O(D^3) (about 0.1-0.2 s at D = 2048 on two cores), while a learn or a forget changes the Gram by a
few rows. The solver keeps one factorization and answers the changed rows through the Woodbury
identity; it refactors from the statistics when the corrections grow, and whenever a probe of the
residual says the fast answer is not as accurate as a fresh Cholesky. The statistics stay the truth.
"""

from __future__ import annotations

import copy

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


class FoldsOnRead(ResizableBuffersModule):
    """Statistics whose latest changes wait in ``_pending`` and are folded into the buffers named in
    ``fold_on_read`` by ``_fold()``: on any read of those buffers, before a state dict is taken, and before
    a move or cast; loading a state drops what waits. Subclasses define ``_fold`` and an empty ``_pending``.
    Why: a change of a few rows would otherwise rewrite the whole buffer each time."""

    fold_on_read: tuple[str, ...] = ()

    def __getattr__(self, name: str):
        if name in self.fold_on_read and self.__dict__.get("_pending"):
            self._fold()
        return super().__getattr__(name)

    def _fold(self) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, *args, **kwargs) -> None:
        self._fold()
        super()._save_to_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._fold()  # moves and casts see the whole state
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._pending = type(self._pending)()
        super()._load_from_state_dict(*args, **kwargs)


class ClassFactors(FoldsOnRead):
    """Per-class Gram factors ``F_c`` (``F_c' F_c = sum over the class of h h'``), packed in one tensor.

    ``rows`` stacks every class's factor (classes in column order); ``sizes[c]`` is class c's row count.
    Rows added wait (in memory, never in a state dict) until anything reads ``rows`` or ``sizes``, or
    ``max_pending`` rows wait: re-mixing a class's factor costs an eigendecomposition of its row count
    squared, so a service learning one clip at a time would pay O(m^3) per clip for a class of m rows.
    """

    max_pending = 64
    fold_on_read = ("rows", "sizes")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("rows", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("sizes", torch.zeros(0, dtype=torch.long))
        self._pending: dict[int, list[Tensor]] = {}

    def _fold(self) -> None:
        pending, self._pending = self._pending, {}
        if pending:
            parts = self._split()
            for col, blocks in pending.items():
                parts[col] = _factor(torch.cat([parts[col], *blocks]))
            self._rebuild(parts)

    def unfolded_bytes(self) -> int:
        """What folding the waiting rows will add to ``rows`` (a class keeps at most ``width`` rows), so memory
        accounting counts the state as it will be saved without folding it."""
        rows, sizes = self._buffers["rows"], self._buffers["sizes"]
        width = rows.shape[1] if rows.ndim == 2 else 0
        extra = sum(min(int(sizes[c]) + sum(len(b) for b in blocks), width) - int(sizes[c])
                    for c, blocks in self._pending.items())
        return extra * width * rows.element_size()

    def reset(self, width: int) -> None:
        self._pending = {}
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
        """Rows ``H`` (float64) join the factors of their classes (mixed in at the next fold)."""
        for col in torch.unique(cols).tolist():
            self._pending.setdefault(col, []).append(H[cols == col])
        if sum(len(b) for blocks in self._pending.values() for b in blocks) >= self.max_pending:
            self._fold()

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
        """Remove class ``col``; returns its factor (``F'F`` is its Gram)."""
        parts = self._split()
        F = parts[col]  # a view that keeps the old packed rows alive until the caller is done with it
        self._rebuild(parts[:col] + parts[col + 1 :])
        return F

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


def chol_solve(B: Tensor, L: Tensor) -> Tensor:
    """``(L L')^-1 B`` by two triangular solves: several times faster than ``torch.cholesky_solve`` on the CPU,
    whose helper copies both operands first (15 ms against 2 ms for one vector at D = 2048)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


class LowRankSolver:
    """``(G + lam I)^-1 Q`` for statistics that change by a few rows at a time, never drifting from a fresh solve.

    Holds the Cholesky factor ``L`` of ``A0 = G0 + lam I`` at its last factorization and the rows ``U`` (r x D,
    signs ``s``) added to or removed from the Gram since, so ``A = A0 + U' diag(s) U``. With ``K = A0^-1 U'``
    and ``Z = A0^-1 Q`` (both kept up to date: each change costs one triangular solve per changed row),
    Woodbury gives ``A^-1 Q = Z - K (diag(s) + U K)^-1 U Z``: O(D r (C + r)) instead of O(D^3). It is used
    only while the capacitance ``M = diag(s) + U K`` has a condition number under ``max_cond``. Each answer
    is checked along a fixed vector v: residual ``r = Q v - A W v`` (one D x D product), error ``A^-1 r``.
    An estimated error above ``tol`` relative (or above ``slack`` times what the fresh solve itself reached
    along the probe, when that is worse), a change of lam, a merge, a load, or more than ``max_rows``
    rows in U make the next solve a full Cholesky of the current statistics. Not state: nothing here is saved.
    ``probe=False`` skips the probe (the capacitance's condition check stays): for a learner whose answers
    only feed a fit that needs a few digits, such as a calibration's shadow; the probe costs two triangular
    solves and a D x D product per answer.
    """

    def __init__(self, max_rows: int = 256, tol: float = 1e-11, slack: float = 10.0, max_cond: float = 1e4,
                 probe: bool = True) -> None:
        self.probe = probe
        self.max_rows = max_rows
        self.max_cond = max_cond
        self.tol = tol
        self.slack = slack
        self.invalidate()
        self.factorizations = 0  # full Cholesky solves so far (tests and benchmarks read it)
        self.rejected = 0  # low-rank answers the error probe sent back to a full solve

    def __deepcopy__(self, memo: dict) -> LowRankSolver:
        """Copies share the factor L (never changed in place, only replaced); the rest is small and copied."""
        other = copy.copy(self)
        for name in ("Z", "U", "K", "signs", "UK"):
            if hasattr(self, name):
                setattr(other, name, getattr(self, name).clone())
        return other

    def invalidate(self) -> None:
        self.L: Tensor | None = None
        self.lam: float | None = None

    @property
    def ready(self) -> bool:
        return self.L is not None

    def _start(self, gram: Tensor | PendingGram, targets: Tensor, lam: float) -> Tensor:
        gram = gram.dense() if isinstance(gram, PendingGram) else gram
        A = gram.clone()
        A.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:  # SPD in exact arithmetic; LU when rounding says otherwise, and no cache
            self.invalidate()
            return torch.linalg.solve(A, targets)
        self.factorizations += 1
        self.L, self.lam = L, lam
        self.Z = chol_solve(targets, L)
        width = gram.shape[0]
        self.U = gram.new_zeros(0, width)
        self.K = gram.new_zeros(width, 0)
        self.signs = gram.new_zeros(0)
        self.UK = gram.new_zeros(0, 0)
        # What a fresh solve itself achieves along the probe: on an ill-conditioned system even Cholesky's
        # answer is off by more than tol, and a low-rank answer need not beat it, only stay near it.
        self.floor = self._probe_error(gram, targets, lam, self.Z, lambda r: chol_solve(r, L))
        return self.Z.clone()

    @staticmethod
    def _probe_error(gram: Tensor | PendingGram, targets: Tensor, lam: float, W: Tensor, inverse) -> float:
        """Relative error of W along a fixed probe v: ``|A^-1 (Q v - A W v)| / |W v|``, with ``inverse`` for A^-1."""
        g = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(W.shape[1], 1, generator=g, dtype=W.dtype).to(W.device)
        w = W @ v
        r = targets @ v - gram @ w - lam * w
        return float(inverse(r).norm() / w.norm().clamp_min(torch.finfo(W.dtype).tiny))

    def rows(self, H: Tensor, cols: Tensor | None, sign: float) -> None:
        """The Gram gains ``sign * H'H``; ``cols`` (or None) are the rows' target columns in Q."""
        if not self.ready or not len(H):
            return
        if self.U.shape[0] + H.shape[0] > self.max_rows:
            self.invalidate()
            return
        Kn = chol_solve(H.T, self.L)  # (D, k) = A0^-1 H'
        cross = self.U @ Kn  # (r, k)
        self.UK = torch.cat([torch.cat([self.UK, cross], 1), torch.cat([cross.T, H @ Kn], 1)], 0)
        self.U = torch.cat([self.U, H])
        self.K = torch.cat([self.K, Kn], 1)
        self.signs = torch.cat([self.signs, self.signs.new_full((H.shape[0],), sign)])
        if cols is not None:
            self.Z.index_add_(1, cols, Kn, alpha=sign)

    def grow(self, k: int) -> None:
        if self.ready:
            self.Z = torch.cat([self.Z, self.Z.new_zeros(self.Z.shape[0], k)], 1)

    def drop_column(self, col: int) -> None:
        if self.ready:
            self.Z = torch.cat([self.Z[:, :col], self.Z[:, col + 1 :]], 1)

    def solve(self, gram: Tensor | PendingGram, targets: Tensor, lam: float) -> Tensor:
        """``(G + lam I)^-1 Q``; ``gram``: G, or a :class:`PendingGram` (products only, unless a refactor needs G)."""
        if not self.ready or self.lam != lam or self.L.device != gram.device or self.Z.shape != targets.shape:
            return self._start(gram, targets, lam)
        if not len(self.U):
            return self.Z.clone()
        M = self.UK.clone()
        M.diagonal().add_(self.signs)
        # Removing rows that dominated some directions makes the capacitance M ill-conditioned, and Woodbury
        # loses about cond(M) ulps: then a fresh Cholesky answers instead. M = S + U A0^-1 U' is symmetric, so
        # its condition number comes from its eigenvalues (several times cheaper than the SVD behind cond()).
        ev = torch.linalg.eigvalsh(0.5 * (M + M.T)).abs()
        if not float(ev.max()) <= self.max_cond * float(ev.min()):
            self.rejected += 1
            return self._start(gram, targets, lam)
        lu, piv = torch.linalg.lu_factor(M)

        def apply(B: Tensor, A0_inv_B: Tensor) -> Tensor:  # A^-1 B, given A0^-1 B
            return A0_inv_B - self.K @ torch.linalg.lu_solve(lu, piv, self.U @ A0_inv_B)

        W = apply(targets, self.Z)
        if not self.probe:
            return W
        err = self._probe_error(gram, targets, lam, W, lambda r: apply(r, chol_solve(r, self.L)))
        if not err <= max(self.tol, self.slack * self.floor):
            self.rejected += 1
            return self._start(gram, targets, lam)
        return W


class PendingGram:
    """The Gram as folded so far plus the signed rows not yet folded in: ``G = G0 + P' diag(s) P``.

    What the solver's error probe reads: ``G w`` costs one D x D product either way, while folding a few
    rows in costs a D x D read-modify-write (a rank-k ``addmm_``) for each learn. ``dense()`` folds.
    """

    def __init__(self, stats: RidgeStatistics) -> None:
        self.stats = stats

    @property
    def device(self) -> torch.device:
        return self.stats._buffers["gram"].device

    def __matmul__(self, w: Tensor) -> Tensor:
        P, s = self.stats._pending_rows()
        return self.stats._buffers["gram"] @ w + P.T @ (s.unsqueeze(1) * (P @ w))

    def dense(self) -> Tensor:
        return self.stats.gram


class RidgeStatistics(FoldsOnRead):
    """``G = H'H``, ``Q = H'Y`` (one-hot Y) and per-class factors, float64: a ridge is one solve away.

    ``class_factors=False`` saves the factors' memory; then a whole class cannot be forgotten
    (samples still can: their rows come back by re-embedding).

    Rows added to (or taken from) the Gram wait in a short pending list and are folded in with one rank-k
    update when anything reads ``gram`` (a save, a refactor, a merge), or when ``max_pending`` rows wait:
    a learn of one clip would otherwise rewrite all D x D floats (4 ms at D = 2048) for a rank-1 change,
    and the low-rank solver needs only products with G. Reading ``self.gram`` always gives the whole sum.
    """

    max_pending = 64
    fold_on_read = ("gram",)

    def __init__(self, class_factors: bool = True) -> None:
        super().__init__()
        self.register_buffer("gram", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(0, 0, dtype=torch.float64))
        self.factors = ClassFactors() if class_factors else None
        self.solver = LowRankSolver()
        self._pending: list[tuple[Tensor, float]] = []

    def _pending_rows(self) -> tuple[Tensor, Tensor]:
        P = torch.cat([H for H, _ in self._pending])
        s = torch.cat([H.new_full((H.shape[0],), sign) for H, sign in self._pending])
        return P, s

    def _defer(self, H: Tensor, sign: float) -> None:
        if len(H):
            self._pending.append((H, sign))
            if sum(len(h) for h, _ in self._pending) >= self.max_pending:
                self._fold()

    def _fold(self) -> None:
        if self._pending:
            P, s = self._pending_rows()
            self._pending = []
            self._buffers["gram"].addmm_(P.T, s.unsqueeze(1) * P)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.solver.invalidate()
        super()._load_from_state_dict(*args, **kwargs)

    def reset(self, width: int) -> None:
        self._pending = []
        kw = {"dtype": torch.float64, "device": self.gram.device}
        self.gram = torch.zeros(width, width, **kw)
        self.targets = torch.zeros(width, 0, **kw)
        if self.factors is not None:
            self.factors.reset(width)
        self.solver.invalidate()

    def grow(self, k: int) -> None:
        self.targets = torch.cat([self.targets, self.targets.new_zeros(self.targets.shape[0], k)], dim=1)
        if self.factors is not None:
            self.factors.grow(k)
        self.solver.grow(k)

    def add(self, H: Tensor, cols: Tensor, sign: float = 1.0) -> None:
        """Rank-k change of the Gram (deferred: see the class docstring) and of the targets."""
        self._defer(H, sign)
        self.targets.index_add_(1, cols, H.T, alpha=sign)
        self.solver.rows(H, cols, sign)

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
        F = self.factors.drop(col)
        self._defer(F, -1.0)
        self.targets = torch.cat([self.targets[:, :col], self.targets[:, col + 1 :]], dim=1)
        self.solver.rows(F, None, -1.0)  # the class's target column goes with it, so Q's other columns keep
        self.solver.drop_column(col)

    def merge(self, other: RidgeStatistics, cols: Tensor) -> None:
        """Add another learner's statistics; ``cols[j]`` is our column for its class j."""
        self.solver.invalidate()  # a full-rank change
        self.gram = self.gram + other.gram.to(self.gram.device)
        self.targets.index_add_(1, cols.to(self.gram.device), other.targets.to(self.gram.device))
        if self.factors is not None:
            if other.factors is None:
                raise ValueError("cannot merge statistics without class factors into ones that keep them")
            self.factors.merge(other.factors, cols)

    def solve(self, lam: float) -> Tensor:
        """``(G + lam I)^-1 Q``: Cholesky of the statistics, or its low-rank update (:class:`LowRankSolver`)."""
        gram = PendingGram(self) if self._pending else self.gram
        return self.solver.solve(gram, self.targets, lam)

    def check(self, n_classes: int, width: int) -> list[str]:
        bad = []
        if tuple(self.gram.shape) != (width, width):
            bad.append(f"gram {tuple(self.gram.shape)} != ({width}, {width})")
        if tuple(self.targets.shape) != (width, n_classes):
            bad.append(f"targets {tuple(self.targets.shape)} != ({width}, {n_classes})")
        if self.factors is not None:
            bad += self.factors.check(n_classes, width)
        return bad
