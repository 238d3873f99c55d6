"""Supervised base-session training of an encoder with a linear head (then the encoder is frozen)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


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

    def to_dict(self) -> dict:
        return asdict(self)


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


def train_supervised(
    encoder: nn.Module,
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    config: TrainConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainHistory:
    """Train ``encoder`` in place on (normalized log-mel, dense label) pairs."""
    config = config or TrainConfig()
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    if len(features) == 0:
        raise ValueError("no training data")
    device = torch.device(device)
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
    t0 = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc="base training", unit="step", disable=not progress)
    try:
        for _ in range(config.epochs):
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
                    lam = float(torch.distributions.Beta(config.mixup_alpha, config.mixup_alpha).sample())
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
    finally:
        bar.close()
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    history.seconds = time.perf_counter() - t0
    return history
