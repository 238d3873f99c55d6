"""Bidirectional Mamba encoder over log-mel patches (Audio Mamba / Vision Mamba "v2"), pure PyTorch.

Input: normalized log-mel (batch, n_mels, frames), any number of frames >= 1. Frames are zero-padded
to a whole number of patches (at least one). Patches of ``patch x patch`` (no overlap) become tokens
in frequency-major order: token ``k`` covers frequency band ``k // t`` and time step ``k % t`` of
the (f, t) patch grid, i.e. the scan runs along time within a band, then moves one band up.
A class token is inserted in the middle of the sequence, at index ``n // 2`` of the ``n`` patch
tokens, so both scan directions reach it after half of the clip.

Position embeddings are learned for a grid of ``(n_mels / patch, max_frames / patch)`` patches;
shorter inputs use the first time columns, longer ones a bilinear interpolation of the whole grid
along time (so a clip longer than ``max_frames`` still works, with stretched positions).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earmark.encoders.config import ENCODERS, EncoderConfig, build_encoder
from earmark.encoders.scan import (
    ScanPlan,
    numba_kernel,
    plan_scan,
    require_numba,
    resolve_impl,
    scan_backward,
    scan_forward,
    selective_scan,
    uses_own_scan,
)

__all__ = ["MambaEncoder", "MambaMixer", "MambaBlock", "build_encoder"]


def _no_decay(p: nn.Parameter) -> nn.Parameter:
    p._no_weight_decay = True  # read by MambaEncoder.no_weight_decay_params (and any trainer)
    return p


class _Direction(nn.Module):
    """One scan direction's own parameters: conv, x_proj, dt_proj, A_log, D.

    The backward direction (``reverse``) never flips anything: its conv looks ahead instead of back
    and its scan runs from the last token to the first, which equals running the forward recipe on
    the flipped sequence and flipping the result back (the v2 formulation) without the copies.
    """

    def __init__(self, config: EncoderConfig, reverse: bool = False) -> None:
        super().__init__()
        e, n, r = config.inner_dim, config.d_state, config.rank
        self.config = config
        self.reverse = reverse
        self.conv1d = nn.Conv1d(e, e, config.d_conv, groups=e, padding=config.d_conv - 1)  # depthwise
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        # dt_proj: weights ~ U(+-1/sqrt(R)); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        nn.init.uniform_(self.dt_proj.weight, -(r**-0.5), r**-0.5)
        dt = torch.exp(
            torch.rand(e) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
        ).clamp(min=1e-4)  # clamps only the init draw, like the reference (dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1..N) per channel, kept as float32 log; skip D = 1
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(e, 1)
        self.A_log = _no_decay(nn.Parameter(torch.log(a)))
        self.D = _no_decay(nn.Parameter(torch.ones(e)))

    def params(self) -> tuple[Tensor, ...]:
        """This direction's tensors in the order :func:`_front` takes them."""
        return (
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.dt_proj.bias,
            self.A_log,
            self.D,
        )


