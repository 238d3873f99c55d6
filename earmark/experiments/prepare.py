"""What every evaluation shares: the dataset, the scenario, the base-session encoder and cached embeddings."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from earmark.audio import AudioConfig
from earmark.checkpoint import atomic_write_text
from earmark.data import AudioDataset, default_data_dir, load_dataset, render_default_dataset
from earmark.data.render import default_dataset_root
from earmark.encoders.cache import EmbeddingCache, audio_digest, embed_paths, embedder_fingerprint
from earmark.encoders.config import resolve_config
from earmark.encoders.embedder import AudioEmbedder
from earmark.experiments.config import RunConfig, check_class_split, split_classes
from earmark.experiments.report import log
from earmark.experiments.rundir import RunWriter
from earmark.learners import IncrementalLearner, make_learner
from earmark.scenarios import SCENARIOS, ClassIncremental
from earmark.training.base import load_features, train_embedder


def resolve_dataset(config: RunConfig) -> AudioDataset:
    if config.root is None:
        root = render_default_dataset(default_dataset_root(config.render), config.render, progress=config.progress)
        return load_dataset("esc50", root)
    return load_dataset(config.dataset, config.root)


def resolve_class_order(config: RunConfig, dataset: AudioDataset) -> list[int] | None:
    """``config.class_order``, or with ``config.class_split`` that part of the dataset's classes in an order
    seeded by ``config.seed`` (as the scenario orders all classes when no order is given)."""
    check_class_split(config)
    if config.class_split is None:
        return config.class_order
    part = split_classes(dataset.num_classes, config.class_split_fraction, config.class_split_seed)[config.class_split]
    return [int(c) for c in np.random.default_rng(config.seed).permutation(part)]


def tuning_check(config: RunConfig, scenario: ClassIncremental) -> dict | None:
    """Whether the learner params (``config.tuned_on``, from the tune.json beside --params) were tuned on
    classes of this run: ``{..., "overlap": [class names], "disjoint": bool}``, logged; None without."""
    if not config.tuned_on:
        return None
    names = [scenario.dataset.class_names[int(c)] for c in scenario.class_order]
    overlap = sorted(set(names) & set(config.tuned_on.get("class_names") or []))
    check = {**config.tuned_on, "evaluated_classes": len(names), "overlap": overlap, "disjoint": not overlap}
    tuned = len(config.tuned_on.get("class_names") or [])
    if overlap:
        log(f"WARNING: the learner params were tuned on {len(overlap)} of the {len(names)} classes evaluated here "
            f"(e.g. {', '.join(overlap[:3])}): these figures are optimistic; tune with --class-split tune and "
            "evaluate with --class-split eval", config.progress)
    else:
        log(f"learner params tuned on {tuned} classes disjoint from the {len(names)} evaluated here", config.progress)
    return check


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def base_embedder(
    config: RunConfig, dataset: AudioDataset, scenario: ClassIncremental, cache_root: Path
) -> tuple[AudioEmbedder, dict]:
    """Train the encoder on the base session's audio only, or reuse an identical earlier training."""
    base = scenario[0]
    train = replace(config.train, seed=config.seed)
    key = _digest(
        {
            "encoder": config.encoder,
            "clip_seconds": config.clip_seconds,
            "pretrained": audio_digest(config.pretrained) if config.pretrained else None,
            "train": train.result_dict(),
            "files": [audio_digest(dataset.paths[i]) for i in base.train_indices],
            "labels": scenario.dense_targets(base.train_indices).tolist(),
        }
    )
    ckpt = cache_root / "encoders" / f"{key[:32]}.safetensors"
    partial = ckpt.with_suffix(".partial.safetensors")  # base training's own checkpoint, resumed after a crash
    if ckpt.is_file() and not config.retrain:
        log(f"reusing the base-session encoder trained earlier: {ckpt}", config.progress)
        return AudioEmbedder.load(ckpt, config.device), {"reused": True, "checkpoint": str(ckpt)}
    if partial.is_file() and config.resume:
        log(f"resuming base training from its checkpoint {partial}", config.progress)
    if config.pretrained:
        log(f"starting from the pretrained encoder {config.pretrained}", config.progress)
    log(f"training the '{config.encoder}' encoder on {len(base.train_indices)} clips of {len(base.classes)} "
        "base classes", config.progress)
    embedder, history, skipped = train_embedder(
        [dataset.paths[i] for i in base.train_indices], scenario.dense_targets(base.train_indices),
        encoder=config.encoder, audio=AudioConfig(clip_seconds=config.clip_seconds), train=train,
        seed=config.seed, pretrained=config.pretrained, device=config.device, on_error=config.on_error,
        progress=config.progress, checkpoint_path=partial, resume=config.resume,
    )
    embedder.save(ckpt)
    partial.unlink(missing_ok=True)
    partial.with_suffix(".json").unlink(missing_ok=True)
    embedder.to(config.device)
    training = {"reused": False, "checkpoint": str(ckpt), "loss": history.loss,
                "train_accuracy": history.accuracy, "seconds": history.seconds, "skipped": len(skipped)}
    if history.val_accuracy:  # a validation split of the base classes' training clips (not the test fold)
        training |= {"val_accuracy": history.val_accuracy, "best_epoch": history.best_epoch,
                     "stopped_epoch": history.stopped_epoch}
    return embedder, training


