"""Backbone-updating learners: they train the encoder itself, session by session, on log-mel spectrograms.

The closed-form heads read frozen embeddings; the methods here (finetune, joint retraining, replay,
iCaRL, LwF, EWC, FSA) are the field's baselines that update the network, so their input is the
normalized log-mel ``(n, n_mels, frames)`` the encoder reads, and the learner owns its own copy of
the encoder. They keep the same protocol: ``partial_fit`` once per session (or per batch), an open
label set, ``state_dict`` holding everything (encoder, head, exemplars, penalties).

They are slow on a CPU: each session runs a few epochs of encoder training. The defaults are
small (4 epochs per session, the ``fast`` encoder) and ``base_epochs=0`` assumes the encoder
arrives already trained on the first session (``init_encoder``, as ``earmark compare`` does);
train from scratch by setting ``base_epochs``.

Subclasses change one thing each, through hooks: what is trained on (``_training_set``), an extra
loss term (``_extra_loss``), what happens around a session (``_before_session``,
``_after_session``) and how scores are made (``_scores``).

A session's encoder training checkpoints when ``checkpoint_dir`` is set (the experiment harness sets
it; it is not part of the config): every ``checkpoint_every`` epochs and after the last one,
``<checkpoint_dir>/train.safetensors`` holds the encoder and head weights (and any other trained
parameter, e.g. FSA's FiLM), the AdamW moments, the learner's generator, the global RNG, session,
epoch and step, with a fingerprint of the session's inputs (the learner's state when training starts,
the training data, the config and the session index). A later ``partial_fit`` of the same session
with ``resume`` (the default) continues from it, bit-identically to an uninterrupted run on the same
machine; a checkpoint with another fingerprint (another session, config or data) is ignored and
overwritten. Everything else a learner keeps between sessions (exemplars, Fisher, the head) is in
``state_dict``: the harness saves that at each session end (see ``earmark.experiments.evaluate``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earmark.checkpoint import FingerprintError
from earmark.encoders.config import EncoderConfig, resolve_config
from earmark.encoders.mamba import build_encoder
from earmark.learners.base import LEARNERS, ArrayLike, IncrementalLearner, LearnerConfig
from earmark.training.supervised import (
    TrainConfig,
    TrainHistory,
    data_digest,
    load_training_checkpoint,
    lr_factor,
    no_decay_names,
    save_training_checkpoint,
    spec_augment,
    state_digest,
)

CHECKPOINT_KIND = "backbone-session-partial"
TRAIN_CHECKPOINT = "train.safetensors"  # in ``checkpoint_dir``
# BackboneConfig fields that do not change what is learned (left out of checkpoint fingerprints).
NOT_IN_RESULT = ("checkpoint_every",)


@dataclass
class BackboneConfig(LearnerConfig):
    """Training schedule of a backbone-updating learner (per session).

    ``encoder``: a preset name or EncoderConfig fields; ``init_encoder`` replaces it by the config of
    the encoder it copies, so a saved learner rebuilds the right architecture. ``head_epochs`` fit the
    linear head alone on frozen embeddings before the encoder is trained (cheap: embeddings are
    computed once), so new classes do not start from a zero head when the encoder starts moving.
    """

    encoder: str | dict = "fast"
    epochs: int = 4  # encoder + head epochs on each session after the first
    base_epochs: int = 0  # on the first session; 0 when the encoder arrives trained on it
    head_epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    head_lr: float = 1e-2
    weight_decay: float = 1e-4
    augment: bool = True  # SpecAugment masks during encoder training
    eval_batch_size: int = 128
    seed: int = 0
    checkpoint_every: int = 1  # epochs between checkpoints when checkpoint_dir is set; 0: only after the last

    def __post_init__(self) -> None:
        for name in ("epochs", "base_epochs", "head_epochs", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise ValueError("lr and head_lr must be > 0")

    def encoder_config(self) -> EncoderConfig:
        return resolve_config(self.encoder)

    def result_dict(self) -> dict:
        """The fields that decide what is learned (for checkpoint fingerprints)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_RESULT}