class _DepthwiseConv(torch.autograd.Function):
    """The depthwise conv along time of every direction at once: x (batch, L, E), taps w (G, K, E),
    bias b (G, E) -> (G, batch, L, E); direction g causal, or anti-causal where ``reverse[g]``.

    Written as K shifted multiply-adds into one output (no padding copy, no stack of directions,
    no transposes) with a hand-written backward of the same shape: faster than one padded conv
    per direction plus a stack, and than plain autograd through these in-place slices (whose
    backward copies every slice). Tap K-1 multiplies the current step, tap K-1-s the step s
    behind (or, reversed, s ahead)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, reverse: tuple[bool, ...]) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.reverse = reverse
        k = w.shape[1]
        y = torch.addcmul(b[:, None, None, :], x[None], w[:, None, None, k - 1])
        for tap, g, out, src in _shifts(x.shape[1], k, reverse):
            y[g, :, out].addcmul_(x[:, src], w[g, tap])
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        k = w.shape[1]
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        gx = torch.sum(gy * w[:, None, None, k - 1], 0) if need_x else None
        gw = None
        if need_w:
            gw = torch.empty_like(w)
            gw[:, k - 1] = torch.sum(gy * x[None], (1, 2))
            gw[:, : k - 1] = 0  # taps longer than the sequence never touch it
        for tap, g, out, src in _shifts(x.shape[1], k, ctx.reverse):
            if gx is not None:
                gx[:, src].addcmul_(gy[g, :, out], w[g, tap])
            if gw is not None:
                gw[g, tap] = torch.sum(gy[g, :, out] * x[:, src], (0, 1))
        gb = gy.sum((1, 2)) if need_b else None
        return gx, gw, gb, None


def _shifts(length: int, k: int, reverse: tuple[bool, ...]) -> Iterator[tuple[int, int, slice, slice]]:
    """(tap, direction g, output steps, input steps) of each shifted multiply-add
    ``y[g, :, out] += x[:, src] * w[g, tap]``: for shifts s = 1..K-1 shorter than the sequence,
    tap K-1-s reads the step s behind (or, reversed, s ahead)."""
    for s in range(1, min(k, length)):
        head, tail = slice(0, length - s), slice(s, length)
        for g, rev in enumerate(reverse):
            yield k - 1 - s, g, *((head, tail) if rev else (tail, head))


def _conv(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], reverse: tuple[bool, ...]) -> Tensor:
    """Depthwise conv along time of each direction (weights (E, 1, K) as nn.Conv1d's) on x
    (batch, L, E) -> (G, batch, L, E); see :class:`_DepthwiseConv`."""
    w = torch.stack(list(weights))[:, :, 0, :].transpose(1, 2).to(x.dtype).contiguous()  # (G, K, E)
    b = torch.stack(list(biases)).to(x.dtype)
    return _DepthwiseConv.apply(x, w, b, tuple(reverse))


class _ConvSilu(torch.autograd.Function):
    """silu(depthwise conv) of every direction in the numba kernel (one pass over memory instead of
    K multiply-adds and a SiLU), with its backward (``scan_numba.conv_silu``): x (batch, L, E),
    taps w (G, K, E), bias b (G, E) -> (G, batch, L, E). Saves only its inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, reverse: tuple[bool, ...]) -> Tensor:
        ctx.save_for_backward(x, w, b)
        ctx.reverse = reverse
        return numba_kernel().conv_silu(x, w, b, reverse)

    @staticmethod
    def backward(ctx, gu: Tensor) -> tuple[Tensor | None, ...]:
        x, w, b = ctx.saved_tensors
        gx, gw, gb = numba_kernel().conv_silu_backward(x, w, b, ctx.reverse, gu)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        return gx if need_x else None, gw if need_w else None, gb if need_b else None, None


def _conv_silu(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], reverse: tuple[bool, ...]) -> Tensor:
    """silu(:func:`_conv`) through the numba kernel (x float32 or float64 on the CPU)."""
    w = torch.stack(list(weights))[:, :, 0, :].transpose(1, 2).to(x.dtype).contiguous()  # (G, K, E)
    b = torch.stack(list(biases)).to(x.dtype)
    return _ConvSilu.apply(x, w, b, tuple(reverse))


@dataclass(frozen=True)
class _Branch:
    """What the scan branch needs besides tensors: per-direction reverse flags, dt rank, state size."""

    reverse: tuple[bool, ...]
    rank: int
    d_state: int


