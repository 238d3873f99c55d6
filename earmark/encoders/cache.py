"""Embeddings computed once: stored on disk keyed by embedder checkpoint and audio content.

Layout: ``<root>/<embedder digest>/shard-*.safetensors``; each shard holds an ``embeddings`` matrix
and, in its JSON header, the audio digests of its rows. Shards are append-only and written
atomically, so an interrupted run keeps everything flushed before the interruption and a rerun
continues from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor
from tqdm.auto import tqdm

from earmark.audio import AudioDecodeError, load_many
from earmark.checkpoint import load_tensors, save_tensors
from earmark.encoders.embedder import AudioEmbedder


def audio_digest(path: str | Path, block: int = 1 << 20) -> str:
    """Content hash of a file (streamed), so renamed or moved files still hit the cache."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(block):
                h.update(chunk)
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot be read ({exc.strerror or exc})") from exc
    return h.hexdigest()


def embedder_fingerprint(embedder: AudioEmbedder) -> str:
    """The checkpoint digest, or a hash of the weights and config for an unsaved embedder."""
    if embedder.digest is not None:
        return embedder.digest
    state = {k: v.detach().cpu().contiguous() for k, v in embedder.state_dict().items()}
    data = st_save(state, metadata={"earmark": json.dumps(embedder.describe(), sort_keys=True)})
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    """A persistent map audio digest -> embedding vector for one embedder."""

    def __init__(self, root: str | Path, fingerprint: str, max_shards: int = 64) -> None:
        self.dir = Path(root) / fingerprint[:32]
        self.max_shards = max_shards
        self._index: dict[str, Tensor] | None = None

    def _shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.safetensors"))

    def _load(self) -> dict[str, Tensor]:
        if self._index is None:
            self._index = {}
            for shard in self._shards():
                tensors, meta, _ = load_tensors(shard, kind="embedding-shard")
                self._index.update(zip(meta["keys"], tensors["embeddings"], strict=True))
            if len(self._shards()) > self.max_shards:
                self._compact()
        return self._index

    def _compact(self) -> None:
        old = self._shards()
        self._write(list(self._load()), torch.stack(list(self._load().values())))
        for shard in old:
            shard.unlink(missing_ok=True)
            shard.with_suffix(".json").unlink(missing_ok=True)

    def _write(self, keys: list[str], embeddings: Tensor) -> None:
        name = f"shard-{time.time_ns():020d}-{os.getpid()}.safetensors"
        save_tensors(self.dir / name, {"embeddings": embeddings}, {"kind": "embedding-shard", "keys": keys})

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def get(self, key: str) -> Tensor | None:
        return self._load().get(key)

    def add(self, keys: Sequence[str], embeddings: Tensor) -> None:
        """Store rows; written to disk at once, so a crash later loses none of them."""
        if len(keys) != len(embeddings):
            raise ValueError(f"{len(keys)} keys for {len(embeddings)} embeddings")
        if not keys:
            return
        embeddings = embeddings.detach().float().cpu()
        self._write(list(keys), embeddings)
        self._load().update(zip(keys, embeddings, strict=True))


@dataclass
class EmbedResult:
    embeddings: Tensor  # (n kept, d), rows in the order of `kept`
    kept: np.ndarray  # indices into the input paths that produced an embedding
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    computed: int = 0  # embeddings computed this call (the rest came from the cache)


def embed_paths(
    embedder: AudioEmbedder,
    paths: Sequence[str | Path],
    cache: EmbeddingCache | None = None,
    *,
    batch_size: int = 64,
    on_error: str = "fail",
    progress: bool = True,
    desc: str = "embedding",
) -> EmbedResult:
    """Embed files, reusing cached rows; computed rows reach the cache batch by batch.

    ``on_error="fail"`` raises the first :class:`AudioDecodeError` after flushing what was done;
    ``"skip"`` leaves the file out and reports it in ``EmbedResult.skipped``.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    rows: dict[int, Tensor] = {}
    skipped: list[tuple[str, str]] = []
    todo: list[tuple[int, str]] = []
    digests: dict[int, str] = {}
    for i, p in enumerate(paths):
        try:
            digests[i] = audio_digest(p)
        except AudioDecodeError as exc:
            if on_error == "fail":
                raise
            skipped.append((str(p), exc.reason))
            continue
        hit = cache.get(digests[i]) if cache is not None else None
        if hit is not None:
            rows[i] = hit
        else:
            todo.append((i, digests[i]))
    computed = 0
    bar = tqdm(total=len(todo), desc=desc, unit="clip", disable=not progress or not todo, leave=False)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            waves, pos, bad = load_many([paths[i] for i, _ in chunk], embedder.audio_config, on_error)
            skipped.extend(bad)
            ok = [chunk[k] for k in pos]
            if ok:
                emb = embedder.embed(np.stack(waves)).cpu()
                if cache is not None:
                    cache.add([k for _, k in ok], emb)
                rows.update((i, e) for (i, _), e in zip(ok, emb, strict=True))
                computed += len(ok)
            bar.update(len(chunk))
    finally:
        bar.close()
    kept = np.array(sorted(rows), dtype=np.int64)
    dim = embedder.embed_dim
    out = torch.stack([rows[i] for i in kept]) if len(kept) else torch.zeros(0, dim)
    return EmbedResult(embeddings=out, kept=kept, skipped=skipped, computed=computed)