@dataclass
class Prepared:
    """What every evaluation shares: the scenario, the frozen embedder and the cached embeddings.

    Backbone-updating learners read normalized log-mel instead of embeddings: ``logmel()`` decodes it
    once, on first use, in the row order of ``X`` (float16, to halve the memory it takes).
    """

    dataset: AudioDataset
    scenario: ClassIncremental
    embedder: AudioEmbedder
    embedder_path: Path
    training: dict
    X: torch.Tensor  # (clips embedded, dim)
    row_of: dict[int, int]  # dataset index -> row of X
    skipped: list[tuple[str, str]]
    computed: int
    timings: dict[str, float]
    progress: bool = True
    _logmel: torch.Tensor | None = field(default=None, repr=False)

    def logmel(self) -> torch.Tensor:
        if self._logmel is None:
            t = time.perf_counter()
            order = sorted(self.row_of, key=self.row_of.__getitem__)
            raw, kept, skipped = load_features(self.embedder, [self.dataset.paths[i] for i in order], self.progress)
            if skipped or len(kept) != len(order):
                raise ValueError(f"{len(skipped)} clip(s) that were embedded failed to decode again: {skipped[:3]}")
            with torch.no_grad():
                self._logmel = self.embedder.normalizer(raw.to(self.embedder.normalizer.mean.device)).half().cpu()
            self.timings["logmel"] = time.perf_counter() - t
        return self._logmel

    def inputs_for(self, learner: IncrementalLearner) -> torch.Tensor:
        """What ``learner`` reads: embeddings, or log-mel plus a copy of the base encoder to train."""
        if learner.needs_encoder():
            learner.init_encoder(self.embedder.encoder)
            return self.logmel()
        return self.X

    def total_bytes(self, learner: IncrementalLearner) -> int:
        """The learner's state plus the frozen encoder it reads from (backbone learners hold their own)."""
        return learner.nbytes() + (0 if learner.needs_encoder() else module_bytes(self.embedder.encoder))


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def build_learner(config: RunConfig, name: str, encoder_bytes: int | None = None) -> IncrementalLearner:
    """A learner with the run's params; a byte budget becomes a replay memory of what the model leaves."""
    params = dict(config.learner_params.get(name, {}))
    learner = make_learner(name, **params)
    if config.memory_budget is not None and learner.takes_budget:
        model = learner.nbytes() if encoder_bytes is None else encoder_bytes
        if config.memory_budget <= model:
            raise ValueError(f"memory budget {config.memory_budget} B does not even hold {name}'s model ({model} B)")
        params.update(memory_bytes=config.memory_budget - model, memory_clips=None)
        learner = make_learner(name, **params)
    return learner