def _at_least_float32(t: Tensor) -> Tensor:
    """Half and bfloat16 upcast to float32 for the scan; float64 stays float64 (a float64 model
    computes its scan in float64 throughout)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _front(
    branch: _Branch, x: Tensor, params: Sequence[Tensor], softplus: bool = True, kernel: bool = False
) -> tuple[Tensor, ...]:
    """The scan's inputs from x (batch, L, E) and each direction's :meth:`_Direction.params`
    (flattened): conv + silu, x_proj and dt_proj as batched matmuls over the stacked directions,
    softplus (``softplus=False``: left to the numba kernel, which fuses it; delta is then the
    pre-activation; ``kernel``: conv + silu in the numba kernel too). Returns grouped
    (u, delta, A, B, C, D) for :func:`selective_scan`."""
    k = len(params) // len(branch.reverse)
    per = [params[i : i + k] for i in range(0, len(params), k)]
    r, n = branch.rank, branch.d_state
    if kernel:
        xs = _conv_silu(x, [p[0] for p in per], [p[1] for p in per], branch.reverse)
    else:
        xs = _conv(x, [p[0] for p in per], [p[1] for p in per], branch.reverse)
        xs = F.silu(xs, inplace=not torch.is_grad_enabled())  # in place saves a pass; autograd needs the input
    g, bsz, length, e = xs.shape
    rows = xs.view(g, bsz * length, e)
    dbc = torch.bmm(rows, torch.stack([p[2] for p in per]).transpose(1, 2).to(x.dtype))
    dt, b, c = dbc.split([r, n, n], dim=-1)
    w_dt = torch.stack([p[3] for p in per]).transpose(1, 2).to(x.dtype)  # (G, R, E)
    bias = torch.stack([p[4] for p in per])[:, None].to(x.dtype)
    delta = _at_least_float32(torch.baddbmm(bias, dt, w_dt))
    delta = F.softplus(delta) if softplus else delta
    a = -torch.exp(_at_least_float32(torch.stack([p[5] for p in per])))
    skip = _at_least_float32(torch.stack([p[6] for p in per]))
    shape = (g, bsz, length)
    return xs, delta.view(*shape, e), a, b.reshape(*shape, n), c.reshape(*shape, n), skip


class _RecomputedBranch(torch.autograd.Function):
    """conv -> projections -> scan of all directions, saving only its input x (and the scan's
    block-start states): backward recomputes the front (:func:`_front`), as mamba-ssm's fused
    ``mamba_inner_fn`` recomputes conv and delta. Autograd would otherwise keep about ten
    (batch, L, E) tensors per block - most of a Mamba training step's memory."""

    @staticmethod
    def forward(ctx, branch: _Branch, plan_args: tuple, x: Tensor, *params: Tensor) -> Tensor:
        u, delta, A, B, C, D = _front(branch, x, params)
        plan = plan_scan(u, A, plan_args[0], chunk=plan_args[1], reverse=branch.reverse)
        y, states = scan_forward(u, delta, A, B, C, D, plan, keep_states=True)
        ctx.save_for_backward(x, *params, states)
        ctx.branch, ctx.plan = branch, plan
        device = x.device.type  # the recompute must see the forward's autocast state
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, *params, states = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, *params), needs, strict=True)]
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            outs = _front(ctx.branch, leaves[0], leaves[1:])
        g_outs = scan_backward(*(t.detach() for t in outs), gy, ctx.plan, states, [t.requires_grad for t in outs])
        pairs = [(o, g) for o, g in zip(outs, g_outs, strict=True) if g is not None]
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return (None, None, *(next(got) if t.requires_grad else None for t in leaves))


def _gated_scan(branch: _Branch, plan: ScanPlan, x: Tensor, z: Tensor, params: Sequence[Tensor], keep: bool):
    """The numba kernel on the front's outputs with the gate fused: mean over directions of
    y_g * silu(z), summed in the kernel. Returns (output, the kernel's saved states)."""
    u, delta, A, B, C, D = (t.detach() for t in _front(branch, x, params, softplus=False, kernel=True))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    args = (t.to(dtype) for t in (u, delta, A, B, C, D))
    y, states = numba_kernel().forward(
        *args,
        plan.reverse,
        z=z,
        scale=1.0 / len(plan.reverse),
        softplus=True,
        keep_states=keep,
        sum_groups=True,
        chunk=plan.block,
    )
    return y.to(x.dtype), states


