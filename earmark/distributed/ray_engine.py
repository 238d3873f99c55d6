"""The Ray engine: embed with a Ray Data actor pool, learn per shard on workers and merge on the driver.

Embedding (:func:`embed_with_ray`): Ray Data reads the file list (row = clip id + path) and
``map_batches`` runs :class:`EmbedActor`, a callable class that loads the encoder once per actor, in
an actor pool (``ActorPoolStrategy(size=num_workers)``) of ``num_workers`` actors with
``cpus_per_worker`` CPUs each (``torch.set_num_threads`` matches inside). Rows come back in any
order, so each carries its clip id and the file's content digest; the driver writes them into the
same :class:`~earmark.encoders.cache.EmbeddingCache` the single-process path writes (shards keyed by
audio digest), a shard per ``flush_rows`` rows. Embedders are pinned batch-invariant
(``AudioEmbedder.pin_batch_invariant``, as ``Model`` pins its own), so a clip has the same bits
whichever actor and batch embedded it, and the same bits as ``--engine local``.

Learning (:func:`learn_with_ray`): the clips are cut into contiguous shards; each shard is a Ray
task (at most ``num_workers`` in flight) that decodes and embeds its clips with the model's encoder,
fits a fresh learner of the model's settings, and returns its state, label names and journal entries.
The driver merges the shard models into the model in shard order, solving once after the last
(``Model.merge``: labels match by
name, statistics add), so the labels get the ids and columns they get from one ``Model.learn`` call
and the merged learner equals the single-process one to float64 rounding. Tasks have ``max_retries``:
a worker that dies is re-run by Ray, and since a task's result is only counted when the driver
receives it, a retried shard is counted once.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earmark.audio import AudioDecodeError, load_many
from earmark.checkpoint import tensors_bytes
from earmark.distributed import import_ray
from earmark.encoders.cache import EmbeddingCache, audio_digest, embedder_fingerprint
from earmark.encoders.embedder import AudioEmbedder

# ----------------------------------------------------------------------------- the cluster


def _local_runtime_env() -> dict[str, Any]:
    """Workers of a local instance import the same earmark as the driver (a checkout may shadow an install)."""
    import earmark

    here = str(Path(earmark.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def init_local(ray: Any, num_cpus: int | None = None) -> Any:
    """Start a local Ray instance on loopback only (127.0.0.1), without a dashboard; returns its context.

    Ray binds a local instance to the machine's network address unless it believes it runs on a
    laptop OS (``ray_constants.ENABLE_RAY_CLUSTER``); a throwaway instance for one command has no
    business on the network, so that switch is turned off while it starts.
    """
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    saved = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    if saved is not None:
        consts.ENABLE_RAY_CLUSTER = False
    try:
        return ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=_local_runtime_env())
    finally:
        if saved is not None:
            consts.ENABLE_RAY_CLUSTER = saved


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: to ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``), or a local instance.

    An instance already initialized in this process is used as it is and left running; one started
    here is shut down on exit. A local instance gets ``num_cpus`` CPUs (default: this machine's), no
    dashboard, and listens on loopback only (:func:`init_local`).
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address)
    else:
        init_local(ray, num_cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


def _local_cpus(num_workers: int, cpus_per_worker: int) -> int:
    """A local instance has at least the CPUs the workers ask for (oversubscribed rather than waiting forever)."""
    return max(os.cpu_count() or 1, num_workers * cpus_per_worker)


# ----------------------------------------------------------------------------- the encoder travels as bytes


def embedder_blob(embedder: AudioEmbedder) -> bytes:
    """The encoder checkpoint's bytes (what a model directory stores), to ship through the object store."""
    return tensors_bytes(embedder.state_tensors(), embedder.describe())


def embedder_from_blob(data: bytes) -> AudioEmbedder:
    """Load an encoder from :func:`embedder_blob` bytes (through a temporary file: the checkpoint checks apply)."""
    with tempfile.TemporaryDirectory(prefix="earmark-embedder-") as tmp:
        path = Path(tmp) / "embedder.safetensors"
        path.write_bytes(data)
        embedder = AudioEmbedder.load(path)
    embedder.digest = hashlib.sha256(data).hexdigest()
    return embedder.eval()


