"""Base-session training of an embedder from labelled audio: shared by the experiment harness and ``Model``.

Decode -> raw log-mel -> fit the feature normalization on the training clips -> supervised training of
the encoder with a linear head (then thrown away). The embedder that comes out is frozen by its users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from earmark.audio import AudioConfig, load_many
from earmark.encoders.config import EncoderConfig, resolve_config
from earmark.encoders.embedder import AudioEmbedder
from earmark.training.augment import FeatureScale
from earmark.training.supervised import TrainConfig, TrainHistory, train_supervised


def load_features(
    embedder: AudioEmbedder, paths: Sequence[str | Path], progress: bool, on_error: str = "fail"
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Raw log-mel of every path, before normalization; returns (features, kept positions, skipped)."""
    out, kept, skipped = [], [], []
    paths = list(paths)
    for start in tqdm(range(0, len(paths), 64), desc="log-mel", unit="batch", disable=not progress, leave=False):
        waves, ok, bad = load_many(paths[start : start + 64], embedder.audio_config, on_error)
        kept.extend(start + k for k in ok)
        skipped.extend(bad)
        if waves:
            out.append(embedder.logmel(torch.as_tensor(np.stack(waves))))
    if not out:
        raise ValueError("no decodable training clip in the base session")
    return torch.cat(out), kept, skipped


def load_pretrained_encoder(path: str | Path) -> torch.nn.Module:
    """An `earmark pretrain` checkpoint, or a published SSAST / SSAMBA / AuM one (.pth, .pt, .safetensors)."""
    from earmark.checkpoint import CheckpointError
    from earmark.encoders.convert import load_published
    from earmark.training.pretrain import encoder_from_checkpoint

    if Path(path).suffix in (".pth", ".pt"):
        return load_published(path)[0]
    try:
        return encoder_from_checkpoint(path)
    except CheckpointError:
        return load_published(path)[0]


def train_embedder(
    paths: Sequence[str | Path],
    labels: Sequence[int],
    *,
    encoder: EncoderConfig | str | dict = "fast",
    audio: AudioConfig | None = None,
    train: TrainConfig | None = None,
    seed: int = 0,
    pretrained: str | Path | None = None,
    device: str = "cpu",
    on_error: str = "fail",
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
) -> tuple[AudioEmbedder, TrainHistory, list[tuple[str, str]]]:
    """Train an embedder on labelled clips (labels: dense ids 0..K-1); returns it on the CPU in eval mode.

    ``seed`` seeds the encoder's initialisation and the training's generators (it replaces
    ``train.seed``), so one number decides the run. ``checkpoint_path`` / ``resume``: see
    :func:`~earmark.training.supervised.train_supervised` (the file is left in place; delete it once
    the embedder is saved).
    """
    train = replace(train or TrainConfig(), seed=seed)
    torch.manual_seed(seed)
    embedder = AudioEmbedder(resolve_config(encoder), audio or AudioConfig())
    if pretrained:
        embedder.encoder = load_pretrained_encoder(pretrained).train()
    raw, kept, skipped = load_features(embedder, paths, progress, on_error)
    embedder.normalizer.fit(raw)
    feats = embedder.normalizer(raw)
    y = torch.as_tensor(np.asarray(labels)[kept], dtype=torch.long)
    n_classes = int(y.max()) + 1
    scale = FeatureScale(float(embedder.normalizer.mean), float(embedder.normalizer.std))
    history = train_supervised(embedder.encoder, feats, y, n_classes, train, device=device, progress=progress,
                               checkpoint_path=checkpoint_path, resume=resume, feature_scale=scale)
    return embedder.to("cpu").eval(), history, skipped