class _FusedBranch(torch.autograd.Function):
    """conv -> projections -> scan -> average of the directions -> SiLU(z) gate, with the numba
    kernel: as :class:`_RecomputedBranch` (only x, z and the kernel's chunk states are saved; the
    front is recomputed in backward), and the gate inside the kernel, so one pass over memory
    produces the gated output and one produces every scan gradient including dz."""

    @staticmethod
    def forward(ctx, branch: _Branch, plan: ScanPlan, x: Tensor, z: Tensor, *params: Tensor) -> Tensor:
        y, states = _gated_scan(branch, plan, x, z, params, keep=True)
        ctx.save_for_backward(x, z, *params, states)
        ctx.branch, ctx.plan = branch, plan
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, z, *params, states = ctx.saved_tensors
        plan = ctx.plan
        needs = (ctx.needs_input_grad[2], *ctx.needs_input_grad[4:])
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, *params), needs, strict=True)]
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            outs = _front(ctx.branch, leaves[0], leaves[1:], softplus=False, kernel=True)
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        args = [t.detach().to(cdt) for t in outs]
        groups = len(plan.reverse)
        gys = gy.to(cdt).expand(groups, *gy.shape)
        *g_outs, g_z = numba_kernel().backward(
            *args, plan.reverse, states, gys, z=z, scale=1.0 / groups, softplus=True, chunk=plan.block
        )
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, g_outs, strict=True) if o.requires_grad]
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        grads = [next(got) if t.requires_grad else None for t in leaves]
        g_z = g_z.to(z.dtype) if ctx.needs_input_grad[3] else None
        return (None, None, grads[0], g_z, *grads[1:])


class MambaMixer(nn.Module):
    """Mamba mixer; with ``bidirectional`` the v2 form: shared in/out projections, a second
    direction over the reversed sequence, outputs averaged before out_proj.

    The gate is applied once to the average: (y_f * g + flip(y_b(flip x) * flip g)) / 2 equals
    (y_f + y_b_reversed) / 2 * g with g = silu(z). Both directions run as one grouped computation
    (stacked x_proj / dt_proj matmuls, one scan over both): half the per-step overhead of two scans.
    With ``config.recompute`` (the default) a training forward keeps only the branch's input and
    recomputes conv and projections in backward (:class:`_RecomputedBranch`, or with the numba
    kernel :class:`_FusedBranch`, which also fuses softplus, the direction average and the gate):
    about half the bytes kept for backward at about the same step time (benchmarks/recompute.py
    and benchmarks/encoders.py measure both).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        d, e = config.embed_dim, config.inner_dim
        self.config = config
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.fwd = _Direction(config)
        self.bwd = _Direction(config, reverse=True) if config.bidirectional else None
        self.out_proj = nn.Linear(e, d, bias=False)
        with torch.no_grad():  # keep the residual stream's variance ~flat over depth
            self.out_proj.weight.div_(math.sqrt(config.depth))

    def directions(self) -> list[_Direction]:
        return [self.fwd] if self.bwd is None else [self.fwd, self.bwd]

    def forward(self, h: Tensor) -> Tensor:
        x, z = self.in_proj(h).chunk(2, dim=-1)
        dirs = self.directions()
        cfg = self.config
        branch = _Branch(tuple(d.reverse for d in dirs), cfg.rank, cfg.d_state)
        params = [p for d in dirs for p in d.params()]
        # the kernel with gate and softplus fused; not under low-precision autocast, where the
        # unfused path rounds the scan output to x's dtype before the gate (kept identical)
        gate_fused = cfg.recompute or not torch.is_grad_enabled()
        if (
            gate_fused
            and x.dtype in (torch.float32, torch.float64)
            and resolve_impl(x, dirs[0].A_log, cfg.scan_impl) == "numba"
        ):
            plan = ScanPlan(0, require_numba(x).CHUNK, branch.reverse, "numba")
            if torch.is_grad_enabled() and any(t.requires_grad for t in (x, z, *params)):
                y = _FusedBranch.apply(branch, plan, x, z, *params)
            else:
                y = _gated_scan(branch, plan, x, z, params, keep=False)[0]
            return self.out_proj(y)
        fused = cfg.recompute and uses_own_scan(x, cfg.scan_impl)
        if fused and torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
            y = _RecomputedBranch.apply(branch, (cfg.scan_impl, cfg.scan_chunk), x, *params)
        else:
            u, delta, a, b, c, skip = _front(branch, x, params)
            y = selective_scan(
                u, delta, a, b, c, skip, chunk=cfg.scan_chunk, impl=cfg.scan_impl, reverse=branch.reverse
            ).to(x.dtype)
        y = y[0] if y.shape[0] == 1 else y.mean(0)
        if torch.is_grad_enabled():
            return self.out_proj(y * F.silu(z))
        return self.out_proj(y.mul_(F.silu(z, inplace=True)))  # y and z are ours: two tensors fewer


class MambaBlock(nn.Module):
    """Pre-norm residual block: h + mixer(norm(h))."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(config.embed_dim, eps=1e-5)
        self.mixer = MambaMixer(config)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.mixer(self.norm(h))


