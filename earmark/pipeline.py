"""The main job: dataset -> base-session encoder -> cached embeddings -> incremental sessions -> report."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from earmark.audio import AudioConfig, load_many
from earmark.checkpoint import atomic_write_text
from earmark.data import AudioDataset, RenderConfig, default_data_dir, load_dataset, render_default_dataset
from earmark.data.render import default_dataset_root
from earmark.encoders import ENCODER_CONFIGS
from earmark.encoders.cache import EmbeddingCache, audio_digest, embed_paths, embedder_fingerprint
from earmark.encoders.config import EncoderConfig
from earmark.encoders.embedder import AudioEmbedder
from earmark.learners import AnalyticLearner, IncrementalLearner, joint_ridge, make_learner
from earmark.learners.analytic import RandomReLUBuffer
from earmark.metrics import AccuracyMatrix, format_table
from earmark.plots import JOINT  # the joint ridge upper bound in reports (the learner `joint` retrains the encoder)
from earmark.registry import Registry
from earmark.scenarios import BlurryIncremental, ClassIncremental, evaluate_online
from earmark.training.supervised import TrainConfig, train_supervised


@dataclass
class RunConfig:
    """Everything a run depends on; written resolved into results.json."""

    root: str | None = None  # a dataset folder; None renders/reuses the embedded default
    dataset: str = "esc50"  # loader name for `root`
    out: str = "runs/demo"
    cache_dir: str | None = None  # default: <data dir>/cache
    num_classes: int | None = None  # None: every class of the dataset
    # Dataset class ids in the order they are learned; a subset restricts the run to those classes
    # (e.g. tune on one half, evaluate on the other). None: a permutation seeded by `seed`.
    class_order: list[int] | None = None
    initial: int = 60
    increment: int = 5
    shots: int | None = 5  # training clips per new class in later sessions; None = all
    test_fold: int = 5
    train_folds: list[int] | None = None  # None: every fold but the test fold (few-shot sets: [1])
    on_error: str = "fail"  # a bad audio file: "fail" with a clear message, or "skip" and report it
    encoder: str | dict = "fast"  # a preset name or EncoderConfig fields
    clip_seconds: float = 2.0  # every clip is cropped or padded to this length
    pretrained: str | None = None  # an `earmark pretrain` checkpoint to start base training from
    learners: list[str] = field(default_factory=lambda: ["ncm", "analytic"])
    # Total bytes each learner may hold (its state, exemplars and the encoder it relies on). Replay-style
    # learners fill what their model leaves with exemplars; the others are reported against it.
    memory_budget: int | None = None
    # "class-incremental" (B/Inc, few-shot with `shots`) or "blurry" (Si-Blurry style: classes recur with
    # uneven counts; `scenario_params` holds num_sessions, disjoint_fraction, blurry_fraction, concentration).
    scenario: str = "class-incremental"
    scenario_params: dict = field(default_factory=dict)
    online_batch: int | None = None  # single pass in batches of this size, test-then-train
    # gamma scales with the embedding's energy: 0.1 (ACIL's default for ImageNet features) overfits
    # these embeddings; see the README for the sweep behind 1000 (DS-AL's streams get the same value).
    learner_params: dict[str, dict] = field(
        default_factory=lambda: {"analytic": {"gamma": 1000.0}, "dsal": {"gamma": 1000.0, "gamma_comp": 1000.0}}
    )
    joint_bound: bool = True
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 64  # for embedding
    retrain: bool = False  # ignore a cached trained encoder
    progress: bool = True
    render: RenderConfig = field(default_factory=RenderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _log(msg: str, progress: bool) -> None:
    if progress:
        tqdm.write(msg)
    else:
        print(msg, flush=True)


def resolve_dataset(config: RunConfig) -> AudioDataset:
    if config.root is None:
        root = render_default_dataset(default_dataset_root(config.render), config.render, progress=config.progress)
        return load_dataset("esc50", root)
    return load_dataset(config.dataset, config.root)


def run_config_from_dict(values: dict) -> RunConfig:
    """Build a RunConfig from plain values (a YAML file, CLI flags); unknown keys are an error."""
    known = set(RunConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown run option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = dict(values)
    if isinstance(values.get("render"), dict):
        values["render"] = RenderConfig(**values["render"])
    if isinstance(values.get("train"), dict):
        values["train"] = TrainConfig(**values["train"])
    return RunConfig(**values)


def encoder_config(spec: str | dict) -> EncoderConfig:
    """A preset name (see ENCODER_CONFIGS) or a dict of EncoderConfig fields."""
    return EncoderConfig.from_dict(spec) if isinstance(spec, dict) else ENCODER_CONFIGS.get(spec)


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def load_features(
    embedder: AudioEmbedder, paths: list[Path], progress: bool, on_error: str = "fail"
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Raw log-mel of every path, before normalization; returns (features, kept positions, skipped)."""
    out, kept, skipped = [], [], []
    for start in tqdm(range(0, len(paths), 64), desc="log-mel", unit="batch", disable=not progress, leave=False):
        waves, ok, bad = load_many(paths[start : start + 64], embedder.audio_config, on_error)
        kept.extend(start + k for k in ok)
        skipped.extend(bad)
        if waves:
            out.append(embedder.logmel(torch.as_tensor(np.stack(waves))))
    if not out:
        raise ValueError("no decodable training clip in the base session")
    return torch.cat(out), kept, skipped