class BackboneLearner(IncrementalLearner):
    """Encoder + growing linear head trained with cross-entropy; the finetune lower bound as is.

    Finetuning on each session's data alone overwrites what the old classes needed (and biases the
    head toward the newest classes): that is catastrophic forgetting, the bound every other method
    is measured against.
    """

    Config = BackboneConfig
    input_ndim: ClassVar[int] = 3
    can_checkpoint: ClassVar[bool] = True

    def __init__(self, config: BackboneConfig | None = None) -> None:
        super().__init__(config)
        self.encoder = build_encoder(self.config.encoder_config())
        self.encoder.eval().requires_grad_(False)
        d = self.encoder.embed_dim
        self.register_buffer("head_weight", torch.zeros(0, d))
        self.register_buffer("head_bias", torch.zeros(0))
        self.register_buffer("sessions_seen", torch.zeros((), dtype=torch.long))
        self._new_classes = 0  # classes added by the batch being learned (not state)
        self.n_old_classes = 0  # classes known before the current session: the distillation targets
        # Where a session's training checkpoints (None: nowhere), and whether a matching checkpoint there
        # is continued; set by the caller, not state. See the module docstring.
        self.checkpoint_dir: Path | None = None
        self.resume: bool = True

    # ----------------------------------------------------------------- public

    def init_encoder(self, encoder: nn.Module) -> BackboneLearner:
        """Start from a copy of ``encoder`` (e.g. the base-session encoder); the original is untouched."""
        if self.is_fitted:
            raise RuntimeError("init_encoder must be called before the first partial_fit")
        self.encoder = copy.deepcopy(encoder).to(self.device).eval().requires_grad_(False)
        self.config = dataclasses.replace(self.config, encoder=encoder.config.to_dict())
        d = self.encoder.embed_dim
        self.head_weight = torch.zeros(0, d, device=self.device)
        return self

    @torch.no_grad()
    def embed(self, X: ArrayLike) -> Tensor:
        """Encoder embeddings ``(n, D)`` of log-mel inputs, in eval mode and in batches."""
        return self._embed(self._as_features(X))

    @property
    def train_checkpoint(self) -> Path | None:
        """The file a session's training checkpoints to (None without ``checkpoint_dir``)."""
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir) / TRAIN_CHECKPOINT

    # ----------------------------------------------------------------- protocol hooks

    def _init_state(self, d: int) -> None:
        if d != self.encoder.config.n_mels:
            raise ValueError(f"X has {d} mel bands, but the encoder reads {self.encoder.config.n_mels}")

    def _grow(self, k: int) -> None:
        self._new_classes += k
        d = self.head_weight.shape[1]
        self.head_weight = torch.cat([self.head_weight, self.head_weight.new_zeros(k, d)])
        self.head_bias = torch.cat([self.head_bias, self.head_bias.new_zeros(k)])

    def _update(self, X: Tensor, cols: Tensor) -> None:
        self.n_old_classes, self._new_classes = self.n_classes_ - self._new_classes, 0
        self._learn_session(X, cols, first=int(self.sessions_seen) == 0)
        self.sessions_seen += 1

    def _learn_session(self, X: Tensor, cols: Tensor, first: bool) -> None:
        """One session: head warm-start, encoder training, and the subclass hooks around them."""
        self._before_session(X, cols)
        Xt, ct = self._training_set(X, cols)
        if self.config.head_epochs:
            self._fit_head(Xt, ct)
        epochs = self.config.base_epochs if first else self.config.epochs
        if epochs:
            self._train(Xt, ct, epochs)
        self._after_session(X, cols)

    def _scores(self, X: Tensor) -> Tensor:
        return self._logits(self._embed(X)).double()

    def _check_state(self) -> None:
        super()._check_state()
        w, b = self.head_weight, self.head_bias
        if w.ndim != 2 or w.shape[0] != self.n_classes_ or w.shape[1] != self.encoder.embed_dim:
            raise ValueError(f"head_weight has shape {tuple(w.shape)}, expected ({self.n_classes_}, "
                             f"{self.encoder.embed_dim})")
        if b.shape != (self.n_classes_,):
            raise ValueError(f"head_bias has shape {tuple(b.shape)}, expected ({self.n_classes_},)")

    def _as_features(self, X: ArrayLike) -> Tensor:
        """A finite float ``(n, n_mels, frames)`` tensor on the learner's device."""
        t = X.detach() if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X))
        if t.ndim != 3:
            raise ValueError(f"X must be log-mel spectrograms (n, n_mels, frames), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"X must be real-valued, got dtype {t.dtype}")
        n_mels = self.encoder.config.n_mels
        if t.shape[1] != n_mels and len(t):
            raise ValueError(f"X has {t.shape[1]} mel bands, but the encoder reads {n_mels}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("X contains NaN or infinite values")
        return t.to(self.device, torch.float32)

    # ----------------------------------------------------------------- what subclasses change

    def _before_session(self, X: Tensor, cols: Tensor) -> None:
        """Runs before any training on a session (e.g. snapshot the old model)."""

    def _training_set(self, X: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """The session's training data; replay methods append their exemplars."""
        return X, cols

    def _classification_loss(self, logits: Tensor, cols: Tensor) -> Tensor:
        """Cross-entropy over every class seen (finetune, replay, iCaRL)."""
        return F.cross_entropy(logits, cols)

    def _extra_loss(self, x: Tensor, logits: Tensor, embedding: Tensor) -> Tensor | None:
        """A term added to the cross-entropy of each step (distillation, a penalty), or None."""
        return None

    def _after_session(self, X: Tensor, cols: Tensor) -> None:
        """Runs after training on a session (e.g. select exemplars, estimate the Fisher)."""

    def _trainable(self) -> list[nn.Parameter]:
        """Encoder parameters trained on a session (all of them; FSA's FiLM trains only adapters)."""
        return list(self.encoder.parameters())

    # ----------------------------------------------------------------- mechanics

    def _logits(self, emb: Tensor) -> Tensor:
        return emb @ self.head_weight.T + self.head_bias

    def _embed(self, X: Tensor) -> Tensor:
        self.encoder.eval()
        bs = self.config.eval_batch_size
        out = [self.encoder(X[i : i + bs]) for i in range(0, len(X), bs)]
        return torch.cat(out).float() if out else X.new_zeros(0, self.encoder.embed_dim)

    def _generator(self) -> torch.Generator:
        # Seeded per session so that a run is reproducible and sessions do not repeat one stream.
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(self.sessions_seen))

    def _fit_head(self, X: Tensor, cols: Tensor) -> None:
        """Warm-start the new classes' head rows on frozen embeddings (full batch, Adam, cross-entropy).

        Old rows stay fixed here: fitting them on a session that lacks their classes is exactly what
        makes finetuning forget, and the methods against forgetting only act in ``_train``.
        """
        k = self.n_old_classes
        if k == self.n_classes_:
            return
        emb = self._embed(X)
        w = nn.Parameter(self.head_weight[k:].clone())
        b = nn.Parameter(self.head_bias[k:].clone())
        w_old, b_old = self.head_weight[:k], self.head_bias[:k]
        opt = torch.optim.Adam([w, b], lr=self.config.head_lr)
        with torch.enable_grad():
            for _ in range(self.config.head_epochs):
                logits = emb @ torch.cat([w_old, w]).T + torch.cat([b_old, b])
                loss = F.cross_entropy(logits, cols)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.head_weight[k:] = w.detach()
        self.head_bias[k:] = b.detach()

    def _train(self, X: Tensor, cols: Tensor, epochs: int) -> None:
        """Encoder + head, AdamW with warm-up and cosine decay, SpecAugment, cross-entropy + extra loss."""
        cfg = self.config
        gen = self._generator()
        w = nn.Parameter(self.head_weight.clone())
        b = nn.Parameter(self.head_bias.clone())
        trainable = self._trainable()
        no_decay = no_decay_names(self.encoder)
        skip = {id(p) for n, p in self.encoder.named_parameters() if n in no_decay}
        groups = [
            {"params": [p for p in trainable if id(p) not in skip], "weight_decay": cfg.weight_decay, "lr": cfg.lr},
            {"params": [p for p in trainable if id(p) in skip], "weight_decay": 0.0, "lr": cfg.lr},
            {"params": [w, b], "weight_decay": 0.0, "lr": cfg.head_lr},
        ]
        base_lrs = [g["lr"] for g in groups]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))
        n = len(X)
        steps_per_epoch = max(1, -(-n // cfg.batch_size))
        total = steps_per_epoch * epochs
        # SpecAugment widths of base training (20 mel bands, 30 frames), capped at a sixth of each axis.
        augment = TrainConfig(seed=cfg.seed, freq_mask_width=min(20, X.shape[1] // 6),
                              time_mask_width=min(30, X.shape[2] // 6))
        path = self.train_checkpoint
        others = {name: p for name, p in self.named_parameters()
                  if not name.startswith("encoder.") and any(p is q for q in trainable)}
        trained = _Trained(self.encoder, w, b, others)
        history = TrainHistory()
        start_epoch, step = 0, 0
        if path is not None:
            fingerprint = self._train_fingerprint(X, cols, epochs, trained)
            if self.resume and path.exists():
                # Another session's or run's training is not resumed: this one starts over and overwrites it.
                with contextlib.suppress(FingerprintError):
                    start_epoch, step = load_training_checkpoint(path, trained, opt, gen, history, fingerprint,
                                                                 kind=CHECKPOINT_KIND)
        t0 = time.perf_counter() - history.seconds
        self.encoder.train()
        for p in trainable:
            p.requires_grad_(True)
        try:
            with torch.enable_grad():
                for epoch in range(start_epoch, epochs):
                    loss_sum, correct = 0.0, 0
                    order = torch.randperm(n, generator=gen).to(self.device)
                    for s in range(steps_per_epoch):
                        idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                        if len(idx) == 0:
                            continue
                        x = X[idx]
                        if cfg.augment:
                            x = spec_augment(x, augment, gen)
                        for g, base in zip(opt.param_groups, base_lrs, strict=True):
                            g["lr"] = base * lr_factor(step, total, min(steps_per_epoch, total // 10), 0.02)
                        emb = self.encoder(x)
                        logits = emb @ w.T + b
                        loss = self._classification_loss(logits, cols[idx])
                        extra = self._extra_loss(x, logits, emb)
                        if extra is not None:
                            loss = loss + extra
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        nn.utils.clip_grad_norm_([*trainable, w, b], 1.0)
                        opt.step()
                        step += 1
                        loss_sum += loss.item() * len(idx)
                        correct += int((logits.argmax(1) == cols[idx]).sum())
                    history.loss.append(loss_sum / n)
                    history.accuracy.append(correct / n)
                    history.seconds = time.perf_counter() - t0
                    done = epoch + 1
                    every = cfg.checkpoint_every
                    if path is not None and (done == epochs or (every and done % every == 0)):
                        save_training_checkpoint(path, trained, opt, gen, done, step, history, fingerprint,
                                                 kind=CHECKPOINT_KIND)
        finally:
            for p in trainable:
                p.requires_grad_(False)
                p.grad = None
            self.encoder.eval()
        self.head_weight.copy_(w.detach())
        self.head_bias.copy_(b.detach())

    def _train_fingerprint(self, X: Tensor, cols: Tensor, epochs: int, trained: nn.Module) -> dict:
        """What a session's training depends on: a checkpoint with another fingerprint is not resumed.

        The learner's whole state when training starts stands for everything before it (earlier
        sessions, the head warm-start, exemplars, penalties, the old model distilled from).
        """
        return {
            "learner": self.name,
            "config": self.config.result_dict(),
            "session": int(self.sessions_seen),
            "epochs": epochs,
            "data": data_digest(X, cols),
            "state": state_digest(self.state_dict()),
            "parameters": {n: list(p.shape) for n, p in trained.named_parameters()},
        }

    def _frozen_copy(self) -> FrozenModel:
        """A detached copy of the model before this session (encoder + the old classes' head rows)."""
        k = self.n_old_classes
        return FrozenModel(self.encoder, self.head_weight[:k], self.head_bias[:k])


class _Trained(nn.Module):
    """What a session's training changes, as one module for the checkpoint's state dict (not state):
    the learner's encoder, the head being trained and other trained parameters of the learner."""

    def __init__(self, encoder: nn.Module, weight: nn.Parameter, bias: nn.Parameter,
                 extra: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head_weight, self.head_bias = weight, bias
        self.extra = nn.ParameterDict({n.replace(".", "__"): p for n, p in extra.items()})


class FrozenModel(nn.Module):
    """The model as it was before a session: its logits are the distillation targets (not state)."""

    def __init__(self, encoder: nn.Module, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.weight, self.bias = weight.clone(), bias.clone()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x) @ self.weight.T + self.bias


def new_class_ce(logits: Tensor, cols: Tensor, n_old: int) -> Tensor:
    """Cross-entropy over the new classes' columns only, as PyCIL's LwF and EWC train.

    Without exemplars, a softmax over all columns on new data alone drives every old logit down;
    restricting it leaves the old columns to the method's own term. A batch that holds old classes
    (a recurring class) falls back to the full cross-entropy.
    """
    if n_old and bool((cols >= n_old).all()):
        return F.cross_entropy(logits[:, n_old:], cols - n_old)
    return F.cross_entropy(logits, cols)


def kd_loss(logits: Tensor, old_logits: Tensor, temperature: float) -> Tensor:
    """Knowledge distillation (Hinton): KL between softened old and new outputs over the old classes, x T^2."""
    k = old_logits.shape[1]
    log_p = F.log_softmax(logits[:, :k] / temperature, dim=1)
    q = F.softmax(old_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


@LEARNERS.register("finetune")
class FinetuneLearner(BackboneLearner):
    """Train encoder + head on each session's data alone: the lower bound (it forgets)."""

    name = "finetune"


def backbone_names() -> list[str]:
    """Registered learners that train the encoder (their input is log-mel, not embeddings)."""
    return [n for n in LEARNERS.names() if LEARNERS.get(n).needs_encoder()]


__all__ = [
    "BackboneConfig", "BackboneLearner", "FinetuneLearner", "FrozenModel", "backbone_names", "kd_loss", "new_class_ce",
]
