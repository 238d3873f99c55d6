"""Supervised base-session training of an encoder with a linear head (then the encoder is frozen)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
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
from earmark.training.augment import (
    FeatureScale,
    add_noise,
    beta_draw,
    cutmix,
    mix_clips,
    random_crop,
    random_gain,
    time_shift,
    virtual_mix,
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
    # --- Augmentations beyond SpecAugment and mixup (earmark.training.augment); each off at its default.
    crop_frames: int = 0  # train on a random window of this many frames of each clip; 0: the whole clip
    time_shift: int = 0  # shift each clip by up to this many frames either way (zero fill); 0: off
    gain_db: float = 0.0  # random gain per clip, uniform in +-gain_db dB; 0: off
    noise_prob: float = 0.0  # share of clips with white noise mixed in (powers add); 0: off
    noise_snr_min_db: float = 5.0  # noise: signal-to-noise ratio drawn uniformly in [min, max] dB
    noise_snr_max_db: float = 30.0
    mix_prob: float = 0.0  # share of clips with another clip of the batch mixed in underneath, label kept
    mix_snr_min_db: float = 5.0  # mix: foreground-to-background ratio drawn uniformly in [min, max] dB
    mix_snr_max_db: float = 20.0
    cutmix_prob: float = 0.0  # share of steps (not already mixed up) with CutMix boxes; 0: off
    cutmix_alpha: float = 1.0  # CutMix: kept area share ~ Beta(alpha, alpha)
    # --- Forward-compatible training: extra head outputs for virtual classes, each a pair of real classes
    # whose clips are mixed (FACT-style); the head (and with it these outputs) is dropped after training.
    virtual_classes: int = 0  # 0: off
    virtual_prob: float = 0.0  # share of clips replaced by a two-class mix labelled with its virtual class
    virtual_spread: float = 0.1  # the mix's weight is uniform in 0.5 +- spread
    # --- Early stopping on a validation split of the training clips (stratified, seeded by `seed`).
    val_fraction: float = 0.0  # share of each class's clips held out for validation; 0: no validation
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0: never stop
    restore_best: bool = True  # with validation: end with the weights of the best validation epoch

    def __post_init__(self) -> None:
        for name in ("noise_prob", "mix_prob", "cutmix_prob", "virtual_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("crop_frames", "time_shift", "virtual_classes", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gain_db < 0:
            raise ValueError(f"gain_db must be >= 0, got {self.gain_db}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience and not self.val_fraction:
            raise ValueError("patience needs a validation split: set val_fraction > 0")
        if self.virtual_prob and not self.virtual_classes:
            raise ValueError("virtual_prob needs virtual_classes > 0")
        if not 0.0 <= self.virtual_spread <= 0.5:
            raise ValueError(f"virtual_spread must be in [0, 0.5], got {self.virtual_spread}")
        if self.cutmix_alpha <= 0:
            raise ValueError(f"cutmix_alpha must be > 0, got {self.cutmix_alpha}")
        for kind in ("noise", "mix"):
            lo, hi = getattr(self, f"{kind}_snr_min_db"), getattr(self, f"{kind}_snr_max_db")
            if lo > hi:
                raise ValueError(f"{kind}_snr_min_db ({lo}) is above {kind}_snr_max_db ({hi})")

    def to_dict(self) -> dict:
        return asdict(self)

    def result_dict(self) -> dict:
        """The fields that decide the trained weights (for cache keys and checkpoint fingerprints).

        Fields added after caches were written (``ADDED_LATER``) are left out while at their defaults,
        so an encoder trained before they existed is still found; any other value enters the key.
        """
        return {k: v for k, v in asdict(self).items()
                if k not in NOT_IN_RESULT and not (k in ADDED_LATER and v == _DEFAULTS[k])}


# Fields added to TrainConfig after encoder caches were keyed on it: at their defaults they stay out of the key.
ADDED_LATER = (
    "crop_frames", "time_shift", "gain_db", "noise_prob", "noise_snr_min_db", "noise_snr_max_db", "mix_prob",
    "mix_snr_min_db", "mix_snr_max_db", "cutmix_prob", "cutmix_alpha", "virtual_classes", "virtual_prob",
    "virtual_spread", "val_fraction", "patience", "restore_best",
)
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)  # mean training loss per epoch
    accuracy: list[float] = field(default_factory=list)  # training accuracy per epoch (unmixed, real items)
    seconds: float = 0.0
    val_accuracy: list[float] = field(default_factory=list)  # per epoch, with a validation split
    best_epoch: int | None = None  # the epoch (0-based) of the best validation accuracy
    stopped_epoch: int | None = None  # the epoch after which early stopping ended the training


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
    return beta_draw(alpha, gen)


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


def validation_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(training rows, validation rows): per class, ``fraction`` of its clips (rounded; at least one when
    the class has two or more, never its last one) drawn with a generator seeded by ``seed`` alone."""
    rng = np.random.default_rng([seed, 0x5E1])
    y = labels.cpu().numpy()
    train, val = [], []
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        k = min(max(int(round(fraction * len(rows))), 1 if len(rows) > 1 else 0), len(rows) - 1)
        val.extend(rows[:k].tolist())
        train.extend(rows[k:].tolist())
    return torch.as_tensor(sorted(train), dtype=torch.long), torch.as_tensor(sorted(val), dtype=torch.long)