def base_embedder(
    config: RunConfig, dataset: AudioDataset, scenario: ClassIncremental, cache_root: Path
) -> tuple[AudioEmbedder, dict]:
    """Train the encoder on the base session's audio only, or reuse an identical earlier training."""
    base = scenario[0]
    key = _digest(
        {
            "encoder": config.encoder,
            "clip_seconds": config.clip_seconds,
            "pretrained": audio_digest(config.pretrained) if config.pretrained else None,
            "train": asdict(config.train),
            "files": [audio_digest(dataset.paths[i]) for i in base.train_indices],
            "labels": scenario.dense_targets(base.train_indices).tolist(),
        }
    )
    ckpt = cache_root / "encoders" / f"{key[:32]}.safetensors"
    if ckpt.is_file() and not config.retrain:
        _log(f"reusing the base-session encoder trained earlier: {ckpt}", config.progress)
        return AudioEmbedder.load(ckpt, config.device), {"reused": True, "checkpoint": str(ckpt)}
    torch.manual_seed(config.seed)
    embedder = AudioEmbedder(encoder_config(config.encoder), AudioConfig(clip_seconds=config.clip_seconds))
    if config.pretrained:
        embedder.encoder = load_pretrained_encoder(config.pretrained).train()
        _log(f"starting from the pretrained encoder {config.pretrained}", config.progress)
    paths = [dataset.paths[i] for i in base.train_indices]
    raw, kept, skipped = load_features(embedder, paths, config.progress, config.on_error)
    embedder.normalizer.fit(raw)
    feats = embedder.normalizer(raw)
    labels = torch.as_tensor(scenario.dense_targets(base.train_indices[kept]))
    _log(
        f"training the '{config.encoder}' encoder on {len(paths)} clips of {len(base.classes)} base classes",
        config.progress,
    )
    history = train_supervised(
        embedder.encoder, feats, labels, len(base.classes), config.train, device=config.device,
        progress=config.progress,
    )
    embedder = embedder.to("cpu").eval()
    embedder.save(ckpt)
    embedder.to(config.device)
    return embedder, {"reused": False, "checkpoint": str(ckpt), "loss": history.loss,
                      "train_accuracy": history.accuracy, "seconds": history.seconds, "skipped": len(skipped)}


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


def _embedded(indices: np.ndarray, row_of: dict[int, int]) -> np.ndarray:
    """Dataset indices that have an embedding (skipped bad files have none)."""
    return np.asarray([i for i in indices if int(i) in row_of], dtype=np.int64)


SCENARIOS: Registry = Registry("scenario")


