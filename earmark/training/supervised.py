"""Supervised base-session training of an encoder with a linear head (then the encoder is frozen)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from earmark.checkpoint import (
    FingerprintError,
    fingerprint_differences,
    load_optimizer,
    load_tensors,
    optimizer_tensors,
    prefixed,
    save_tensors,
    unprefixed,
)

CHECKPOINT_KIND = "train-partial"
# TrainConfig fields that do not change what training computes (left out of fingerprints and cache keys).
NOT_IN_RESULT = ("checkpoint_every",)


@dataclass
class TrainConfig:
    """AdamW with linear warm-up and cosine decay, SpecAugment masking and mixup."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.02
    freq_masks: int = 2
    freq_mask_width: int = 20
    time_masks: int = 2
    time_mask_width: int = 30
    mixup_alpha: float = 0.4
    mixup_prob: float = 0.0  # off by default: it slows the short CPU schedules down; SSAMBA uses 0.5
    label_smoothing: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # Intra-op threads while training (restored afterwards); 0 keeps torch's current count. Part of the
    # result: see training_threads() for which reductions change with it.
    threads: int = 2
    checkpoint_every: int = 1  # epochs between checkpoints when a checkpoint path is given; 0: only at the end

    def to_dict(self) -> dict:
        return asdict(self)

    def result_dict(self) -> dict:
        """The fields that decide the trained weights (for cache keys and checkpoint fingerprints)."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IN_RESULT}


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch
    accuracy: list[float] = field(default_factory=list)  # training accuracy per epoch (unmixed items)
    seconds: float = 0.0


def spec_augment(x: Tensor, config: TrainConfig, gen: torch.Generator) -> Tensor:
    """Zero random frequency bands and time spans per item (SpecAugment without warping).

    Features are normalized to about zero mean, so zero is the neutral fill.
    """
    b, n_mels, frames = x.shape
    x = x.clone()
    mel_idx = torch.arange(n_mels, device=x.device)[None, :]
    time_idx = torch.arange(frames, device=x.device)[None, :]
    for count, width, size, idx, dim in (
        (config.freq_masks, config.freq_mask_width, n_mels, mel_idx, 1),
        (config.time_masks, config.time_mask_width, frames, time_idx, 2),
    ):
        for _ in range(count):
            w = (torch.rand(b, 1, generator=gen) * (min(width, size) + 1)).long().to(x.device)
            start = (torch.rand(b, 1, generator=gen) * (size - w + 1).cpu()).long().to(x.device)
            mask = (idx >= start) & (idx < start + w)  # (b, size)
            x = x.masked_fill(mask[:, :, None] if dim == 1 else mask[:, None, :], 0.0)
    return x


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters kept out of weight decay: the encoder's own list plus every bias and norm."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay_params", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    for name, p in model.named_parameters():
        if p.ndim <= 1:
            names.add(name)
    return names


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class ClassifierModel(nn.Module):
    """Encoder + linear head over its embedding; the head is dropped after base training."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