def _resolve(value: Any) -> Any:
    """An object-store reference fetched, anything else as it is."""
    ray = import_ray()
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


# ----------------------------------------------------------------------------- embedding


class EmbedActor:
    """Ray Data callable class: the encoder, loaded once per actor; a batch of (id, path) rows in, embeddings out.

    Out: ``id``, ``digest`` (the file's content hash, the cache key), ``status`` (``ok``; ``cached``:
    already in the cache, not recomputed; ``error``), ``reason`` and ``embedding`` (zeros unless ok).
    Errors are rows, not exceptions: Ray retries crashed workers, and bad files are the driver's call.
    """

    def __init__(self, blob: Any, threads: int = 1, known: Any = None) -> None:
        torch.set_num_threads(max(1, int(threads)))
        self.embedder = embedder_from_blob(_resolve(blob))
        self.embedder.pin_batch_invariant()
        self.known = set(_resolve(known) or ())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], dtype=np.int64)
        paths = [str(p) for p in batch["path"]]
        n, dim = len(ids), self.embedder.embed_dim
        digests, status, reasons = [""] * n, ["ok"] * n, [""] * n
        out = np.zeros((n, dim), dtype=np.float32)
        todo = []
        for k, path in enumerate(paths):
            try:
                digests[k] = audio_digest(path)
            except AudioDecodeError as exc:
                status[k], reasons[k] = "error", exc.reason
                continue
            if digests[k] in self.known:
                status[k] = "cached"
            else:
                todo.append(k)
        waves, pos, bad = load_many([paths[k] for k in todo], self.embedder.audio_config, "skip")
        failed = sorted(set(range(len(todo))) - set(pos))
        for j, (_, reason) in zip(failed, bad, strict=True):
            status[todo[j]], reasons[todo[j]] = "error", reason
        if waves:
            out[[todo[j] for j in pos]] = self.embedder.embed(np.stack(waves)).cpu().numpy()
        return {"id": ids, "digest": np.array(digests, dtype=object), "status": np.array(status, dtype=object),
                "reason": np.array(reasons, dtype=object), "embedding": out}


@dataclass
class EmbedSummary:
    """What an embed run did; the embeddings themselves are in the cache (``cache_dir``)."""

    engine: str
    clips: int
    computed: int
    cached: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache_dir: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    workers: int = 1
    first_rows_seconds: float = 0.0  # ray: until the first batch reached the driver (start-up of the actors)
    first_rows: int = 0  # ray: clips in that first batch


def _cached_keys(cache: EmbeddingCache) -> set[str]:
    """The audio digests the cache holds (EmbeddingCache has membership tests, no key listing)."""
    return set(cache._load())


def embed_local(
    embedder: AudioEmbedder, paths: Sequence[str | Path], cache_root: str | Path, *, batch_size: int = 32,
    on_error: str = "fail", progress: bool = True,
) -> EmbedSummary:
    """The single-process path (``embed_paths``); pins ``embedder`` batch-invariant (as ``Model`` does), so its
    bits equal the ray engine's."""
    from earmark.encoders.cache import embed_paths

    start = time.perf_counter()
    embedder.pin_batch_invariant()
    fingerprint = embedder_fingerprint(embedder)
    cache = EmbeddingCache(cache_root, fingerprint)
    result = embed_paths(embedder, paths, cache, batch_size=batch_size, on_error=on_error, progress=progress)
    return EmbedSummary("local", len(paths), result.computed, len(result.kept) - result.computed, result.skipped,
                        str(cache.dir), fingerprint, time.perf_counter() - start, 1)


