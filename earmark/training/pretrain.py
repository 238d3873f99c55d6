"""Self-supervised SSAST-style masked spectrogram patch pretraining of an encoder (before base training).

Why: the base session has few labelled clips; pretraining on unlabelled log-mels (Gong et al., SSAST,
AAAI 2022; SSAMBA for Mamba) gives the encoder a better start than random weights.

Recipe, per clip of the (freq patches x time patches) grid (tokens in the encoder's frequency-major order):

* mask exactly ``k`` patches (``mask_patches``, or ``round(mask_fraction * n)``) grown as squares of side
  ``min_cluster..max_cluster`` around random centres (:func:`cluster_mask`), seeded per step so a resumed
  run draws the same masks and batches as an uninterrupted one;
* masked tokens become a learned mask embedding + their position embedding, *before* the blocks
  (:func:`masked_patch_tokens`; works for every encoder built on :class:`MambaEncoder`, the AST included);
* a discriminative head (Linear-ReLU-Linear, D -> patch*patch) scores each masked position against every
  masked true patch of the same clip (logits = pred @ target^T): InfoNCE, the right patch is its own;
* a generative head (same shape) regresses the true masked patches: MSE;
* loss = nce + mse_weight * mse; Adam(W) with betas (0.95, 0.999), linear warm-up then cosine decay.

Targets are the flattened patches of the (already normalized) input features. Unlike SSAST, which draws a
separate mask for each task and runs the encoder twice, both heads read one masked forward pass (half
the CPU cost).

API::

    from earmark.training.pretrain import PretrainConfig, pretrain, encoder_from_checkpoint
    history = pretrain(encoder, features, PretrainConfig(steps=2000), checkpoint_path="runs/pre.safetensors")
    # history.loss / .nce / .mse / .accuracy: one value per step run in this call
    encoder = encoder_from_checkpoint("runs/pre.safetensors")  # the pretrained encoder alone

``pretrain`` trains ``encoder`` in place. With ``checkpoint_path`` it resumes from that file when it exists
(encoder, mask embedding, heads, optimizer moments and step) and writes it atomically every
``checkpoint_every`` steps and at the end: safetensors for tensors, the JSON header for the rest (no pickle).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from earmark.checkpoint import (
    CheckpointError,
    load_optimizer,
    load_tensors,
    optimizer_tensors,
    prefixed,
    save_tensors,
    unprefixed,
)
from earmark.encoders.config import EncoderConfig, build_encoder
from earmark.encoders.mamba import MambaEncoder
from earmark.training.supervised import lr_factor, no_decay_names

__all__ = [
    "CHECKPOINT_KIND",
    "MaskedPatchModel",
    "PretrainConfig",
    "PretrainHistory",
    "cluster_mask",
    "encoder_from_checkpoint",
    "masked_patch_tokens",
    "patchify",
    "pretrain",
    "pretrain_loss",
]

CHECKPOINT_KIND = "pretrain"


@dataclass
class PretrainConfig:
    """SSAST masked patch modeling; defaults follow the paper where they fit a CPU budget."""

    mask_fraction: float = 0.75  # SSAST: 400 of 512 patches (~0.78)
    mask_patches: int = 0  # exact count per clip; 0 -> round(mask_fraction * patches)
    min_cluster: int = 3  # side range of the masked squares
    max_cluster: int = 5
    epochs: int = 10
    steps: int = 0  # total optimizer steps; 0 -> epochs * (clips // batch_size)
    batch_size: int = 16
    lr: float = 1e-4  # SSAST pretraining lr
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 0.0  # SSAST uses plain Adam; >0 decays only matrices (no_decay_names)
    warmup_steps: int = 1000
    min_lr_ratio: float = 1.0  # cosine decay to lr * min_lr_ratio after warm-up; 1.0 -> constant
    mse_weight: float = 10.0
    grad_clip: float = 0.0  # 0 -> no clipping (as SSAST)
    seed: int = 0
    checkpoint_every: int = 500  # steps; 0 -> only at the end
    threads: int = 2  # intra-op threads while pretraining (restored after); 0 keeps torch's count

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # from JSON: a list
        if not 1 <= self.min_cluster <= self.max_cluster:
            raise ValueError("need 1 <= min_cluster <= max_cluster")
        if not 0 < self.mask_fraction <= 1:
            raise ValueError("mask_fraction must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def mask_count(self, num_patches: int) -> int:
        """Masked patches per clip: at least one, at most all."""
        k = self.mask_patches or round(self.mask_fraction * num_patches)
        return max(1, min(num_patches, k))


@dataclass
class PretrainHistory:
    """Per-step values of the steps run in this call (a resumed run starts at ``start_step``)."""

    loss: list[float] = field(default_factory=list)
    nce: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)  # NCE accuracy; chance is 1 / masked patches
    start_step: int = 0
    end_step: int = 0
    total_steps: int = 0
    seconds: float = 0.0


def cluster_mask(
    batch: int,
    freq: int,
    time_patches: int,
    k: int,
    generator: torch.Generator,
    min_side: int = 3,
    max_side: int = 5,
) -> Tensor:
    """(batch, k) sorted frequency-major indices (band * time_patches + time) of masked patches per clip.

    Squares of a random side in [min_side, max_side] centred on random patches (clipped to the grid) are
    added until ``k`` patches are masked; the last square is cut short so every clip has exactly ``k``
    (SSAST's cluster masking; batches stack without padding).
    """
    n = freq * time_patches
    if not 1 <= k <= n:
        raise ValueError(f"cannot mask {k} of {n} patches")
    out = torch.empty(batch, k, dtype=torch.long)
    for b in range(batch):
        masked = [False] * n
        chosen: list[int] = []
        while len(chosen) < k:
            draws = 32
            centres = torch.randint(n, (draws,), generator=generator).tolist()
            sides = torch.randint(min_side, max_side + 1, (draws,), generator=generator).tolist()
            for centre, side in zip(centres, sides, strict=True):
                r0 = centre // time_patches - side // 2
                c0 = centre % time_patches - side // 2
                for r in range(max(0, r0), min(freq, r0 + side)):
                    for c in range(max(0, c0), min(time_patches, c0 + side)):
                        i = r * time_patches + c
                        if not masked[i] and len(chosen) < k:
                            masked[i] = True
                            chosen.append(i)
                if len(chosen) >= k:
                    break
        out[b] = torch.tensor(sorted(chosen))
    return out


def patchify(fbank: Tensor, patch: int) -> Tensor:
    """(B, n_mels, frames) -> (B, f * t, patch * patch) patches in the encoder's token order (zero-padded
    along time like the encoder), each flattened mel-major like the patch-embedding conv's kernel."""
    b, n_mels, frames = fbank.shape
    f, t = n_mels // patch, max(1, -(-frames // patch))
    if t * patch != frames:
        fbank = F.pad(fbank, (0, t * patch - frames))
    x = fbank.reshape(b, f, patch, t, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(b, f * t, patch * patch)


def masked_patch_tokens(encoder: MambaEncoder, fbank: Tensor, mask: Tensor, mask_embed: Tensor) -> Tensor:
    """Encoder patch-token states (B, n, D) with the patches at ``mask`` (B, k) replaced by ``mask_embed``
    (+ their position embedding) before the blocks; the class token is dropped from the output.

    Mirrors ``MambaEncoder.forward_tokens`` with the encoder's own submodules, so it stays valid for every
    subclass that only swaps blocks (the AST).
    """
    cfg = encoder.config
    if fbank.ndim != 3 or fbank.shape[1] != cfg.n_mels:
        raise ValueError(f"expected (batch, {cfg.n_mels}, frames), got {tuple(fbank.shape)}")
    p = cfg.patch
    frames = fbank.shape[-1]
    _, t = encoder.token_grid(frames)
    x = fbank.to(encoder.patch_embed.weight.dtype)
    if t * p != frames:
        x = F.pad(x, (0, t * p - frames))
    x = encoder.patch_embed(x[:, None]).permute(0, 2, 3, 1).flatten(1, 2)  # (B, n, D) frequency-major
    bsz, n, d = x.shape
    is_masked = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
    is_masked.scatter_(1, mask.to(x.device), True)
    x = torch.where(is_masked[..., None], mask_embed.to(x.dtype).expand(bsz, n, d), x)
    x = x + encoder._positions(t).flatten(1, 2)
    c = encoder.cls_index(n)
    cls = (encoder.cls_token + encoder.cls_pos).expand(bsz, -1, -1)
    x = torch.cat([x[:, :c], cls, x[:, c:]], dim=1)
    for layer in encoder.layers:
        x = layer(x)
    x = encoder.norm_f(x)
    return torch.cat([x[:, :c], x[:, c + 1 :]], dim=1)


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


class MaskedPatchModel(nn.Module):
    """Encoder + learned mask embedding + discriminative and generative heads (D -> patch * patch)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(encoder, MambaEncoder):
            raise TypeError(f"masked patch pretraining needs a patch-token encoder, got {type(encoder).__name__}")
        self.encoder = encoder
        d, p = encoder.config.embed_dim, encoder.config.patch
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.mask_embed, std=0.02, a=-0.04, b=0.04)
        self.disc_head = _head(d, p * p)
        self.gen_head = _head(d, p * p)

    def forward(self, fbank: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Discriminative and generative predictions (B, k, patch * patch) at the masked positions."""
        h = masked_patch_tokens(self.encoder, fbank, mask, self.mask_embed)
        h = torch.gather(h, 1, mask.to(h.device)[..., None].expand(-1, -1, h.shape[-1]))
        return self.disc_head(h), self.gen_head(h)


def pretrain_loss(disc: Tensor, gen: Tensor, target: Tensor, mse_weight: float) -> tuple[Tensor, dict[str, float]]:
    """nce + mse_weight * mse over (B, k, P) predictions and true masked patches, with the NCE accuracy."""
    bsz, k, _ = disc.shape
    logits = disc.float() @ target.float().transpose(1, 2)  # (B, k, k): own clip's masked patches only
    labels = torch.arange(k, device=disc.device).repeat(bsz)
    logits = logits.reshape(bsz * k, k)
    nce = F.cross_entropy(logits, labels)
    mse = F.mse_loss(gen.float(), target.float())
    loss = nce + mse_weight * mse
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, {"loss": loss.item(), "nce": nce.item(), "mse": mse.item(), "accuracy": acc.item()}


def _step_generator(seed: int, *key: int) -> torch.Generator:
    """A generator that depends only on (seed, key): resumed runs redraw the same batches and masks."""
    h = seed & 0xFFFFFFFF
    for v in key:
        h = (h * 1_000_003 + v + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(h)


_optimizer_tensors, _load_optimizer = optimizer_tensors, load_optimizer  # the old private names


def _save(path: Path, model: MaskedPatchModel, opt: torch.optim.Optimizer, step: int, config: PretrainConfig) -> str:
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    meta = {
        "kind": CHECKPOINT_KIND,
        "step": step,
        "encoder_config": model.encoder.config.to_dict(),
        "pretrain_config": config.to_dict(),
        "optimizer": opt_meta,
    }
    return save_tensors(path, prefixed("model", model.state_dict()) | prefixed("optim", opt_tensors), meta)


def _resume(path: Path, model: MaskedPatchModel, opt: torch.optim.Optimizer, config: PretrainConfig) -> int:
    tensors, meta, _ = load_tensors(path, kind=CHECKPOINT_KIND)
    if EncoderConfig.from_dict(meta["encoder_config"]) != model.encoder.config:
        raise CheckpointError(f"{path}: pretrained a different encoder config")
    if PretrainConfig.from_dict(meta["pretrain_config"]) != config:
        warnings.warn(f"{path}: resuming with a different PretrainConfig", stacklevel=3)
    model.load_state_dict(unprefixed("model", tensors))
    _load_optimizer(opt, unprefixed("optim", tensors), meta["optimizer"])
    return int(meta["step"])


def encoder_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The pretrained encoder alone (heads and optimizer dropped), in eval mode."""
    tensors, meta, _ = load_tensors(path, kind=CHECKPOINT_KIND)
    encoder = build_encoder(EncoderConfig.from_dict(meta["encoder_config"]))
    encoder.load_state_dict(unprefixed("model.encoder", tensors))
    return encoder.to(map_location).eval()


def pretrain(
    encoder: nn.Module,
    features: Tensor,
    config: PretrainConfig | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
    *,
    device: str | torch.device = "cpu",
    stop_at: int | None = None,
    resume: bool = True,
) -> PretrainHistory:
    """Pretrain ``encoder`` in place on normalized log-mels ``features`` (N, n_mels, frames).

    ``stop_at`` ends this call (after a checkpoint) once that global step is reached, without changing
    the schedule, so a long run can be split over several calls. ``resume=False`` ignores (and then
    overwrites) an existing checkpoint at ``checkpoint_path``. Batches and masks come from generators
    seeded by (seed, step), so a resumed run is bit-identical to an uninterrupted one on the same machine.
    """
    config = config or PretrainConfig()
    from earmark.training.supervised import training_threads

    with training_threads(config.threads):
        return _pretrain(encoder, features, config, checkpoint_path, progress, device, stop_at, resume)


def _pretrain(
    encoder: nn.Module, features: Tensor, config: PretrainConfig, checkpoint_path: str | Path | None,
    progress: bool, device: str | torch.device, stop_at: int | None, resume: bool,
) -> PretrainHistory:
    features = torch.as_tensor(features, dtype=torch.float32)
    if features.ndim != 3 or len(features) == 0:
        raise ValueError(f"expected features (N, n_mels, frames), got {tuple(features.shape)}")
    device = torch.device(device)
    torch.manual_seed(config.seed)  # head init; a resume overwrites it anyway
    model = MaskedPatchModel(encoder).to(device)
    model.train()
    skip = no_decay_names(model)
    params = [
        {"params": [p for n, p in model.named_parameters() if n not in skip], "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in skip], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas)
    n = len(features)
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = config.steps or steps_per_epoch * config.epochs
    f, t = encoder.token_grid(features.shape[-1])
    k = config.mask_count(f * t)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    step = _resume(path, model, opt, config) if path is not None and resume and path.exists() else 0
    end = total if stop_at is None else min(total, stop_at)
    history = PretrainHistory(start_step=step, total_steps=total)
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="pretraining", unit="step", disable=not progress)
    order, order_epoch = None, -1
    try:
        while step < end:
            epoch, b = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = torch.randperm(n, generator=_step_generator(config.seed, 0, epoch)), epoch
            x = features[order[b * batch : (b + 1) * batch]].to(device)
            mask = cluster_mask(
                len(x), f, t, k, _step_generator(config.seed, 1, step), config.min_cluster, config.max_cluster
            ).to(device)
            patches = patchify(x, encoder.config.patch)
            target = torch.gather(patches, 1, mask[..., None].expand(-1, -1, patches.shape[-1]))
            for g in opt.param_groups:
                g["lr"] = config.lr * lr_factor(step, total, config.warmup_steps, config.min_lr_ratio)
            disc, gen = model(x, mask)
            loss, stats = pretrain_loss(disc, gen, target, config.mse_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            step += 1
            for name in ("loss", "nce", "mse", "accuracy"):
                getattr(history, name).append(stats[name])
            bar.update(1)
            bar.set_postfix(nce=f"{stats['nce']:.3f}", mse=f"{stats['mse']:.3f}", acc=f"{stats['accuracy']:.2f}")
            if path is not None and config.checkpoint_every and step % config.checkpoint_every == 0 and step < end:
                _save(path, model, opt, step, config)
        if path is not None and step > history.start_step:
            _save(path, model, opt, step, config)
    finally:
        bar.close()
    encoder.eval()
    history.end_step = step
    history.seconds = time.perf_counter() - t0
    return history
