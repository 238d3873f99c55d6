"""The product: one saved ``Model`` (embedder + learner + label names + journal) that people keep teaching.

Train it once (``Model.train``), then ``learn`` new sounds from a few clips, ``predict``, ``forget`` a
label or specific clips exactly, ``info``, ``save`` / ``load``. The CLI, the HTTP service and the
distributed backend all go through this object; nothing else reads a model directory.

A model directory::

    model.json                  manifest: format and earmark versions, labels, learner, files with sha256
    blobs/embedder-<h>.safetensors, blobs/learner-<h>.safetensors, blobs/journal-<h>.json
    changes-<generation>.log    changes logged since that generation was saved (optional, see ``log``)
    .lock                       inter-process writer lock (flock)

Blobs are content-addressed and never rewritten; ``save`` writes the new blobs, fsyncs them, then
replaces ``model.json`` in one ``os.replace``, and only then removes blobs nothing refers to. A crash
at any instant leaves the previous manifest or the new one, each with all its blobs. Loading checks
every blob's sha256 and the manifest's own content hash, and never unpickles.

``log()`` is the cheap way to make a change durable: it appends the change (labels, the embeddings it
applied, its journal rows; never audio) to ``changes-<generation>.log`` and fsyncs, without rewriting the
statistics. ``load`` replays that log on top of its generation; the next ``save`` folds it in and removes
it. The HTTP service acknowledges learns this way and saves from time to time.

The journal records, per learned clip, the content hash of the decoded audio, the label, a digest of
the embedding that was learned and the time. ``forget(files=...)`` decodes and embeds the files again
and removes exactly what was learned; the digest proves the embedding is the one learned. No audio is
kept; the only embeddings kept are the calibration's held-out fifth of each learn call
(``blobs/calibration-<h>.safetensors``: a shadow learner and those clips, see ``earmark.calibration``),
and ``forget`` removes them too.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earmark.audio import AudioConfig, AudioDecodeError, AudioSource, load_audio
from earmark.audio.stream import iter_windows
from earmark.calibration import HeldOutCalibration, default_calibrator, default_score
from earmark.changelog import ChangeLogError, append_log, read_log
from earmark.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    load_tensors,
    tensors_bytes,
    tensors_from_bytes,
)
from earmark.encoders.embedder import AudioEmbedder
from earmark.learners import IncrementalLearner, make_learner
from earmark.learners.base import LEARNERS
from earmark.training.supervised import TrainConfig

FORMAT_VERSION = 1
MANIFEST = "model.json"
UNKNOWN = "unknown"  # reserved: the label of a sound the model does not know
SILENCE = 1e-5  # peak amplitude below which a clip counts as silence


class ModelError(ValueError):
    """A model directory or a request on a model is invalid; the message says what and where."""


class UnknownLabelError(ModelError):
    """A label the model has never learned (or has forgotten)."""


class ModelLockedError(ModelError):
    """Another process holds the model's writer lock."""