def embed_with_ray(
    embedder: AudioEmbedder, paths: Sequence[str | Path], cache_root: str | Path, *, num_workers: int = 1,
    cpus_per_worker: int = 1, batch_size: int = 32, on_error: str = "fail", progress: bool = True,
    address: str | None = None, flush_rows: int = 1024, actor: type = EmbedActor,
) -> EmbedSummary:
    """Embed ``paths`` on Ray (an actor pool of ``num_workers``) into the embedding cache under ``cache_root``.

    Clips already in the cache are not recomputed. ``on_error="fail"`` raises the first bad file (by
    position) after everything else was written; ``"skip"`` reports it. The audio files must be
    readable at the same paths on the workers; the cache is written by the driver.

    Ray Data restarts a dead actor and re-runs its batch (without limit, its default); a batch's rows
    reach the driver once, when the batch completes. ``actor`` replaces :class:`EmbedActor` (tests).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if num_workers < 1 or cpus_per_worker < 1 or batch_size < 1:
        raise ValueError("num_workers, cpus_per_worker and batch_size must be >= 1")
    start = time.perf_counter()
    embedder.pin_batch_invariant()  # what the actors run; the fingerprint follows the pinned config
    fingerprint = embedder_fingerprint(embedder)
    cache = EmbeddingCache(cache_root, fingerprint)
    paths = [str(p) for p in paths]
    counts = {"ok": 0, "cached": 0}
    errors: dict[int, str] = {}
    first: list[float] = []
    with ray_session(address, None if address else _local_cpus(num_workers, cpus_per_worker)) as ray:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        blob = ray.put(embedder_blob(embedder))
        known = ray.put(sorted(_cached_keys(cache)))
        rows = [{"id": i, "path": p} for i, p in enumerate(paths)]
        blocks = max(1, min(len(rows), max(2 * num_workers, math.ceil(len(rows) / batch_size))))
        ds = ray.data.from_items(rows, override_num_blocks=blocks) if rows else None
        pending_keys: list[str] = []
        pending_rows: list[np.ndarray] = []

        def flush() -> None:
            if pending_keys:
                cache.add(list(pending_keys), torch.from_numpy(np.concatenate(pending_rows)))
                pending_keys.clear()
                pending_rows.clear()

        if ds is not None:
            out = ds.map_batches(
                actor, fn_constructor_kwargs={"blob": blob, "threads": cpus_per_worker, "known": known},
                batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_worker,
                compute=ray.data.ActorPoolStrategy(size=num_workers),
            )
            for batch in out.iter_batches(batch_format="numpy", batch_size=None):
                if not first:
                    first.extend([time.perf_counter() - start, len(batch["id"])])
                status = np.asarray(batch["status"]).astype(str)
                ok = status == "ok"
                for i, reason in zip(batch["id"][status == "error"], batch["reason"][status == "error"],
                                     strict=True):
                    errors[int(i)] = str(reason)
                counts["ok"] += int(ok.sum())
                counts["cached"] += int((status == "cached").sum())
                if ok.any():
                    pending_keys.extend(str(k) for k in batch["digest"][ok])
                    pending_rows.append(np.asarray(batch["embedding"], dtype=np.float32)[ok])
                    if len(pending_keys) >= flush_rows:
                        flush()
        flush()
    skipped = [(paths[i], errors[i]) for i in sorted(errors)]
    if skipped and on_error == "fail":
        raise AudioDecodeError(*skipped[0])
    return EmbedSummary("ray", len(paths), counts["ok"], counts["cached"], skipped, str(cache.dir), fingerprint,
                        time.perf_counter() - start, num_workers, *(first or [0.0, 0]))


# ----------------------------------------------------------------------------- learning


def _learn_shard(shard: Any, paths: list[str], labels: list[str], names: list[str] | None,
                 on_error: str) -> dict[str, Any]:
    """``Model.learn`` on one shard; with ``on_error="skip"``, a label none of whose clips in *this* shard
    is valid is left to the other shards (the driver raises if no shard learned it, as ``Model.learn`` does)."""
    from earmark.model import ModelError

    try:
        return shard.learn(paths, labels, on_error=on_error, names=names)
    except ModelError:
        if on_error != "skip":
            raise
    decoded = shard.decode(paths, "skip", names)
    seen = {e["clip"]: e["label"] for e in shard.journal}
    reason: dict[int, str] = {}  # position in the shard -> why that clip is not learned
    at = {pos: j for j, pos in enumerate(decoded.positions)}
    failed = iter(r for _, r in decoded.skipped)
    batch: set[str] = set()
    valid = set()
    for k in range(len(paths)):
        if k not in at:
            reason[k] = next(failed)
            continue
        digest = decoded.digests[at[k]]
        if digest in seen or digest in batch:
            reason[k] = f"clip already learned as {seen[digest]!r}" if digest in seen else \
                "clip given twice in this request"
        else:
            valid.add(labels[k])
        batch.add(digest)
    keep = [k for k, label in enumerate(labels) if label in valid]
    shown = names if names is not None else paths
    reasons = [{"file": str(shown[k]), "reason": reason[k]} for k, label in enumerate(labels) if label not in valid]
    if not keep:
        return {"learned": 0, "labels": {}, "new": [], "skipped": reasons}
    report = shard.learn([paths[k] for k in keep], [labels[k] for k in keep], on_error="skip",
                         names=[names[k] for k in keep] if names is not None else None)
    report["skipped"] = report["skipped"] + reasons
    return report


def fit_shard(
    blob: Any, learner_name: str, learner_config: dict[str, Any], known: Any, paths: list[str], labels: list[str],
    names: list[str] | None, on_error: str, threads: int = 1,
) -> dict[str, Any]:
    """One shard on a worker: decode, embed, fit a fresh learner; returns its state, names and journal entries.

    ``known`` maps the clips the model has already learned to their labels, so a shard refuses or skips
    them exactly as ``Model.learn`` on the whole model would. Errors come back as values (kind, args).
    """
    from earmark.model import Model, ModelError

    torch.set_num_threads(max(1, int(threads)))
    embedder = embedder_from_blob(_resolve(blob))
    known = _resolve(known) or {}
    shard = Model.from_embedder(embedder, learner_name, learner_config)
    shard.journal = [{"clip": clip, "label": label} for clip, label in known.items()]
    try:
        report = _learn_shard(shard, paths, labels, names, on_error)
    except AudioDecodeError as exc:
        return {"error": ("decode", [str(exc.path), exc.reason])}
    except ModelError as exc:
        return {"error": ("model", [str(exc)])}
    entries = shard.journal[len(known):]
    out: dict[str, Any] = {"report": report, "journal": entries, "names": dict(shard._names),
                           "next_id": shard._next_id, "learner": None, "calibration": None}
    if shard.learner.is_fitted:
        out["learner"] = {k: v.detach().cpu() for k, v in shard.learner.state_dict().items()}
        if shard.calibration is not None:
            out["calibration"] = shard.calibration.state()
    return out


def _shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _shard_model(model: Any, result: dict[str, Any]) -> Any:
    """A shard's result as a Model on the driver's encoder (nothing is loaded from disk)."""
    from earmark.calibration import HeldOutCalibration
    from earmark.learners import make_learner
    from earmark.model import Model

    cfg = model.learner.config_dict()
    learner = make_learner(model.learner.name, **cfg)
    learner.load_state_dict(result["learner"])
    other = Model(model.embedder, learner, model.device)
    if result["calibration"] is not None:
        tensors, meta = result["calibration"]
        other.calibration = HeldOutCalibration.from_state(make_learner(model.learner.name, **cfg), tensors, meta)
    other._names = {int(i): name for i, name in result["names"].items()}
    other._next_id = int(result["next_id"])
    other.journal = list(result["journal"])
    return other


def learn_with_ray(
    model: Any, paths: Sequence[str | Path], labels: str | Sequence[str], *, num_workers: int = 1,
    cpus_per_worker: int = 1, shard_size: int = 1024, on_error: str = "fail", names: Sequence[str] | None = None,
    address: str | None = None, max_retries: int = 3, shard_fn: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``model.learn(paths, labels)`` computed on Ray: shards fitted on workers, merged here. On any error
    nothing is learned. Returns ``Model.learn``'s report plus ``shards`` and ``engine``.

    The result equals ``model.learn`` on one process: the same journal (entries in the same order, one
    time stamp), the same label ids and columns, and the learner to float64 rounding (exactly what the
    shards' statistics add up to). What differs is the calibration's held-out share: each shard holds
    out a fifth of its own clips, so another fifth than one call over everything would.

    ``shard_fn`` replaces :func:`fit_shard` (same signature), for tests that kill a worker.
    """
    from earmark.learners.base import LEARNERS
    from earmark.model import ModelError, learn_request

    if not model.learner.can_merge:
        able = ", ".join(n for n in LEARNERS.names() if LEARNERS.get(n).can_merge)
        raise ModelError(f"--engine ray learns shards and merges them; the {model.learner.name} learner cannot "
                         f"merge (learners that can: {able}); use --engine local")
    paths, labels = learn_request([str(p) for p in paths], labels)
    if num_workers < 1 or cpus_per_worker < 1 or shard_size < 1:
        raise ValueError("num_workers, cpus_per_worker and shard_size must be >= 1")
    names = [str(x) for x in names] if names is not None else None
    # a multiple of num_workers shards of at most shard_size clips (a shard's decoded clips sit in its worker's memory)
    rounds = math.ceil(math.ceil(len(paths) / shard_size) / num_workers)
    bounds = _shard_bounds(len(paths), rounds * num_workers)
    fn = shard_fn or fit_shard
    results: list[dict[str, Any] | None] = [None] * len(bounds)
    with ray_session(address, None if address else _local_cpus(num_workers, cpus_per_worker)) as ray:
        task = ray.remote(fn).options(num_cpus=cpus_per_worker, max_retries=max_retries, retry_exceptions=False)
        blob = ray.put(embedder_blob(model.embedder))
        known = ray.put({e["clip"]: e["label"] for e in model.journal})
        cfg = model.learner.config_dict()
        pending: dict[Any, int] = {}

        def collect_one() -> None:  # a result counts when it arrives here, once, whatever retries ran before
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(ref)] = ray.get(ref)

        for k, (a, b) in enumerate(bounds):
            while len(pending) >= num_workers:
                collect_one()
            pending[task.remote(blob, model.learner.name, cfg, known, paths[a:b], labels[a:b],
                                names[a:b] if names is not None else None, on_error, cpus_per_worker)] = k
        while pending:
            collect_one()
    for result in results:  # the first error in file order, as one process would raise it
        assert result is not None
        if "error" in result:
            kind, args = result["error"]
            raise AudioDecodeError(*args) if kind == "decode" else ModelError(*args)
    done = [r for r in results if r is not None and r["learner"] is not None]
    learned = {x for r in done for x in r["report"]["labels"]}
    empty = sorted(set(labels) - learned)
    skipped = [s for r in results if r is not None for s in r["report"]["skipped"]]
    if empty:
        raise ModelError(f"no valid clip for label(s) {', '.join(map(repr, empty))}: nothing learned "
                         f"({'; '.join(s['file'] + ': ' + s['reason'] for s in skipped) or 'no files'})")
    first: dict[str, str] = {}
    for r in done:
        for e in r["journal"]:
            if e["clip"] in first:
                raise ModelError(f"{e['source']}: this clip was given twice in this request (also as "
                                 f"{first[e['clip']]!r}); nothing learned")
            first[e["clip"]] = e["source"]
    before = set(model.labels)
    history = list(model.history)
    trial = model.clone()  # merge into a copy: a failure leaves the model as it was
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for k, r in enumerate(done):
        for e in r["journal"]:
            e["time"] = now
        trial.merge(_shard_model(model, r), solve=k == len(done) - 1)  # statistics add up; one solve at the end
    counts: dict[str, int] = {}
    for r in done:
        for label, n in r["report"]["labels"].items():
            counts[label] = counts.get(label, 0) + n
    model.learner, model.calibration, model.journal = trial.learner, trial.calibration, trial.journal
    model._names, model._next_id = trial._names, trial._next_id
    clips = sum(counts.values())
    model.history = [*history, {"op": "learn", "time": now, "clips": clips, "labels": counts, "engine": "ray",
                                "shards": len(bounds)}]
    return {"learned": clips, "labels": counts, "new": sorted(set(counts) - before), "skipped": skipped,
            "shards": len(bounds), "engine": "ray"}


__all__ = ["EmbedActor", "EmbedSummary", "embed_local", "embed_with_ray", "embedder_blob", "embedder_from_blob",
           "fit_shard", "init_local", "learn_with_ray", "ray_session"]