def augment_inputs(x: Tensor, config: TrainConfig, gen: torch.Generator, scale: FeatureScale) -> Tensor:
    """The per-clip augmentations of a batch, in order: crop, shift, gain, noise, clip mixing, then
    SpecAugment. Each one that is off draws nothing, so the defaults draw exactly what SpecAugment does."""
    if config.crop_frames:
        x = random_crop(x, config.crop_frames, gen)
    if config.time_shift:
        x = time_shift(x, config.time_shift, gen)
    if config.gain_db:
        x = random_gain(x, config.gain_db, scale, gen)
    if config.noise_prob:
        x = add_noise(x, config.noise_prob, config.noise_snr_min_db, config.noise_snr_max_db, scale, gen)
    if config.mix_prob:
        x = mix_clips(x, config.mix_prob, config.mix_snr_min_db, config.mix_snr_max_db, scale, gen)
    return spec_augment(x, config, gen)


class _Validation:
    """Validation accuracy per epoch, the best weights so far and the early-stopping count."""

    def __init__(self, features: Tensor, labels: Tensor, config: TrainConfig, num_classes: int) -> None:
        self.features, self.labels, self.config, self.num_classes = features, labels, config, num_classes
        self.best_score = -1.0
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped = False
        self.best_state: dict[str, Tensor] = {}

    @torch.no_grad()
    def score(self, model: nn.Module, device: torch.device) -> float:
        model.eval()
        try:
            correct = 0
            for start in range(0, len(self.features), 64):
                x = self.features[start : start + 64].to(device)
                pred = model(x)[:, : self.num_classes].argmax(-1).cpu()  # real classes only
                correct += int((pred == self.labels[start : start + 64]).sum())
        finally:
            model.train()
        return correct / max(1, len(self.features))

    def update(self, epoch: int, score: float, model: nn.Module) -> None:
        if score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        if self.config.patience and self.bad_epochs >= self.config.patience:
            self.stopped = True

    def meta(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped}

    def load(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        self.best_score, self.best_epoch = float(meta["best_score"]), meta["best_epoch"]
        self.bad_epochs, self.stopped = int(meta["bad_epochs"]), bool(meta["stopped"])
        self.best_state = tensors


def save_training_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, epoch: int, step: int,
    history: TrainHistory, fingerprint: dict, kind: str = CHECKPOINT_KIND, val: _Validation | None = None,
) -> None:
    """Write the whole state of a training loop atomically: ``model``'s state dict, the optimizer, the
    batch generator and the global RNG, epoch, step, history and the ``fingerprint`` of what is trained."""
    opt_tensors, opt_meta = optimizer_tensors(opt)
    tensors = prefixed("model", model.state_dict()) | prefixed("optim", opt_tensors)
    tensors |= {"rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()}
    meta = {"kind": kind, "epoch": epoch, "step": step, "fingerprint": fingerprint,
            "optimizer": opt_meta, "history": {"loss": history.loss, "accuracy": history.accuracy,
                                               "seconds": history.seconds}}
    if val is not None:  # only with a validation split, so other checkpoints keep their layout
        tensors |= prefixed("best", val.best_state)
        meta["history"]["val_accuracy"] = history.val_accuracy
        meta["validation"] = val.meta()
    save_tensors(path, tensors, meta)


def load_training_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, history: TrainHistory,
    fingerprint: dict, kind: str = CHECKPOINT_KIND, val: _Validation | None = None,
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
    if val is not None:
        history.val_accuracy[:] = meta["history"]["val_accuracy"]
        val.load(meta["validation"], unprefixed("best", tensors))
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
    feature_scale: FeatureScale | None = None,
) -> TrainHistory:
    """Train ``encoder`` in place on (normalized log-mel, dense label) pairs.

    With ``checkpoint_path``, the whole training state (encoder and head weights, AdamW moments, the
    generator of batches, masks and mixup, the global RNG, epoch, step and history; with a validation
    split also the best weights so far and the early-stopping count) is written
    atomically there every ``config.checkpoint_every`` epochs and after the last one. With
    ``resume`` (the default) an existing checkpoint of the same training (same config, data and
    architecture; anything else is a :class:`CheckpointError`) is continued, and the result is
    bit-identical to an uninterrupted run on the same machine. ``resume=False`` starts over and
    overwrites it. The caller deletes the file when it no longer needs it.
    ``on_epoch(epoch, encoder)`` runs after each epoch (e.g. to compare weights epoch by epoch).
    ``feature_scale``: the feature normalizer's constants, which the gain, noise and clip-mixing
    augmentations need to work in log power (default: the features are log power as they are).

    With ``config.val_fraction`` a stratified share of the clips is held out (see
    :func:`validation_split`), scored after every epoch; ``config.patience`` stops the training early
    and ``config.restore_best`` ends it on the best epoch's weights.
    """
    config = config or TrainConfig()
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    if len(features) == 0:
        raise ValueError("no training data")
    device = torch.device(device)
    with training_threads(config.threads):
        history = _train(encoder, features, labels, num_classes, config, device, progress,
                         Path(checkpoint_path) if checkpoint_path is not None else None, resume, on_epoch,
                         feature_scale or FeatureScale())
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return history