def _version() -> str:
    from earmark import __version__

    return __version__


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def clip_digest(wave: np.ndarray) -> str:
    """Content hash of a decoded clip (float32 samples at the model rate, after pad/crop)."""
    return hashlib.blake2b(np.ascontiguousarray(wave, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def embedding_digest(vector: torch.Tensor) -> str:
    return hashlib.blake2b(vector.detach().cpu().float().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def _check_label(label: object) -> str:
    if not isinstance(label, str) or not label.strip():
        raise ModelError(f"a label must be a non-empty string, got {label!r}")
    if label != label.strip() or len(label) > 200 or any(ord(ch) < 32 for ch in label):
        raise ModelError(f"label {label!r}: no surrounding spaces, control characters or more than 200 characters")
    if label == UNKNOWN:
        raise ModelError(f"{UNKNOWN!r} is reserved for sounds the model does not know; choose another label")
    return label


def learn_request(paths: Sequence[AudioSource], labels: str | Sequence[str]) -> tuple[list, list[str]]:
    """Files and one label per file (a single label applies to all), checked: what every learn path takes."""
    paths = list(paths)
    labels = [labels] * len(paths) if isinstance(labels, str) else list(labels)
    if len(labels) != len(paths):
        raise ModelError(f"{len(paths)} files but {len(labels)} labels")
    labels = [_check_label(x) for x in labels]
    if not paths:
        raise ModelError("no files to learn from")
    return paths, labels


@dataclass
class Prediction:
    """Top labels for one clip, or for one window of a long file (``start``/``end`` in seconds)."""

    file: str
    top: list[tuple[str, float]]
    start: float | None = None
    end: float | None = None

    @property
    def label(self) -> str:
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "end": self.end,
                "top": [{"label": name, "probability": p} for name, p in self.top]}


class Predictions(list):
    """The predictions of one call (a list of Prediction) and the files it skipped, as (name, reason)."""

    def __init__(self, items=(), skipped: list[tuple[str, str]] | None = None) -> None:
        super().__init__(items)
        self.skipped = list(skipped or [])


@dataclass
class Decoded:
    """Clips decoded for the model: waveforms, their names and digests, and what failed (name, reason)."""

    names: list[str] = field(default_factory=list)
    waves: list[np.ndarray] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # index of each kept clip in the request
    skipped: list[tuple[str, str]] = field(default_factory=list)


CHANGE_OPS = ("learn", "forget-label", "forget-clips")


@dataclass
class Change:
    """One learn or forget as the learner sees it: all that replaying it needs, and no audio.

    ``labels``: one per row of ``X`` (learn, forget-clips) or the one label forgotten (forget-label);
    ``entries``: the journal rows a learn adds, or the clip digests a forget-clips removes.
    """

    op: str
    labels: list[str]
    X: torch.Tensor | None = None
    entries: list[dict[str, Any]] = field(default_factory=list)
    time: str = ""

    def to_bytes(self) -> bytes:
        tensors = {} if self.X is None else {"X": self.X.to(torch.float32)}
        return tensors_bytes(tensors, {"kind": "change", "op": self.op, "labels": self.labels,
                                       "entries": self.entries, "time": self.time})

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Change:
        tensors, meta = tensors_from_bytes(data, where, kind="change")
        if meta.get("op") not in CHANGE_OPS or not isinstance(meta.get("labels"), list):
            raise ModelError(f"{where}: not a change record")
        return cls(meta["op"], list(meta["labels"]), tensors.get("X"), list(meta.get("entries", [])),
                   str(meta.get("time", "")))


# ----------------------------------------------------------------------------- locking

_HELD: dict[str, int] = {}  # model directory -> lock file descriptor held by this process


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    key = str(path.resolve())
    if key in _HELD:  # re-entrant within one process
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ModelLockedError(f"{path}: another writer holds the model ({holder}); try again when it is done") \
                from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # closing releases the flock


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the model


class Model:
    """An embedder, one incremental learner, the label names and the journal of what was learned."""

    def __init__(self, embedder: AudioEmbedder, learner: IncrementalLearner, device: str = "cpu") -> None:
        if learner.needs_encoder():
            raise ModelError(f"the {learner.name} learner trains its own encoder; a Model needs a learner on "
                             f"embeddings (e.g. {', '.join(_embedding_learners())})")
        self.embedder = embedder.to(device).eval()
        self.embedder.pin_batch_invariant()  # the journal's digests need one embedding per clip
        self.learner = learner.to(device)
        self.device = device
        self._names: dict[int, str] = {}  # learner label id -> name
        self._next_id = 0
        self.journal: list[dict[str, Any]] = []
        self.generation = 0  # the manifest generation this state corresponds to (0: never saved)
        self.path: Path | None = None
        self.created = _now()
        self.history: list[dict[str, Any]] = []  # what was done: learn / forget, with counts
        self.version = 0  # changes applied since the model was created (learns, forgets, merges)
        self.unlogged: list[Change] = []  # applied since the last save or log, not yet durable
        self.logged = 0  # changes in the log on top of this generation
        self._log_end = 0  # byte offset where this model's view of that log ends
        self._unloggable = False  # a merge happened: only a full save makes it durable
        # Calibrated probabilities and `unknown` (earmark.calibration): a shadow learner without a held-out fifth of
        # every learn call, and those held-out clips' embeddings; only for a model that learns from its first clip.
        self.calibration: HeldOutCalibration | None = None
        if not learner.is_fitted:
            shell = make_learner(learner.name, **dataclasses.asdict(learner.config))
            self.calibration = HeldOutCalibration(shell, score=default_score(learner), max_per_class=None,
                                                  calibrator=default_calibrator(learner))

    # ------------------------------------------------------------------ building

    @classmethod
    def from_embedder(
        cls, embedder: AudioEmbedder, learner: str = "analytic", learner_params: dict | None = None,
        device: str = "cpu",
    ) -> Model:
        """An empty model on a trained (or any) embedder: it knows no labels until it learns some."""
        return cls(embedder, make_learner(learner, **(learner_params or {})), device)

    @classmethod
    def train(
        cls,
        paths: Sequence[str | Path],
        labels: Sequence[str],
        *,
        encoder: str | dict = "fast",
        learner: str = "analytic",
        learner_params: dict | None = None,
        clip_seconds: float = 2.0,
        train: TrainConfig | None = None,
        seed: int = 0,
        pretrained: str | Path | None = None,
        device: str = "cpu",
        on_error: str = "fail",
        progress: bool = True,
    ) -> Model:
        """Base training: train the encoder on these labelled clips, freeze it, then learn them with the head."""
        from earmark.training.base import train_embedder

        labels = [_check_label(x) for x in labels]
        if len(labels) != len(paths):
            raise ModelError(f"{len(paths)} files but {len(labels)} labels")
        names = sorted(set(labels))
        if len(names) < 2:
            raise ModelError(f"base training needs at least 2 labels, got {names}")
        dense = [names.index(x) for x in labels]
        embedder, _, _ = train_embedder(
            paths, dense, encoder=encoder, audio=AudioConfig(clip_seconds=clip_seconds), train=train, seed=seed,
            pretrained=pretrained, device=device, on_error=on_error, progress=progress,
        )
        model = cls.from_embedder(embedder, learner, learner_params, device)
        model.learn(paths, labels, on_error=on_error)
        return model

    _read_only = False  # a frozen copy (``frozen()``): predicts, refuses every change
    _info: dict[str, Any] | None = None  # a frozen copy's info, taken from the model it was frozen from
    _torn = False  # a change was being applied when an error stopped it: this object may be half-changed

    def frozen(self) -> Model:
        """A read-only copy that predicts exactly like this model, for readers while this one keeps changing.

        It holds what scoring reads (``IncrementalLearner.frozen``: the weights, not the statistics) and shares
        the frozen embedder, so it costs a few MB where ``clone`` copies the whole state; learn, forget, merge,
        log and save refuse on it, and ``info`` is this model's at the time of freezing.
        """
        other = copy.copy(self)
        other.learner = self.learner.frozen()
        other.calibration = self.calibration.frozen() if self.calibration is not None else None
        other._names = dict(self._names)
        other.journal = list(self.journal)
        other.history = list(self.history)
        other.unlogged = []
        other._info = self.info()
        other._read_only = True
        return other

    @property
    def torn(self) -> bool:
        """True when an error interrupted a change half-way: reload the model (``load``) before using it again."""
        return self._torn

    @property
    def loggable(self) -> bool:
        """Whether ``log`` can make the unsaved changes durable (after a merge only ``save`` can)."""
        return not self._unloggable

    def _require_writable(self) -> None:
        if self._read_only:
            raise ModelError("this is a frozen (read-only) copy of a model: it predicts but cannot change or be "
                             "saved; change the model it was frozen from")

    def clone(self) -> Model:
        """An independent, changeable copy of the whole state (e.g. to try a merge and keep the original if it
        fails); readers that only predict want ``frozen``, which leaves the statistics out."""
        other = copy.copy(self)
        other.learner = copy.deepcopy(self.learner)
        other._names = dict(self._names)
        other.journal = list(self.journal)
        other.history = list(self.history)
        other.unlogged = list(self.unlogged)
        other.calibration = copy.deepcopy(self.calibration)
        return other  # the embedder is frozen and shared

    # ------------------------------------------------------------------ labels

    @property
    def labels(self) -> list[str]:
        """Label names in the learner's column order."""
        return [self._names[int(i)] for i in self.learner.classes_.tolist()]

    def counts(self) -> dict[str, int]:
        """Clips learned per label."""
        return {self._names[int(i)]: int(n) for i, n in zip(self.learner.classes_.tolist(),
                                                            self.learner.class_counts.tolist(), strict=True)}

    def _id_of(self, label: str, create: bool = False) -> int:
        for i, name in self._names.items():
            if name == label:
                return i
        if not create:
            known = ", ".join(sorted(self._names.values())) or "none"
            raise UnknownLabelError(f"unknown label {label!r}; known labels: {known}")
        self._names[self._next_id] = label
        self._next_id += 1
        return self._next_id - 1

    # ------------------------------------------------------------------ audio

    def decode(
        self, paths: Sequence[AudioSource], on_error: str = "fail", names: Sequence[str] | None = None,
        digests: bool = True, max_seconds: float | None = None,
    ) -> Decoded:
        """Decode clips at the model's rate and length; unreadable, empty or silent files fail (or are skipped).

        Sources are paths or in-memory clips (:class:`AudioBytes`); ``digests=False`` skips the clip digests
        that only learning and forgetting need; a file over ``max_seconds`` fails (``AudioTooLongError``)."""
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        out = Decoded()
        for k, path in enumerate(paths):
            name = str(names[k]) if names is not None else str(path)
            try:
                wave = load_audio(path, self.embedder.audio_config, max_seconds)
                if float(np.abs(wave).max()) < SILENCE:
                    raise AudioDecodeError(name, "contains only silence")
            except AudioDecodeError as exc:
                if names is not None:
                    exc = type(exc)(name, exc.reason)
                if on_error == "fail":
                    raise exc from None
                out.skipped.append((name, exc.reason))
                continue
            out.names.append(name)
            out.waves.append(wave)
            if digests:
                out.digests.append(clip_digest(wave))
            out.positions.append(k)
        return out

    @torch.no_grad()
    def embed(self, waves: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """Embeddings of decoded clips, (n, d) float32; the same bits for a clip whatever the batch around it."""
        if len(waves) == 0:
            return torch.zeros(0, self.embedder.embed_dim)
        stacked = np.stack(list(waves)) if not isinstance(waves, np.ndarray) else waves
        parts = [self.embedder.embed(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)]
        return torch.cat(parts).cpu()

    # ------------------------------------------------------------------ learn / predict / forget

    def learn(
        self, paths: Sequence[AudioSource], labels: str | Sequence[str], *, on_error: str = "fail",
        names: Sequence[str] | None = None, max_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Learn clips (new labels or more examples of known ones). On any error nothing is learned.

        ``names`` are what errors and the journal call the files (e.g. an upload's filename); a file over
        ``max_seconds`` is refused (``AudioTooLongError``).
        A clip already learned (same decoded audio) is refused, so nothing is ever counted twice.
        """
        self._require_writable()
        paths, labels = learn_request(paths, labels)
        decoded = self.decode(paths, on_error, names, max_seconds=max_seconds)
        seen = {e["clip"]: e["label"] for e in self.journal}
        keep, batch = [], set()
        for j, digest in enumerate(decoded.digests):
            if digest in seen or digest in batch:
                where = f"already learned as {seen[digest]!r}" if digest in seen else "given twice in this request"
                if on_error == "fail":
                    raise ModelError(f"{decoded.names[j]}: this clip was {where}")
                decoded.skipped.append((decoded.names[j], f"clip {where}"))
                continue
            batch.add(digest)
            keep.append(j)
        kept_labels = [labels[decoded.positions[j]] for j in keep]
        empty = sorted(set(labels) - set(kept_labels))
        if empty:
            raise ModelError(f"no valid clip for label(s) {', '.join(map(repr, empty))}: nothing learned "
                             f"({'; '.join(f'{n}: {r}' for n, r in decoded.skipped) or 'no files'})")
        X = self.embed([decoded.waves[j] for j in keep])
        now = _now()
        entries = [{"clip": decoded.digests[j], "label": kept_labels[row], "embedding": embedding_digest(X[row]),
                    "source": Path(decoded.names[j]).name, "time": now} for row, j in enumerate(keep)]
        before = set(self._names.values())
        counts = self._commit(Change("learn", kept_labels, X, entries, now))
        return {"learned": len(keep), "labels": counts, "new": sorted(set(counts) - before),
                "skipped": [{"file": n, "reason": r} for n, r in decoded.skipped]}

    def _commit(self, change: Change) -> dict[str, int]:
        self._require_writable()
        counts = self._apply(change)
        self.unlogged.append(change)
        return counts

    def _apply(self, change: Change) -> dict[str, int]:
        """Apply one change to the learner, the calibration, the journal and the history: what ``learn`` and
        ``forget`` do once their clips are embedded and checked, and what ``load`` replays from the change log.
        Returns the clips per label it touched. On an error in the learner nothing has changed."""
        counts: dict[str, int] = {}
        for x in change.labels:
            counts[x] = counts.get(x, 0) + 1
        self._torn = True  # until the change is whole (an error below may leave learner and journal apart)
        if change.op == "learn":
            names_before, next_before = dict(self._names), self._next_id
            try:
                ids = torch.as_tensor([self._id_of(x, create=True) for x in change.labels])
                self.learner.partial_fit(change.X, ids)
            except Exception:
                self._names, self._next_id = names_before, next_before
                raise
            if self.calibration is not None:
                self.calibration.update(change.X, ids)
            self.journal.extend(change.entries)
            self.history.append({"op": "learn", "time": change.time, "clips": len(change.labels), "labels": counts})
        elif change.op == "forget-label":
            label = change.labels[0]
            i = self._id_of(label)
            self.learner.forget_class(i)
            if self.calibration is not None:
                self.calibration.forget(label=i)
            counts = {label: sum(1 for e in self.journal if e["label"] == label)}
            self.journal = [e for e in self.journal if e["label"] != label]
            del self._names[i]
            self.history.append({"op": "forget", "time": change.time, "label": label, "clips": counts[label]})
        else:  # forget-clips
            labels_before = set(self.labels)
            ids = torch.as_tensor([self._id_of(x) for x in change.labels])
            self.learner.forget_samples(change.X, ids)
            if self.calibration is not None:
                self.calibration.forget(change.X, ids)
            chosen = {e["clip"] for e in change.entries}
            self.journal = [e for e in self.journal if e["clip"] not in chosen]
            for name in labels_before - set(self.labels):
                del self._names[self._id_of(name)]
            self.history.append({"op": "forget", "time": change.time, "clips": len(change.labels), "labels": counts})
        self.version += 1
        self._torn = False
        return counts

    @torch.no_grad()
    def predict(
        self, paths: Sequence[AudioSource], top_k: int = 5, window: float | None = None, hop: float | None = None,
        *, on_error: str = "fail", names: Sequence[str] | None = None, unknown_threshold: float | None = None,
        reject_unknown: bool = True, max_seconds: float | None = None,
    ) -> Predictions:
        """Top-k labels with probabilities per clip, or per window of each file when ``window`` is given.

        With ``on_error="skip"`` bad files are left out and listed in the result's ``skipped``.

        Probabilities are calibrated (temperature fitted on held-out clips) when the model has a calibration.
        A clip whose known-ness score (its best calibrated probability) is below the threshold gets
        ``("unknown", score)`` as top-1, then its best known labels. ``unknown_threshold``: None = the stored
        threshold (chosen for 5% false rejections of known sounds), a float = this threshold for this call;
        ``reject_unknown=False`` never answers unknown. A file over ``max_seconds`` fails (or is skipped)
        from its header, before its samples are read (``AudioTooLongError``).
        """
        reject = (unknown_threshold, reject_unknown)
        self._require_labels()
        if top_k < 1:
            raise ModelError(f"top_k must be >= 1, got {top_k}")
        top_k = min(top_k, self.learner.n_classes_)
        if window is None:
            decoded = self.decode(paths, on_error, names, digests=False, max_seconds=max_seconds)
            if not decoded.waves:
                return Predictions([], decoded.skipped)
            tops = self._top(decoded.waves, top_k, *reject)
            return Predictions((Prediction(n, t) for n, t in zip(decoded.names, tops, strict=True)), decoded.skipped)
        hop = hop or window
        out = Predictions()
        for k, path in enumerate(paths):
            name = str(names[k]) if names is not None else str(path)
            try:
                out += list(self.predict_stream(path, name, window, hop, top_k, 64, *reject, max_seconds=max_seconds))
            except AudioDecodeError as exc:
                if on_error == "fail":
                    raise type(exc)(name, exc.reason) from None
                out.skipped.append((name, exc.reason))
        return out

    def predict_stream(self, path: AudioSource, name: str, window: float, hop: float, top_k: int = 5,
                       batch_size: int = 64, unknown_threshold: float | None = None,
                       reject_unknown: bool = True, max_seconds: float | None = None) -> Iterator[Prediction]:
        """Windows are decoded block by block and classified a batch at a time: memory stays flat."""
        pending: list[tuple[float, np.ndarray]] = []
        reject = (unknown_threshold, reject_unknown)
        for item in iter_windows(path, window, hop, self.embedder.audio_config, max_seconds=max_seconds):
            pending.append(item)
            if len(pending) == batch_size:
                yield from self._window_batch(pending, name, window, top_k, reject)
                pending = []
        if pending:
            yield from self._window_batch(pending, name, window, top_k, reject)

    def _window_batch(self, items: list[tuple[float, np.ndarray]], name: str, window: float, top_k: int,
                      reject: tuple[float | None, bool]) -> list[Prediction]:
        tops = self._top([w for _, w in items], top_k, *reject)
        return [Prediction(name, top, t, t + window) for (t, _), top in zip(items, tops, strict=True)]

    def _top(
        self, waves: Sequence[np.ndarray], k: int, threshold: float | None = None, reject: bool = True
    ) -> list[list[tuple[str, float]]]:
        X = self.embed(waves)
        cal = self.calibration.calibration if self.calibration is not None else None
        if cal is None or cal.calibrator.n_samples == 0:  # nothing held out yet: the learner's own softmax
            proba, rejected, score = self.learner.predict_proba(X).cpu(), torch.zeros(len(X), dtype=torch.bool), None
        else:
            out = self.calibration.predict(self.learner, X, threshold, reject)
            proba, rejected, score = out.proba, out.rejected, out.score
        p, idx = proba.topk(k, dim=1)
        names = self.labels
        tops = [[(names[int(i)], float(v)) for v, i in zip(pr, ir, strict=True)] for pr, ir in zip(p, idx, strict=True)]
        return [[(UNKNOWN, float(score[r])), *top[: k - 1]] if bool(rejected[r]) else top for r, top in enumerate(tops)]

    def forget(
        self, label: str | None = None, files: Sequence[AudioSource] | None = None, *,
        names: Sequence[str] | None = None, max_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Exact unlearning of a label, or of specific clips that were learned; nothing else changes."""
        self._require_writable()
        if (label is None) == (files is None):
            raise ModelError("forget takes a label or files, not both or neither")
        if not self.learner.can_forget:
            able = ", ".join(n for n in LEARNERS.names() if LEARNERS.get(n).can_forget)
            raise ModelError(f"the {self.learner.name} learner cannot forget exactly; learners that can: {able}")
        if label is not None:
            counts = self._commit(Change("forget-label", [self._names[self._id_of(label)]], time=_now()))
            return {"forgot": counts[label], "labels": counts, "removed_labels": [label]}
        decoded = self.decode(list(files), "fail", names, max_seconds=max_seconds)
        entries = {e["clip"]: e for e in self.journal}
        rows, chosen = [], set()
        for name, digest in zip(decoded.names, decoded.digests, strict=True):
            if digest not in entries:
                raise ModelError(f"{name}: this clip was never learned by this model (no journal entry for its audio)")
            if digest in chosen:
                raise ModelError(f"{name}: given twice")
            chosen.add(digest)
            rows.append(entries[digest])
        X = self.embed(decoded.waves)
        for name, entry, x in zip(decoded.names, rows, X, strict=True):
            if embedding_digest(x) != entry["embedding"]:
                raise ModelError(f"{name}: its embedding now differs from the one learned (another encoder build, "
                                 "thread count or CPU?); it cannot be removed exactly. Forget its label instead.")
        labels_before = set(self.labels)
        counts = self._commit(Change("forget-clips", [e["label"] for e in rows], X,
                                     [{"clip": e["clip"]} for e in rows], _now()))
        return {"forgot": len(rows), "labels": counts, "removed_labels": sorted(labels_before - set(self.labels))}

    def merge(self, other: Model, *, solve: bool = True) -> dict[str, Any]:
        """Fold in a model trained on other data with the same encoder and learner settings: the union's model.

        ``solve=False`` adds the statistics only (many shards: solve once, with the last merge). Labels match
        by name. Refused when the encoders or settings differ, or when a clip (same decoded
        audio) was learned by both, so nothing is counted twice; the journals join, so forget still works.
        """
        self._require_writable()
        ours = _sha256(tensors_bytes(self.embedder.state_tensors(), self.embedder.describe()))
        theirs = _sha256(tensors_bytes(other.embedder.state_tensors(), other.embedder.describe()))
        if ours != theirs:
            raise ModelError(f"cannot merge: the models' encoders differ (checkpoint {ours[:12]} vs {theirs[:12]}); "
                             "merge only models built on the same trained encoder")
        if other.learner.name != self.learner.name or other.learner.config != self.learner.config:
            raise ModelError(f"cannot merge: learner settings differ ({self.learner.name} {self.learner.config} vs "
                             f"{other.learner.name} {other.learner.config})")
        shared = {e["clip"] for e in self.journal} & {e["clip"] for e in other.journal}
        if shared:
            example = next(e for e in other.journal if e["clip"] in shared)
            raise ModelError(f"cannot merge: {len(shared)} clip(s) were learned by both models (e.g. "
                             f"{example['source']!r}); merging would count them twice")
        names_before, next_before = dict(self._names), self._next_id
        try:
            mapping = {i: self._id_of(name, create=True) for i, name in other._names.items()}
            self.learner.merge(other.learner.relabeled(mapping), solve=solve)
        except Exception:
            self._names, self._next_id = names_before, next_before
            raise
        if self.calibration is not None and other.calibration is not None:
            self.calibration.merge(other.calibration, mapping, solve=solve)
        new = sorted(set(other._names.values()) - set(names_before.values()))
        self.journal += other.journal
        self.history.append({"op": "merge", "time": _now(), "clips": len(other.journal), "new_labels": new})
        self.version += 1
        self._unloggable = True  # a merge is no change record: only a full save makes it durable
        return {"merged": len(other.journal), "new": new}

    def _require_labels(self) -> None:
        if not self.learner.is_fitted:
            raise ModelError("this model knows no labels yet; teach it some with learn")

    # ------------------------------------------------------------------ info

    def statistics_bytes(self) -> int:
        """Bytes of the learner's state (the float64 statistics that exact forgetting and merging rely on)."""
        return self.learner.nbytes()

    def info(self) -> dict[str, Any]:
        if self._info is not None:
            return copy.deepcopy(self._info)
        enc = self.embedder.encoder
        encoder_bytes = sum(t.numel() * t.element_size() for t in [*enc.parameters(), *enc.buffers()])
        forget = (
            "exact: a label, or clips that were learned (re-embedded and checked against the journal)"
            if self.learner.can_forget else
            f"no: {self.learner.name} cannot forget exactly (use one of "
            f"{', '.join(n for n in LEARNERS.names() if LEARNERS.get(n).can_forget)})"
        )
        if self.learner.can_forget and getattr(self.learner.config, "class_factors", True) is False:
            forget = "exact for clips that were learned; not for whole labels (class_factors=False)"
        return {
            "format": FORMAT_VERSION,
            "earmark": _version(),
            "path": str(self.path) if self.path else None,
            "generation": self.generation,
            "version": self.version,
            "log": {"changes": self.logged, "bytes": self._log_end, "unsaved": len(self.unlogged)},
            "created": self.created,
            "labels": self.counts(),
            "clips": len(self.journal),
            "learner": {"name": self.learner.name, "config": dataclasses.asdict(self.learner.config),
                        "state_bytes": self.learner.nbytes()},
            "encoder": {"config": enc.config.to_dict(), "digest": self.embedder.digest,
                        "parameters": sum(p.numel() for p in enc.parameters()), "bytes": encoder_bytes},
            "audio": self.embedder.audio_config.to_dict(),
            "journal_bytes": len(json.dumps(self.journal)),
            "calibration": self._calibration_info(),
            "forget": forget,
            "history": self.history[-20:],
        }

    def _calibration_info(self) -> dict[str, Any] | None:
        """What calibration keeps (a shadow learner and held-out embeddings), in bytes, so nobody is surprised."""
        if self.calibration is None:
            return None
        cal = self.calibration.calibration
        return {"held_out_clips": len(self.calibration.pool_y), "bytes": self.calibration.nbytes(),
                "temperature": cal.calibrator.temperature, "transform": cal.calibrator.transform,
                "top_label": cal.calibrator.top_label.kind, "score": cal.detector.score,
                "threshold": cal.detector.threshold if math.isfinite(cal.detector.threshold) else None}

    # ------------------------------------------------------------------ persistence

    @staticmethod
    @contextmanager
    def lock(path: str | Path) -> Iterator[None]:
        """Hold the model directory's writer lock (raises ModelLockedError if another process holds it)."""
        with _lock(Path(path)):
            yield

    def _manifest_body(self, files: dict[str, dict], generation: int) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "earmark": _version(),
            "generation": generation,
            "created": self.created,
            "updated": _now(),
            "version": self.version,
            "learner": {"name": self.learner.name, "config": dataclasses.asdict(self.learner.config)},
            "labels": {str(i): name for i, name in sorted(self._names.items())},
            "next_label_id": self._next_id,
            "files": files,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write the model directory atomically (see the module docstring); returns its path."""
        self._require_writable()
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ModelError("save needs a path: this model was not loaded from or saved to one")
        if path.exists() and not path.is_dir():
            raise ModelError(f"{path}: exists and is not a directory")
        with _lock(path):
            on_disk = _read_manifest(path) if (path / MANIFEST).is_file() else None
            same = self.path is not None and path.resolve() == self.path.resolve()
            if on_disk is not None and same and int(on_disk.get("generation", -1)) != self.generation:
                raise ModelError(f"{path}: the model changed on disk since it was loaded (generation "
                                 f"{on_disk.get('generation')}, loaded {self.generation}): another writer saved it; "
                                 "load it again and redo the change")
            if on_disk is not None and same and read_log(path / _log_name(self.generation))[1] > self._log_end:
                raise ModelError(f"{path}: another writer logged changes since this model was loaded; load it again "
                                 "and redo the change")
            generation = (int(on_disk.get("generation", 0)) if on_disk else 0) + 1
            blobs = path / "blobs"
            blobs.mkdir(parents=True, exist_ok=True)
            files = {}
            kept = (on_disk or {}).get("files", {}).get("embedder") if same else None
            if kept and kept.get("sha256") == self.embedder.digest and (path / kept["path"]).is_file() \
                    and (path / kept["path"]).stat().st_size == kept.get("bytes"):
                files["embedder"] = dict(kept)  # the blob it was loaded from (and checked against) is still there
                blobs_out = []
            else:
                blobs_out = [("embedder", tensors_bytes(self.embedder.state_tensors(), self.embedder.describe()),
                              "safetensors")]
            learner_bytes = tensors_bytes(self.learner.state_dict(), {
                "kind": "learner", "name": self.learner.name, "config": dataclasses.asdict(self.learner.config)})
            journal_bytes = (json.dumps({"clips": self.journal, "history": self.history}, indent=0) + "\n").encode()
            blobs_out += [("learner", learner_bytes, "safetensors"), ("journal", journal_bytes, "json")]
            if self.calibration is not None:
                cal_tensors, cal_meta = self.calibration.state()
                blobs_out.append(("calibration", tensors_bytes(cal_tensors, {"kind": "calibration", **cal_meta}),
                                  "safetensors"))
            for role, data, suffix in blobs_out:
                digest = _sha256(data)
                rel = f"blobs/{role}-{digest[:20]}.{suffix}"
                if not ((path / rel).is_file() and _sha256((path / rel).read_bytes()) == digest):
                    atomic_write_bytes(path / rel, data)
                files[role] = {"path": rel, "sha256": digest, "bytes": len(data)}
            _fsync_dir(blobs)
            body = self._manifest_body(files, generation)
            body["content_hash"] = _sha256(json.dumps(body, sort_keys=True).encode())
            atomic_write_text(path / MANIFEST, json.dumps(body, indent=2, sort_keys=True) + "\n")
            _fsync_dir(path)
            self.generation = generation
            self.embedder.digest = files["embedder"]["sha256"]
            self.path = path
            self.unlogged, self.logged, self._log_end, self._unloggable = [], 0, 0, False
            _collect_garbage(path, {f["path"] for f in files.values()})
        return path

    def log(self) -> int:
        """Make the changes since the last save or log durable cheaply: append them to the change log and fsync.

        The statistics are not rewritten (``save`` does that, and folds the log in); ``load`` replays the log.
        Returns how many changes were logged. Needs the model saved to its directory first.
        """
        self._require_writable()
        if self.path is None or self.generation == 0:
            raise ModelError("log needs a model saved to a directory first (save it once)")
        if self._unloggable:
            raise ModelError("this model was merged since it was saved: only save() makes a merge durable")
        if not self.unlogged:
            return 0
        with _lock(self.path):
            on_disk = _read_manifest(self.path)
            if int(on_disk.get("generation", -1)) != self.generation:
                raise ModelError(f"{self.path}: the model changed on disk since it was loaded (generation "
                                 f"{on_disk.get('generation')}, loaded {self.generation}); load it again and redo "
                                 "the change")
            try:
                self._log_end = append_log(self.path / _log_name(self.generation),
                                           [c.to_bytes() for c in self.unlogged], self._log_end)
            except ChangeLogError as exc:
                raise ModelError(f"{exc}; load it again and redo the change") from None
        n = len(self.unlogged)
        self.logged += n
        self.unlogged = []
        return n

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Model:
        """Load a model directory, checking its format version and every file's hash; never unpickles."""
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"{path}: not a model directory" + (" (it is a file)" if path.exists() else
                                                                  " (it does not exist)"))
        body = _read_manifest(path)
        fmt = body.get("format")
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise ModelError(f"{path / MANIFEST}: model format {fmt!r} is newer than this earmark "
                             f"({_version()}, format {FORMAT_VERSION}); upgrade earmark to load it")
        blobs = {}
        optional = ("calibration",) if "calibration" in body.get("files", {}) else ()
        for role in ("embedder", "learner", "journal", *optional):
            entry = body.get("files", {}).get(role)
            if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
                raise ModelError(f"{path / MANIFEST}: no {role} file listed")
            file = path / entry["path"]
            if not file.is_file():
                raise ModelError(f"{file}: missing (listed in {path / MANIFEST})")
            data = file.read_bytes()
            if _sha256(data) != entry["sha256"]:
                raise ModelError(f"{file}: content does not match its sha256 in {MANIFEST} (corrupt or tampered)")
            blobs[role] = file
        try:
            embedder = AudioEmbedder.load(blobs["embedder"], device)
            tensors, meta, _ = load_tensors(blobs["learner"], kind="learner")
            learner = make_learner(meta["name"], **meta["config"])
            learner.load_state_dict(tensors)
            journal = json.loads(blobs["journal"].read_text())
            calibration = None
            if "calibration" in blobs:
                cal_tensors, cal_meta, _ = load_tensors(blobs["calibration"], kind="calibration")
                calibration = HeldOutCalibration.from_state(make_learner(meta["name"], **meta["config"]),
                                                            cal_tensors, cal_meta)
        except (CheckpointError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ModelError(f"{path}: cannot be loaded ({exc})") from exc
        model = cls(embedder, learner, device)
        model.calibration = calibration
        model._names = {int(i): name for i, name in body.get("labels", {}).items()}
        model._next_id = int(body.get("next_label_id", len(model._names)))
        model.journal = list(journal.get("clips", []))
        model.history = list(journal.get("history", []))
        model.generation = int(body.get("generation", 0))
        model.version = int(body.get("version", len(model.history)))
        model.created = body.get("created", model.created)
        model.path = path
        ids = set(learner.classes_.tolist())
        if ids != set(model._names):
            raise ModelError(f"{path / MANIFEST}: labels {sorted(model._names)} do not match the learner's classes "
                             f"{sorted(ids)}")
        model._replay_log()
        return model

    def _replay_log(self) -> None:
        """Apply the changes logged on top of this generation (a torn last record was never acknowledged)."""
        file = self.path / _log_name(self.generation)
        payloads, end = read_log(file)
        for k, data in enumerate(payloads):
            try:
                self._apply(Change.from_bytes(data, f"{file} (record {k + 1})"))
            except (CheckpointError, KeyError, ValueError, TypeError, RuntimeError) as exc:
                raise ModelError(f"{file}: change {k + 1} cannot be replayed ({exc})") from exc
        self.logged, self._log_end = len(payloads), end

    def export_onnx(self, out: str | Path, **kwargs: Any) -> dict[str, Any]:
        """Encoder and head as one ONNX file, checked against PyTorch with onnxruntime (see earmark.export)."""
        from earmark.export import export_onnx

        self._require_labels()
        report = export_onnx(self.embedder, self.learner, out, **kwargs)
        report["labels"] = self.labels
        atomic_write_text(Path(str(out) + ".labels.json"), json.dumps(self.labels, indent=2) + "\n")
        return report


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _log_name(generation: int) -> str:
    return f"changes-{generation}.log"


def _embedding_learners() -> list[str]:
    return [n for n in LEARNERS.names() if not LEARNERS.get(n).needs_encoder()]


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise ModelError(f"{path}: not a model directory (no {MANIFEST})")
    try:
        body = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ModelError(f"{file}: not a model manifest")
    claimed = body.pop("content_hash", None)
    if claimed != _sha256(json.dumps(body, sort_keys=True).encode()):
        raise ModelError(f"{file}: its content hash does not match (edited or corrupt)")
    return body


def _collect_garbage(path: Path, keep: set[str]) -> None:
    """Remove blobs the manifest no longer lists and temporary files of crashed writes."""
    for file in (path / "blobs").iterdir():
        rel = f"blobs/{file.name}"
        if rel not in keep:
            file.unlink(missing_ok=True)
    for file in path.glob(f".{MANIFEST}.*.tmp"):
        file.unlink(missing_ok=True)
    for file in path.glob("changes-*.log"):  # folded into the generation just saved
        file.unlink(missing_ok=True)


__all__ = ["Model", "ModelError", "ModelLockedError", "Prediction", "UnknownLabelError"]