def prepare(
    config: RunConfig, embed_train_pool: bool = False, writer: RunWriter | None = None, folder: str = ""
) -> Prepared:
    """Dataset, scenario, base-session encoder and embeddings of the scenario's clips.

    ``embed_train_pool`` also embeds every training clip of the scenario's classes, so that other
    support-set trials (``scenario.with_trial``) find their clips embedded. The run folder's files
    (embedder.safetensors, skipped.csv) go to ``writer`` (a :class:`RunWriter` of ``config.out``);
    without one, straight into ``config.out``; ``folder``: into that sub-folder of it instead.
    """
    timings: dict[str, float] = {}
    inside = (folder,) if folder else ()
    if writer is None:
        Path(config.out, *inside).mkdir(parents=True, exist_ok=True)
    here = (lambda name: writer.path(*inside, name)) if writer is not None else Path(config.out, *inside).joinpath
    final = (lambda name: writer.final(*inside, name)) if writer is not None else Path(config.out, *inside).joinpath
    resolve_config(config.encoder)  # fail on a bad name before any work

    t = time.perf_counter()
    dataset = resolve_dataset(config)
    timings["dataset"] = time.perf_counter() - t
    train_idx, test_idx = dataset.split(config.test_fold)
    if config.train_folds is not None:
        train_idx = np.flatnonzero(np.isin(dataset.folds, config.train_folds))
    scenario = SCENARIOS.get(config.scenario)(
        dataset, train_idx, test_idx, initial=config.initial, increment=config.increment, shots=config.shots,
        seed=config.seed, num_classes=config.num_classes, class_order=resolve_class_order(config, dataset),
        params=config.scenario_params,
    )
    log(f"dataset {dataset.name}: {len(dataset)} clips, {dataset.num_classes} classes; scenario: {scenario!r}",
         config.progress)
    cache_root = Path(config.cache_dir) if config.cache_dir else default_data_dir() / "cache"

    t = time.perf_counter()
    embedder, training = base_embedder(config, dataset, scenario, cache_root)
    timings["base_training"] = time.perf_counter() - t
    embedder_path = final("embedder.safetensors")
    embedder.to("cpu").save(here("embedder.safetensors"))
    embedder.to(config.device)

    t = time.perf_counter()
    needed = {int(i) for s in scenario for i in np.concatenate([s.train_indices, s.test_indices])}
    if embed_train_pool:
        pool = scenario.train_pool[np.isin(dataset.targets[scenario.train_pool], scenario.class_order)]
        needed |= {int(i) for i in pool}
    needed = sorted(needed)
    cache = EmbeddingCache(cache_root / "embeddings", embedder_fingerprint(embedder))
    result = embed_paths(
        embedder, [dataset.paths[i] for i in needed], cache, batch_size=config.batch_size,
        on_error=config.on_error, progress=config.progress, desc="embedding clips",
    )
    if result.skipped:
        buf = io.StringIO()
        csv.writer(buf).writerows([("path", "reason"), *result.skipped])
        atomic_write_text(here("skipped.csv"), buf.getvalue())
        log(f"skipped {len(result.skipped)} unreadable file(s); see {final('skipped.csv')}", config.progress)
    timings["embedding"] = time.perf_counter() - t
    log(f"embeddings: {len(needed)} clips, {result.computed} computed, "
         f"{len(needed) - result.computed} from the cache", config.progress)
    return Prepared(
        dataset=dataset, scenario=scenario, embedder=embedder, embedder_path=embedder_path, training=training,
        X=result.embeddings, row_of={needed[k]: r for r, k in enumerate(result.kept)}, skipped=result.skipped,
        computed=result.computed, timings=timings, progress=config.progress,
    )



# RunConfig fields that change nothing a learner computes (left out of the key of its session checkpoints).
NOT_IN_SESSIONS = ("resume", "progress", "retrain")


def learner_checkpoints(config: RunConfig, prep: Prepared) -> Path:
    """The folder of this run's learner session checkpoints (one sub-folder per learner and trial).

    It lies beside the base-training checkpoint, ``<cache>/encoders/<key>.sessions/<run key>``, the run
    key a digest of the run's config (its output folder included), so that another run on the same
    encoder keeps its own. Deleted by :func:`remove_learner_checkpoints` once the run folder is written.
    """
    key = _digest({k: v for k, v in asdict(config).items() if k not in NOT_IN_SESSIONS})
    return Path(prep.training["checkpoint"]).with_suffix(".sessions") / key[:16]


def remove_learner_checkpoints(folder: Path) -> None:
    """Delete a finished run's learner checkpoints (and the encoder's ``.sessions`` folder once empty)."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # other runs' checkpoints are still there, or it is gone
        folder.parent.rmdir()


def encoder_summary(prep: Prepared) -> dict:
    enc = prep.embedder.encoder
    return {"config": enc.config.to_dict(), "checkpoint": str(prep.embedder_path), "digest": prep.embedder.digest,
            "parameters": sum(p.numel() for p in enc.parameters()), "training": prep.training}