def _train(
    encoder: nn.Module, features: Tensor, labels: Tensor, num_classes: int, config: TrainConfig,
    device: torch.device, progress: bool, path: Path | None, resume: bool,
    on_epoch: Callable[[int, nn.Module], None] | None, scale: FeatureScale,
) -> TrainHistory:
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    outputs = num_classes + config.virtual_classes
    model = ClassifierModel(encoder, outputs).to(device)
    model.train()
    skip = no_decay_names(model)
    params = [
        {"params": [p for n, p in model.named_parameters() if n not in skip], "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n in skip], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.98))
    labels = labels.long()
    fingerprint = _fingerprint(model, features, labels, num_classes, config) if path is not None else {}
    val = None
    if config.val_fraction:
        rows, held = validation_split(labels, config.val_fraction, config.seed)
        if not len(held):
            raise ValueError(f"val_fraction {config.val_fraction}: no class has two clips to hold one out")
        val = _Validation(features[held], labels[held], config, num_classes)
        features, labels = features[rows], labels[rows]
    n = len(features)
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)
    history = TrainHistory()
    start_epoch, step = 0, 0
    if path is not None and resume and path.exists():
        start_epoch, step = load_training_checkpoint(path, model, opt, gen, history, fingerprint, val=val)
    t0 = time.perf_counter() - history.seconds
    bar = tqdm(total=total, initial=step, desc="base training", unit="step", disable=not progress)
    try:
        for epoch in range(start_epoch, config.epochs):
            if val is not None and val.stopped:
                break
            order = torch.randperm(n, generator=gen)
            loss_sum, correct, seen = 0.0, 0, 0
            for b in range(steps_per_epoch):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                x = augment_inputs(features[idx], config, gen, scale).to(device)
                y = labels[idx].to(device)
                real = torch.ones(len(idx), dtype=torch.bool, device=device)
                y_out = y
                if config.virtual_prob:
                    x, y_out, virtual = virtual_mix(x, y, num_classes, config.virtual_classes, config.virtual_prob,
                                                    config.virtual_spread, gen)
                    real = ~virtual
                target = nn.functional.one_hot(y_out, outputs).float()
                target = target * (1 - config.label_smoothing) + config.label_smoothing / outputs
                mixed = config.mixup_alpha > 0 and torch.rand(1, generator=gen).item() < config.mixup_prob
                if mixed:
                    lam = mixup_lambda(config.mixup_alpha, gen)
                    perm = torch.randperm(len(idx), generator=gen).to(device)
                    x = lam * x + (1 - lam) * x[perm]
                    target = lam * target + (1 - lam) * target[perm]
                elif config.cutmix_prob and torch.rand(1, generator=gen).item() < config.cutmix_prob:
                    x, target = cutmix(x, target, config.cutmix_alpha, gen)
                    mixed = True
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
                    correct += int((logits.argmax(-1) == y)[real].sum())
                    seen += int(real.sum())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.loss.append(loss_sum / (steps_per_epoch * config.batch_size))
            history.accuracy.append(correct / seen if seen else float("nan"))
            if val is not None:
                history.val_accuracy.append(val.score(model, device))
                val.update(epoch, history.val_accuracy[-1], model)
            history.seconds = time.perf_counter() - t0
            done = epoch + 1
            last = done == config.epochs or (val is not None and val.stopped)
            if path is not None and (last or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                save_training_checkpoint(path, model, opt, gen, done, step, history, fingerprint, val=val)
            if on_epoch is not None:
                on_epoch(epoch, encoder)
    finally:
        bar.close()
    if val is not None:
        history.best_epoch = val.best_epoch
        history.stopped_epoch = len(history.loss) - 1 if val.stopped else None
        if config.restore_best and val.best_state:
            model.load_state_dict(val.best_state)
    history.seconds = time.perf_counter() - t0
    return history