@SCENARIOS.register("class-incremental")
def class_incremental(
    config: RunConfig, dataset: AudioDataset, train: np.ndarray, test: np.ndarray
) -> ClassIncremental:
    if config.scenario_params:
        raise ValueError(f"scenario_params are for the blurry scenario, got {config.scenario_params}")
    return ClassIncremental(
        dataset, train, test, initial_increment=config.initial, increment=config.increment,
        shots=config.shots, seed=config.seed, num_classes=config.num_classes, class_order=config.class_order,
    )


@SCENARIOS.register("blurry")
def blurry(config: RunConfig, dataset: AudioDataset, train: np.ndarray, test: np.ndarray) -> BlurryIncremental:
    """Si-Blurry-style sessions; the session count defaults to what initial/increment would give."""
    params = dict(config.scenario_params)
    if "num_sessions" not in params:
        n = config.num_classes or (len(config.class_order) if config.class_order else dataset.num_classes)
        params["num_sessions"] = 1 + max(0, -(-(n - config.initial) // config.increment))
    return BlurryIncremental(dataset, train, test, seed=config.seed, num_classes=config.num_classes,
                             class_order=config.class_order, **params)


def evaluate(
    config: RunConfig, learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor,
    row_of: dict[int, int],
) -> tuple[AccuracyMatrix, list[float], dict]:
    """Session by session, or test-then-train over a single-pass stream when ``config.online_batch``."""
    if config.online_batch is None:
        matrix, seconds = evaluate_learner(learner, scenario, X, row_of)
        return matrix, seconds, {}
    t0 = time.perf_counter()
    result = evaluate_online(learner, scenario, X, row_of, config.online_batch, seed=config.seed)
    seconds = (time.perf_counter() - t0) / max(1, len(scenario))
    online = {"prequential_accuracy": result.prequential_accuracy(), "curve": result.curve.tolist()}
    return result.matrix, [seconds] * len(scenario), online


def evaluate_learner(
    learner: IncrementalLearner, scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int]
) -> tuple[AccuracyMatrix, list[float]]:
    """Run the sessions in order: fit on each session's data, test on all classes seen so far."""
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds = []
    for session in scenario:
        train, test = _embedded(session.train_indices, row_of), _embedded(session.test_indices, row_of)
        t0 = time.perf_counter()
        learner.partial_fit(X[[row_of[i] for i in train]], scenario.dense_targets(train))
        seconds.append(time.perf_counter() - t0)
        pred = learner.predict(X[[row_of[i] for i in test]]).cpu().numpy()
        matrix.record(session.index, scenario.dense_targets(test), pred, scenario.session_classes)
    return matrix, seconds


def evaluate_joint(
    scenario: ClassIncremental, X: torch.Tensor, row_of: dict[int, int], params: dict
) -> tuple[AccuracyMatrix, list[float]]:
    """The joint upper bound: after each session, one ridge solve on all training data seen so far."""
    cfg = AnalyticLearner.Config(**params)
    expand = RandomReLUBuffer(cfg.buffer_size, cfg.seed)  # the analytic learner's expansion, same seed
    expand.build(X.shape[1])
    matrix = AccuracyMatrix.empty(len(scenario))
    seconds = []
    seen: list[int] = []
    for session in scenario:
        seen.extend(_embedded(session.train_indices, row_of).tolist())
        test = _embedded(session.test_indices, row_of)
        t0 = time.perf_counter()
        y = scenario.dense_targets(np.asarray(seen))
        H = expand(X[[row_of[i] for i in seen]])
        classes = np.unique(y)
        Y = torch.as_tensor(y[:, None] == classes[None, :], dtype=torch.float64)
        W = joint_ridge(H, Y, cfg.gamma)
        seconds.append(time.perf_counter() - t0)
        Ht = expand(X[[row_of[i] for i in test]])
        pred = classes[(Ht @ W).argmax(1).numpy()]
        matrix.record(session.index, scenario.dense_targets(test), pred, scenario.session_classes)
    return matrix, seconds


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
        if learner.input_ndim == 3:
            learner.init_encoder(self.embedder.encoder)
            return self.logmel()
        return self.X

    def total_bytes(self, learner: IncrementalLearner) -> int:
        """The learner's state plus the frozen encoder it reads from (backbone learners hold their own)."""
        return learner.nbytes() + (0 if learner.input_ndim == 3 else module_bytes(self.embedder.encoder))


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def build_learner(config: RunConfig, name: str, encoder_bytes: int | None = None) -> IncrementalLearner:
    """A learner with the run's params; a byte budget becomes a replay memory of what the model leaves."""
    params = dict(config.learner_params.get(name, {}))
    learner = make_learner(name, **params)
    if config.memory_budget is not None and getattr(learner, "takes_budget", False):
        model = learner.nbytes() if encoder_bytes is None else encoder_bytes
        if config.memory_budget <= model:
            raise ValueError(f"memory budget {config.memory_budget} B does not even hold {name}'s model ({model} B)")
        params.update(memory_bytes=config.memory_budget - model, memory_clips=None)
        learner = make_learner(name, **params)
    return learner


def prepare(config: RunConfig, embed_train_pool: bool = False) -> Prepared:
    """Dataset, scenario, base-session encoder and embeddings of the scenario's clips.

    ``embed_train_pool`` also embeds every training clip of the scenario's classes, so that other
    support-set trials (``scenario.with_trial``) find their clips embedded.
    """
    timings: dict[str, float] = {}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder_config(config.encoder)  # fail on a bad name before any work

    t = time.perf_counter()
    dataset = resolve_dataset(config)
    timings["dataset"] = time.perf_counter() - t
    train_idx, test_idx = dataset.split(config.test_fold)
    if config.train_folds is not None:
        train_idx = np.flatnonzero(np.isin(dataset.folds, config.train_folds))
    scenario = SCENARIOS.get(config.scenario)(config, dataset, train_idx, test_idx)
    _log(f"dataset {dataset.name}: {len(dataset)} clips, {dataset.num_classes} classes; scenario: {scenario!r}",
         config.progress)
    cache_root = Path(config.cache_dir) if config.cache_dir else default_data_dir() / "cache"

    t = time.perf_counter()
    embedder, training = base_embedder(config, dataset, scenario, cache_root)
    timings["base_training"] = time.perf_counter() - t
    embedder_path = out / "embedder.safetensors"
    embedder.to("cpu").save(embedder_path)
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
        report = out / "skipped.csv"
        buf = io.StringIO()
        csv.writer(buf).writerows([("path", "reason"), *result.skipped])
        atomic_write_text(report, buf.getvalue())
        _log(f"skipped {len(result.skipped)} unreadable file(s); see {report}", config.progress)
    timings["embedding"] = time.perf_counter() - t
    _log(f"embeddings: {len(needed)} clips, {result.computed} computed, "
         f"{len(needed) - result.computed} from the cache", config.progress)
    return Prepared(
        dataset=dataset, scenario=scenario, embedder=embedder, embedder_path=embedder_path, training=training,
        X=result.embeddings, row_of={needed[k]: r for r, k in enumerate(result.kept)}, skipped=result.skipped,
        computed=result.computed, timings=timings, progress=config.progress,
    )


def run(config: RunConfig) -> dict:
    """Run the whole job and write results.json, a plot and the encoder checkpoint under config.out."""
    t_start = time.perf_counter()
    out = Path(config.out)
    prep = prepare(config)
    timings = prep.timings
    dataset, scenario, embedder, X, row_of = prep.dataset, prep.scenario, prep.embedder, prep.X, prep.row_of

    matrices: dict[str, AccuracyMatrix] = {}
    online: dict[str, dict] = {}
    fit_seconds: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}
    learners: dict[str, IncrementalLearner] = {}
    for name in config.learners:
        learner = build_learner(config, name, module_bytes(embedder.encoder))
        t = time.perf_counter()
        matrices[name], fit_seconds[name], online[name] = evaluate(
            config, learner, scenario, prep.inputs_for(learner), row_of)
        timings[f"learner:{name}"] = time.perf_counter() - t
        nbytes[name] = prep.total_bytes(learner)
        learners[name] = learner
    if config.joint_bound and config.online_batch is None:
        params = config.learner_params.get("analytic", {})
        t = time.perf_counter()
        matrices[JOINT], fit_seconds[JOINT] = evaluate_joint(scenario, X, row_of, params)
        timings[f"learner:{JOINT}"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    results = {
        "config": _jsonable(asdict(config)),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
        "dataset": {"name": dataset.name, "root": str(dataset.root), "clips": len(dataset),
                    "classes": dataset.num_classes},
        "scenario": scenario.to_dict(),
        "encoder": encoder_summary(prep),
        "embeddings": {"clips": len(row_of) + len(prep.skipped), "computed": prep.computed,
                       "dim": embedder.embed_dim, "skipped": [{"path": p, "reason": r} for p, r in prep.skipped]},
        "learners": {
            name: {"accuracy_matrix": m.to_dict(), "matrix": _nan_to_none(m.matrix),
                   "seen_accuracy": m.seen_accuracy().tolist(), "metrics": _nan_to_none(m.summary()),
                   "fit_seconds": fit_seconds[name], "nbytes": nbytes.get(name), **online.get(name, {})}
            for name, m in matrices.items()
        },
        "timings": timings,
    }
    atomic_write_text(out / "config.yaml", yaml.safe_dump(results["config"], sort_keys=False))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    from earmark.plots import plot_sessions

    plot_sessions(results, out / "accuracy.png")
    for name, learner in learners.items():
        learner_path = out / f"learner-{name}.safetensors"
        from earmark.checkpoint import save_tensors

        save_tensors(learner_path, learner.state_dict(),
                     {"kind": "learner", "name": name, "config": asdict(learner.config)})
    print(render_report(results))
    return results


def encoder_summary(prep: Prepared) -> dict:
    enc = prep.embedder.encoder
    return {"config": enc.config.to_dict(), "checkpoint": str(prep.embedder_path), "digest": prep.embedder.digest,
            "parameters": sum(p.numel() for p in enc.parameters()), "training": prep.training}


def _nan_to_none(value: object) -> object:
    """JSON has no NaN: undefined metrics (e.g. forgetting after one session) become null."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    return value


def _jsonable(obj: object) -> object:
    return json.loads(json.dumps(obj, default=str))


def render_report(results: dict) -> str:
    """The per-session table and the summary metrics, as printed by `earmark demo`."""
    names = list(results["learners"])
    scen = results["scenario"]
    sizes = np.cumsum([len(c) for c in scen["session_classes"]])
    rows = []
    for i, n_seen in enumerate(sizes):
        row = {"session": i, "classes": int(n_seen)}
        for name in names:
            row[name] = f"{100 * results['learners'][name]['seen_accuracy'][i]:.1f}"
        rows.append(row)
    lines = ["Accuracy (%) on all classes seen so far, after each session:",
             format_table(rows, ["session", "classes", *names]), ""]
    labels = {
        "average_incremental_accuracy": "AA", "last_accuracy": "last", "performance_drop": "PD",
        "forgetting": "forgetting", "backward_transfer": "BWT", "base_accuracy": "base",
        "novel_accuracy": "novel", "harmonic_mean": "HM",
    }
    summary = []
    for name in names:
        entry = results["learners"][name]
        row = {"learner": name}
        for key, label in labels.items():
            v = entry["metrics"].get(key)
            row[label] = "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"
        row["memory"] = _human_bytes(entry["nbytes"]) if entry.get("nbytes") is not None else "-"
        if "prequential_accuracy" in entry:
            row["prequential"] = f"{100 * entry['prequential_accuracy']:.1f}"
        row["fit s"] = f"{sum(entry['fit_seconds']):.2f}"
        summary.append(row)
    lines += [
        "Summary (%): AA = average incremental accuracy (session 0 included), last = final accuracy,",
        "PD = performance drop (first - last), forgetting = mean over earlier class groups of",
        "best earlier accuracy - final accuracy, BWT = backward transfer, HM = harmonic mean of base/novel.",
        format_table(summary, ["learner", *labels.values(), "memory", "fit s"]
                     + (["prequential"] if any("prequential" in r for r in summary) else [])),
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()),
    ]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


__all__ = ["RunConfig", "run", "prepare", "render_report"]