@contextlib.contextmanager
def training_threads(threads: int) -> Iterator[None]:
    """Run a block with ``threads`` intra-op threads (0: unchanged) and deterministic algorithms on.

    Matrix products and reductions split their work by thread, so the thread count changes the
    summation order (see benchmarks/reproducibility.py); fixing it makes a training reproducible on
    machines with other core counts. ``use_deterministic_algorithms`` (warn only) matters for CUDA
    and a few CPU scatter ops; uninitialised-memory filling stays off (it only costs time when every
    kernel writes its whole output).
    """
    import torch.utils.deterministic as det

    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = det.fill_uninitialized_memory
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def mixup_lambda(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw from ``gen`` (torch's Beta sampler only reads the global RNG)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def data_digest(*tensors: Tensor) -> str:
    """sha256 over the tensors' dtypes, shapes and bytes, in order (e.g. features and labels)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_digest(state: dict[str, Tensor]) -> str:
    """sha256 of a state dict: its names, in sorted order, then :func:`data_digest` of the tensors."""
    names = sorted(state)
    return hashlib.sha256(json.dumps(names).encode() + data_digest(*(state[n] for n in names)).encode()).hexdigest()


def _fingerprint(model: nn.Module, features: Tensor, labels: Tensor, num_classes: int, config: TrainConfig) -> dict:
    return {
        "train": config.result_dict(),
        "num_classes": num_classes,
        "data": data_digest(features, labels),
        "parameters": {n: list(p.shape) for n, p in model.named_parameters()},
    }


def save_training_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, epoch: int, step: int,
    history: TrainHistory, fingerprint: dict, kind: str = CHECKPOINT_KIND,
) -> None:
    """Write the whole state of a training loop atomically: ``model``'s state dict, the optimizer, the
    batch generator and the global RNG, epoch, step, history and the ``fingerprint`` of what is trained."""
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = prefixed("model", model.state_dict()) | prefixed("optim", opt_tensors)
    tensors |= {"rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()}
    meta = {"kind": kind, "epoch": epoch, "step": step, "fingerprint": fingerprint,
            "optimizer": opt_meta, "history": {"loss": history.loss, "accuracy": history.accuracy,
                                               "seconds": history.seconds}}
    save_tensors(path, tensors, meta)


def load_training_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, history: TrainHistory,
    fingerprint: dict, kind: str = CHECKPOINT_KIND,
) -> tuple[int, int]:
    """Inverse of :func:`save_training_checkpoint`; returns (epoch, step). A checkpoint whose fingerprint
    differs is a :class:`FingerprintError`, raised before anything is changed."""
    tensors, meta, _ = load_tensors(path, kind=kind)
    what = fingerprint_differences(meta.get("fingerprint", {}), fingerprint)
    if what:
        raise FingerprintError(f"{path}: a checkpoint of another training ({', '.join(what)} differ); "
                               "delete it or train with resume=False (CLI: --no-resume)")
    model.load_state_dict(unprefixed("model", tensors))
    load_optimizer(opt, unprefixed("optim", tensors), meta["optimizer"])
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    history.loss[:] = meta["history"]["loss"]
    history.accuracy[:] = [float("nan") if a is None else a for a in meta["history"]["accuracy"]]
    history.seconds = float(meta["history"]["seconds"])
    return int(meta["epoch"]), int(meta["step"])


def train_supervised(
    encoder: nn.Module,
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> TrainHistory:
    """Train ``encoder`` in place on (normalized log-mel, dense label) pairs.

    With ``checkpoint_path``, the whole training state (encoder and head weights, AdamW moments, the
    generator of batches, masks and mixup, the global RNG, epoch, step and history) is written
    atomically there every ``config.checkpoint_every`` epochs and after the last one. With
    ``resume`` (the default) an existing checkpoint of the same training (same config, data and
    architecture; anything else is a :class:`CheckpointError`) is continued, and the result is
    bit-identical to an uninterrupted run on the same machine. ``resume=False`` starts over and
    overwrites it. The caller deletes the file when it no longer needs it.
    ``on_epoch(epoch, encoder)`` runs after each epoch (e.g. to compare weights epoch by epoch).
    """
    config = config or TrainConfig()
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    if len(features) == 0:
        raise ValueError("no training data")
    device = torch.device(device)
    with training_threads(config.threads):
        history = _train(encoder, features, labels, num_classes, config, device, progress,
                         Path(checkpoint_path) if checkpoint_path is not None else None, resume, on_epoch)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return history


def _train(
    encoder: nn.Module, features: Tensor, labels: Tensor, num_classes: int, config: TrainConfig,
    device: torch.device, progress: bool, path: Path | None, resume: bool,
    on_epoch: Callable[[int, nn.Module], None] | None,
) -> TrainHistory:
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = ClassifierModel(encoder, num_classes).to(device)
    model.train()
    skip = no_decay_names(model)
    params = [
        {"params": [p for n, p in model.named_parameters() if n not in skip], "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in skip], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.98))
    n = len(features)
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    labels = labels.long()
    history = TrainHistory()
    start_epoch, step = 0, 0
    fingerprint = _fingerprint(model, features, labels, num_classes, config) if path is not None else {}
    if path is not None and resume and path.exists():
        start_epoch, step = load_training_checkpoint(path, model, opt, gen, history, fingerprint)
    t0 = time.perf_counter() - history.seconds
    bar = tqdm(total=total, initial=step, desc="base training", unit="step", disable=not progress)
    try:
        for epoch in range(start_epoch, config.epochs):
            order = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for b in range(steps_per_epoch):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                x = spec_augment(features[idx], config, gen).to(device)
                y = labels[idx].to(device)
                target = nn.functional.one_hot(y, num_classes).float()
                target = target * (1 - config.label_smoothing) + config.label_smoothing / num_classes
                mixed = config.mixup_alpha > 0 and torch.rand(1, generator=gen).item() < config.mixup_prob
                if mixed:
                    lam = mixup_lambda(config.mixup_alpha, gen)
                    perm = torch.randperm(len(idx), generator=gen).to(device)
                    x = lam * x + (1 - lam) * x[perm]
                    target = lam * target + (1 - lam) * target[perm]
                for g in opt.param_groups:
                    g["lr"] = config.lr * lr_factor(step, total, warmup, config.min_lr_ratio)
                logits = model(x)
                loss = torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                if not mixed:
                    correct += int((logits.argmax(-1) == y).sum())
                    seen += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.loss.append(loss_sum / (steps_per_epoch * config.batch_size))
            history.accuracy.append(correct / seen if seen else float("nan"))
            history.seconds = time.perf_counter() - t0
            done = epoch + 1
            if path is not None and (done == config.epochs
                                     or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                save_training_checkpoint(path, model, opt, gen, done, step, history, fingerprint)
            if on_epoch is not None:
                on_epoch(epoch, encoder)
    finally:
        bar.close()
    history.seconds = time.perf_counter() - t0
    return history