@ENCODERS.register("mamba")
class MambaEncoder(nn.Module):
    """(batch, n_mels, frames) log-mel -> (batch, embed_dim) clip embedding."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        config = config or EncoderConfig()
        self.config = config
        d, p = config.embed_dim, config.patch
        self.freq_patches = config.n_mels // p
        self.max_time_patches = config.max_frames // p
        self.patch_embed = nn.Conv2d(1, d, kernel_size=p, stride=p)
        self.pos_embed = _no_decay(nn.Parameter(torch.zeros(1, self.freq_patches, self.max_time_patches, d)))
        self.cls_token = _no_decay(nn.Parameter(torch.zeros(1, 1, d)))
        self.cls_pos = _no_decay(nn.Parameter(torch.zeros(1, 1, d)))
        for t in (self.pos_embed, self.cls_token, self.cls_pos):  # cut at 2 std (not at +-2 absolute)
            nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04)
        self.layers = nn.ModuleList(self.make_block(config) for _ in range(config.depth))
        self.norm_f = self.make_norm(d)
        # The width of the clip embedding (config.out_dim): what heads on top of the encoder read. The
        # token width stays config.embed_dim.
        self.embed_dim = config.out_dim
        if config.pool == "attention":  # one token scorer per pooled layer; zero: starts as the mean
            self.pool_attn = nn.ModuleList(nn.Linear(d, 1) for _ in range(config.pool_layers))
            for lin in self.pool_attn:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    @staticmethod
    def make_block(config: EncoderConfig) -> nn.Module:
        """One residual block; subclasses (the AST) swap the mixer and keep the patch/token front end."""
        return MambaBlock(config)

    @staticmethod
    def make_norm(dim: int) -> nn.Module:
        return nn.RMSNorm(dim, eps=1e-5)

    def token_grid(self, frames: int) -> tuple[int, int]:
        """(freq patches, time patches) for an input of ``frames`` frames (after padding)."""
        return self.freq_patches, max(1, -(-frames // self.config.patch))

    @staticmethod
    def cls_index(num_patches: int) -> int:
        """Where the class token sits in a sequence of ``num_patches`` patch tokens (+ the class)."""
        return num_patches // 2

    def _positions(self, t: int) -> Tensor:
        pos = self.pos_embed
        if t > self.max_time_patches:
            grid = pos.permute(0, 3, 1, 2)  # (1, D, f, T_max)
            grid = F.interpolate(grid, size=(self.freq_patches, t), mode="bilinear", align_corners=False)
            return grid.permute(0, 2, 3, 1)
        return pos[:, :, :t]

    def forward_tokens(self, fbank: Tensor) -> Tensor:
        """Final-normed hidden states (batch, n + 1, D), the class token at index n // 2."""
        return self.hidden_states(fbank, 1)[0]

    def hidden_states(self, fbank: Tensor, last: int = 1) -> list[Tensor]:
        """The outputs of the last ``last`` blocks, each through the final norm, oldest first: a list of
        (batch, n + 1, D) with the class token at index n // 2; the last item is :meth:`forward_tokens`."""
        if fbank.ndim != 3 or fbank.shape[1] != self.config.n_mels:
            raise ValueError(f"expected (batch, {self.config.n_mels}, frames), got {tuple(fbank.shape)}")
        if not 1 <= last <= len(self.layers):
            raise ValueError(f"last must be in 1..{len(self.layers)}, got {last}")
        p = self.config.patch
        frames = fbank.shape[-1]
        _, t = self.token_grid(frames)
        x = fbank.to(self.patch_embed.weight.dtype)
        if t * p != frames:
            x = F.pad(x, (0, t * p - frames))
        x = self.patch_embed(x[:, None])  # (B, D, f, t)
        x = x.permute(0, 2, 3, 1) + self._positions(t)  # (B, f, t, D)
        x = x.flatten(1, 2)  # frequency-major: index = band * t + time
        n = x.shape[1]
        c = self.cls_index(n)
        cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :c], cls, x[:, c:]], dim=1)
        kept = []
        first_kept = len(self.layers) - last
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i >= first_kept:
                kept.append(self.norm_f(x))
        return kept

    def forward(self, fbank: Tensor) -> Tensor:
        cfg = self.config
        if cfg.pool_layers == 1 and cfg.pool_norm == "none" and cfg.pool in ("cls", "mean"):
            return self._pool_tokens(self.forward_tokens(fbank), 0)[0]  # the original embedding, op for op
        parts = [
            [self._rms(v) for v in self._pool_tokens(tokens, k)]
            for k, tokens in enumerate(self.hidden_states(fbank, cfg.pool_layers))
        ]
        per_layer = [torch.cat(p, dim=-1) if len(p) > 1 else p[0] for p in parts]
        if cfg.layer_merge == "mean":
            return torch.stack(per_layer).mean(0)
        return torch.cat(per_layer, dim=-1) if len(per_layer) > 1 else per_layer[0]

    def _rms(self, v: Tensor) -> Tensor:
        if self.config.pool_norm == "rms":
            return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        return v

    def _pool_tokens(self, tokens: Tensor, layer: int) -> list[Tensor]:
        """The pooled vectors of one layer's tokens (one, or two for "mean+max"), each (batch, D)."""
        pool = self.config.pool
        c = self.cls_index(tokens.shape[1] - 1)
        if pool == "cls":
            return [tokens[:, c]]
        out = []
        if pool in ("mean", "mean+max"):
            out.append((tokens.sum(1) - tokens[:, c]) / (tokens.shape[1] - 1))
        if pool in ("max", "mean+max"):
            out.append(torch.cat([tokens[:, :c], tokens[:, c + 1 :]], dim=1).amax(1))
        if pool == "attention":
            patches = torch.cat([tokens[:, :c], tokens[:, c + 1 :]], dim=1)
            weights = torch.softmax(self.pool_attn[layer](patches).float(), dim=1).to(patches.dtype)
            out.append((weights * patches).sum(1))
        return out

    def no_weight_decay_params(self) -> set[str]:
        """Names (relative to this module) of parameters to keep out of weight decay: A_log, D,
        position embeddings, class token, norm weights and all biases."""
        return {
            name
            for name, p in self.named_parameters()
            if getattr(p, "_no_weight_decay", False) or p.ndim <= 1 or name.endswith("bias")
        }
