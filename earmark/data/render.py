"""The built-in dataset: single General MIDI notes rendered from the SoundFont that ships with pretty_midi.

Nothing is downloaded: the demo and the tests render their own data in ESC-50 layout
(``audio/{fold}-{src_file}-{take}-{target}.wav`` plus ``meta/esc50.csv``), so the ESC-50 loader reads it.

Which classes: the candidates are the 128 GM programs and the GM drum keys 35-81. TimGM6mb is small
and many presets reuse the same samples, so each candidate renders a few probe notes, is described by
its long-term log spectrum and log energy envelope, and candidates are compared with a symmetric
nearest-probe distance in dB. The most redundant candidate is then removed repeatedly (of the closest
pair, the one closer to everything else). Pairs closer than ``duplicate_threshold_db`` are
near-duplicates; the survivors of that step are the distinct candidates, and elimination goes on until
``n_classes`` remain. The removal order does not depend on ``n_classes``, so smaller class sets are
subsets of larger ones.

Determinism: every clip draws from ``SeedSequence([seed, candidate index, clip index])``, so a clip does
not depend on rendering order, worker count, or which other classes were selected.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from earmark.data.gm import GMCandidate, gm_candidates

RENDERER_VERSION = 1
ESC50_HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
_SILENT_PEAK = 1e-4  # a rendered note quieter than this counts as silent
_DRUM_CHANNEL = 9


@dataclass(frozen=True)
class ProbeConfig:
    """How candidates are probed to find near-duplicate presets (part of the dataset's identity)."""

    sample_rate: int = 16000
    seconds: float = 1.0
    hold_seconds: float = 0.5
    velocity: int = 100
    pitch_fractions: tuple[float, ...] = (0.2, 0.5, 0.8)  # probe pitches, as positions in the pitch range
    n_fft: int = 512
    n_bands: int = 32
    band_edges_hz: tuple[float, float] = (60.0, 8000.0)
    floor_db: float = -60.0
    envelope_weight: float = 0.5  # the envelope's share next to the spectrum in the distance


@dataclass(frozen=True)
class RenderConfig:
    """Everything that decides the rendered dataset; ``workers`` only decides how fast."""

    n_classes: int = 100
    clips_per_class: int = 40
    n_folds: int = 5
    clip_seconds: float = 2.0
    sample_rate: int = 16000
    seed: int = 0
    augment_fraction: float = 0.5  # share of clips that get noise + room
    velocity: tuple[int, int] = (40, 127)
    note_seconds: tuple[float, float] = (0.15, 1.2)
    max_onset_fraction: float = 0.4  # onset drawn in [0, this * clip_seconds]
    peak_db: tuple[float, float] = (-30.0, -1.0)  # every clip's peak level (level changes, never clips)
    snr_db: tuple[float, float] = (15.0, 40.0)
    noise_exponent: tuple[float, float] = (0.0, 2.0)  # noise power ~ 1/f^x: 0 white, 1 pink, 2 brown
    rt60_seconds: tuple[float, float] = (0.15, 0.8)
    drr_db: tuple[float, float] = (-3.0, 10.0)  # direct-to-reverberant ratio of the synthetic room
    drum_detune_semitones: float = 0.3  # drums keep their key; only a slight tuning change
    duplicate_threshold_db: float = 1.5
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    soundfont: str | None = None  # None: TimGM6mb.sf2 inside the pretty_midi package
    workers: int = 2

    def validate(self) -> None:
        """Reject configs that cannot give equal, non-empty folds or that have inverted ranges."""
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {self.n_classes}")
        if self.n_folds < 1 or self.clips_per_class < self.n_folds or self.clips_per_class % self.n_folds:
            raise ValueError(
                f"clips_per_class ({self.clips_per_class}) must be a positive multiple "
                f"of n_folds ({self.n_folds})"
            )
        if self.clip_seconds <= 0 or self.sample_rate <= 0:
            raise ValueError("clip_seconds and sample_rate must be positive")
        if not 0.0 <= self.augment_fraction <= 1.0:
            raise ValueError(f"augment_fraction must be in [0, 1], got {self.augment_fraction}")
        for name in (
            "velocity",
            "note_seconds",
            "peak_db",
            "snr_db",
            "noise_exponent",
            "rt60_seconds",
            "drr_db",
        ):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} > high {hi}")
        if not 1 <= self.velocity[0] <= self.velocity[1] <= 127:
            raise ValueError(f"velocity must lie in 1..127, got {self.velocity}")
        if self.peak_db[1] > 0:
            raise ValueError(f"peak_db must be <= 0 dBFS, got {self.peak_db}")


def default_soundfont() -> Path:
    """The General MIDI SoundFont pretty_midi ships, so rendering needs nothing from outside."""
    import pretty_midi

    return Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"


def _soundfont_path(config: RenderConfig) -> Path:
    path = Path(config.soundfont) if config.soundfont else default_soundfont()
    if not path.is_file():
        raise FileNotFoundError(f"SoundFont not found: {path}")
    return path


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _identity(config: RenderConfig) -> dict:
    """What the dataset depends on, JSON-normalised (tuples become lists) so it compares with render.json."""
    ident = asdict(config)
    ident.pop("workers")
    sf_path = _soundfont_path(config)
    stat = sf_path.stat()
    ident["soundfont"] = {
        "name": sf_path.name,
        "sha256": _file_digest(str(sf_path), stat.st_size, stat.st_mtime_ns),
    }
    ident["renderer_version"] = RENDERER_VERSION
    return json.loads(json.dumps(ident, sort_keys=True))


def config_hash(config: RenderConfig) -> str:
    """Short stable hash of the dataset identity, used in the default folder name."""
    return hashlib.sha256(json.dumps(_identity(config), sort_keys=True).encode()).hexdigest()[:12]


def default_data_dir() -> Path:
    """$EARMARK_DATA if set, else ~/.cache/earmark.

    The default dataset lives in ``<that>/gm-default-<hash of config>`` (see ``default_dataset_root``).
    """
    env = os.environ.get("EARMARK_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "earmark"


def default_dataset_root(config: RenderConfig = RenderConfig()) -> Path:
    """Where the dataset for ``config`` lives by default: ``default_data_dir()/gm-default-<hash>``."""
    return default_data_dir() / f"gm-default-{config_hash(config)}"


# ---------------------------------------------------------------- synthesis


@functools.lru_cache(maxsize=4)
def _base_soundfont(soundfont: str):
    """The parsed SoundFont, once per process; notes are played on cheap clones of it."""
    from tinysoundfont import _tinysoundfont

    return _tinysoundfont.SoundFont(soundfont)


def _play(
    soundfont: str,
    sample_rate: int,
    cand: GMCandidate,
    key: int,
    velocity: int,
    hold: int,
    total: int,
    tuning: float = 0.0,
) -> np.ndarray:
    """Mono float32 of one note held ``hold`` samples, released, and rendered to ``total`` samples.

    Uses tinysoundfont's binding directly rather than ``tinysoundfont.Synth``: TinySoundFont reuses voice
    memory, so a note rendered after other presets differs slightly from the same note on a fresh synth,
    and neither ``sounds_off`` nor ``reset`` fixes that. A clone of the loaded font (microseconds, samples
    shared) has fresh voices, which makes every note independent of what was rendered before.
    """
    from tinysoundfont import _tinysoundfont

    font = _tinysoundfont.SoundFont(_base_soundfont(soundfont))
    font.set_output(_tinysoundfont.OutputMode.StereoInterleaved, sample_rate, 0.0)
    chan = _DRUM_CHANNEL if cand.is_drum else 0
    font.channel_set_bank(chan, 128 if cand.is_drum else 0)
    font.channel_set_preset_number(chan, 0 if cand.is_drum else cand.program, cand.is_drum)
    font.channel_set_tuning(chan, tuning)
    hold = int(min(max(hold, 1), total))
    stereo = np.zeros((total, 2), dtype=np.float32)
    font.channel_note_on(chan, key, velocity / 127.0)
    font.render(memoryview(stereo[:hold]).cast("B"))
    font.channel_note_off(chan, key)
    if total > hold:
        font.render(memoryview(stereo[hold:]).cast("B"))
    return stereo.mean(axis=1, dtype=np.float64).astype(np.float32)


# ---------------------------------------------------------------- class selection


def _probe_feature(x: np.ndarray, probe: ProbeConfig) -> np.ndarray:
    """Level-free long-term log spectrum in log-spaced bands, plus the weighted log energy envelope."""
    n_fft, hop = probe.n_fft, probe.n_fft // 2
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x.astype(np.float64), (0, n_fft)), n_fft)[::hop]
    frames = frames[: max(1, len(x) // hop)]
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2
    freqs = np.fft.rfftfreq(n_fft, 1.0 / probe.sample_rate)
    edges = np.geomspace(*probe.band_edges_hz, probe.n_bands + 1)
    band = np.digitize(freqs, edges) - 1
    fb = np.zeros((probe.n_bands, len(freqs)))
    for j in range(probe.n_bands):
        fb[j, band == j] = 1.0
    fb /= np.maximum(fb.sum(axis=1, keepdims=True), 1.0)
    spec = 10 * np.log10(power.sum(axis=0) @ fb.T + 1e-20)
    env = 10 * np.log10(power.sum(axis=1) + 1e-20)
    spec = np.maximum(spec - spec.max(), probe.floor_db)
    env = np.maximum(env - env.max(), probe.floor_db)
    return np.concatenate([spec, probe.envelope_weight * env])


def _probe_pitches(cand: GMCandidate, probe: ProbeConfig) -> list[int]:
    if cand.is_drum:
        return [cand.drum_key]
    return sorted({round(cand.low + f * (cand.high - cand.low)) for f in probe.pitch_fractions})


def _candidate_distances(soundfont: str, probe: ProbeConfig) -> tuple[list[GMCandidate], np.ndarray]:
    """Audible candidates and their pairwise distances (mean dB gap between nearest probes, symmetrised)."""
    sr = probe.sample_rate
    total, hold = round(probe.seconds * sr), round(probe.hold_seconds * sr)
    cands, feats = [], []
    for cand in gm_candidates():
        try:
            pitches = _probe_pitches(cand, probe)
            notes = [_play(soundfont, sr, cand, k, probe.velocity, hold, total) for k in pitches]
        except RuntimeError:  # preset missing from this SoundFont
            continue
        f = [_probe_feature(x, probe) for x in notes if np.abs(x).max() > _SILENT_PEAK]
        if f:
            cands.append(cand)
            feats.append(np.stack(f))
    n = len(cands)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d = np.abs(feats[i][:, None, :] - feats[j][None, :, :]).mean(axis=2)
            dist[i, j] = dist[j, i] = 0.5 * (d.min(axis=1).mean() + d.min(axis=0).mean())
    # Rounded so that last-bit differences between platforms do not reorder near-ties.
    return cands, np.round(dist, 6)


@functools.lru_cache(maxsize=4)
def _elimination(soundfont: str, probe: ProbeConfig) -> tuple[tuple[GMCandidate, ...], tuple[float, ...]]:
    """All audible candidates, most redundant first, with the closest-pair distance when each was removed.

    The last candidate never gets removed and has distance inf. Distances are non-decreasing, since
    removing a candidate cannot bring the remaining ones closer.
    """
    cands, dist = _candidate_distances(soundfont, probe)
    n = len(cands)
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    alive = np.ones(n, dtype=bool)
    order, gaps = [], []
    for _ in range(n - 1):
        sub = np.where(alive[:, None] & alive[None, :], d, np.inf)
        a, b = np.unravel_index(int(np.argmin(sub)), sub.shape)  # first minimum: a < b, lowest indices
        gap = float(sub[a, b])
        others_a = np.delete(sub[a], [a, b]).min(initial=np.inf)
        others_b = np.delete(sub[b], [a, b]).min(initial=np.inf)
        drop = a if others_a < others_b else b  # the one nearer the rest; ties drop the later candidate
        alive[drop] = False
        order.append(cands[drop])
        gaps.append(gap)
    order.append(cands[int(np.flatnonzero(alive)[0])])
    gaps.append(float("inf"))
    return tuple(order), tuple(gaps)


def distinct_candidates(config: RenderConfig = RenderConfig()) -> list[GMCandidate]:
    """Candidates left after dropping near-duplicates (closest pair under ``duplicate_threshold_db``)."""
    order, gaps = _elimination(str(_soundfont_path(config)), config.probe)
    n_dup = sum(g < config.duplicate_threshold_db for g in gaps)
    return sorted(order[n_dup:], key=lambda c: c.index)


def select_classes(config: RenderConfig = RenderConfig()) -> list[GMCandidate]:
    """The ``n_classes`` most distinct candidates, in candidate order (programs, then drums)."""
    distinct = distinct_candidates(config)
    if config.n_classes > len(distinct):
        raise ValueError(
            f"n_classes={config.n_classes} but the SoundFont has only {len(distinct)} distinct candidate "
            f"sounds (near-duplicates closer than {config.duplicate_threshold_db} dB removed)"
        )
    order, _ = _elimination(str(_soundfont_path(config)), config.probe)
    keep = {c.index for c in order[len(order) - config.n_classes :]}
    return [c for c in distinct if c.index in keep]


# ---------------------------------------------------------------- one clip


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-power noise with power spectrum ~ 1/f^exponent, shaped directly in the frequency domain."""
    n_bins = n // 2 + 1
    spec = rng.standard_normal(n_bins) + 1j * rng.standard_normal(n_bins)
    f = np.arange(n_bins, dtype=np.float64)
    f[0] = 1.0
    spec *= f ** (-exponent / 2.0)
    spec[0] = 0.0  # no DC
    noise = np.fft.irfft(spec, n)
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


def _room(rng: np.random.Generator, x: np.ndarray, sr: int, rt60: float, drr_db: float) -> np.ndarray:
    """Convolve with a unit direct path plus an exponentially decaying noise tail (60 dB down at rt60)."""
    n_ir = max(2, round(rt60 * sr))
    t = np.arange(n_ir) / sr
    tail = rng.standard_normal(n_ir) * np.exp(-6.907755 * t / rt60)
    tail[0] = 0.0
    tail *= 10 ** (-drr_db / 20) / max(float(np.sqrt(np.sum(tail**2))), 1e-12)
    ir = tail.copy()
    ir[0] = 1.0  # direct path
    n_fft = 1 << int(np.ceil(np.log2(len(x) + n_ir - 1)))
    y = np.fft.irfft(np.fft.rfft(x, n_fft) * np.fft.rfft(ir, n_fft), n_fft)
    return y[: len(x)]


def render_clip(cand: GMCandidate, clip: int, config: RenderConfig) -> np.ndarray:
    """One clip as float32 in [-1, 1]; depends only on (seed, candidate, clip index) and the config."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, cand.index, clip]))
    sr = config.sample_rate
    n = round(config.clip_seconds * sr)
    soundfont = str(_soundfont_path(config))
    dry = None
    for _ in range(8):  # a note can fall outside a preset's key map: draw again
        key = cand.drum_key if cand.is_drum else int(rng.integers(cand.low, cand.high + 1))
        velocity = int(rng.integers(config.velocity[0], config.velocity[1] + 1))
        hold = round(rng.uniform(*config.note_seconds) * sr)
        onset = round(rng.uniform(0.0, config.max_onset_fraction) * n)
        tuning = rng.uniform(-1, 1) * config.drum_detune_semitones if cand.is_drum else 0.0
        note = _play(soundfont, sr, cand, key, velocity, hold, n - onset, tuning)
        if np.abs(note).max() > _SILENT_PEAK:
            dry = np.concatenate([np.zeros(onset, np.float32), note])
            break
    if dry is None:
        raise RuntimeError(f"{cand.name}: every attempt rendered silence (clip {clip})")
    x = dry.astype(np.float64)
    x /= np.abs(x).max()
    if rng.random() < config.augment_fraction:
        x = _room(rng, x, sr, rng.uniform(*config.rt60_seconds), rng.uniform(*config.drr_db))
        x /= np.abs(x).max()
        snr = rng.uniform(*config.snr_db)
        noise = _coloured_noise(rng, n, rng.uniform(*config.noise_exponent))
        x = x + noise * np.sqrt(np.mean(x**2) / 10 ** (snr / 10))
    x *= 10 ** (rng.uniform(*config.peak_db) / 20) / np.abs(x).max()
    return x.astype(np.float32)


# ---------------------------------------------------------------- dataset


def _clip_names(target: int, clip: int, config: RenderConfig) -> tuple[str, int, str]:
    fold = clip % config.n_folds + 1
    src_file = f"{target:03d}{clip:04d}"
    return f"{fold}-{src_file}-A-{target}.wav", fold, src_file


def _render_class(cand: GMCandidate, target: int, config: RenderConfig, audio_dir: str) -> list[list[str]]:
    """Render and write all clips of one class; returns its CSV rows."""
    rows = []
    for clip in range(config.clips_per_class):
        filename, fold, src_file = _clip_names(target, clip, config)
        sf.write(
            Path(audio_dir) / filename, render_clip(cand, clip, config), config.sample_rate, subtype="PCM_16"
        )
        rows.append([filename, str(fold), str(target), cand.name, "False", src_file, "A"])
    return rows


def _is_complete(root: Path, ident: dict) -> bool:
    """True when render.json matches and every clip listed in the CSV is on disk."""
    try:
        meta = json.loads((root / "meta" / "render.json").read_text())
        if meta.get("config") != ident:
            return False
        with open(root / "meta" / "esc50.csv", newline="") as fh:
            reader = csv.reader(fh)
            if next(reader) != ESC50_HEADER:
                return False
            names = [row[0] for row in reader]
    except (OSError, ValueError, StopIteration, IndexError):
        return False
    return len(names) == meta.get("n_clips") and all((root / "audio" / name).is_file() for name in names)


def _replaceable(root: Path) -> bool:
    """Only an empty folder or an earlier render may be replaced; never someone else's files."""
    if not root.exists():
        return True
    if not root.is_dir():
        return False
    entries = {p.name for p in root.iterdir()}
    return not entries or (entries <= {"audio", "meta"} and (root / "meta" / "render.json").is_file())


def _remove_stale_partials(root: Path) -> None:
    """Delete half-written renders next to root left by processes of this host that no longer exist."""
    host = socket.gethostname()
    for path in root.parent.glob(f".{glob.escape(root.name)}.partial-*"):
        owner, _, pid = path.name.rsplit("-", 2)[0].rpartition("-")
        if owner.endswith(f".partial-{host}") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, root: Path) -> None:
    """Swap the finished render into place; an old render is moved aside first, then deleted."""
    trash = None
    if root.exists():
        trash = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(root, trash)
    os.replace(tmp, root)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def render_default_dataset(
    root: str | Path, config: RenderConfig = RenderConfig(), progress: bool = True
) -> Path:
    """Render (or reuse) the dataset at root; returns root."""
    root = Path(root)
    config.validate()
    ident = _identity(config)
    if _is_complete(root, ident):
        return root
    if not _replaceable(root):
        raise FileExistsError(f"{root} exists and is not an earmark render; refusing to overwrite it")
    classes = select_classes(config)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    tmp = root.with_name(f".{root.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        (tmp / "audio").mkdir()
        (tmp / "meta").mkdir()
        rows_by_target = _render_all(classes, config, tmp / "audio", progress)
        rows = [row for target in range(len(classes)) for row in rows_by_target[target]]
        with open(tmp / "meta" / "esc50.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(ESC50_HEADER)
            writer.writerows(rows)
        meta = {
            "config": ident,
            "classes": [c.name for c in classes],
            "n_clips": len(rows),
            "n_distinct_candidates": len(distinct_candidates(config)),
        }
        # Written last: a folder without it is never mistaken for a finished render.
        (tmp / "meta" / "render.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            _install(tmp, root)
        except OSError:
            if _is_complete(root, ident):  # another process finished the same render first
                return root
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _render_all(
    classes: list[GMCandidate], config: RenderConfig, audio_dir: Path, progress: bool
) -> dict[int, list[list[str]]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(classes), desc="rendering GM dataset", unit="class", disable=not progress)
    out: dict[int, list[list[str]]] = {}
    workers = max(1, min(config.workers, len(classes)))
    try:
        if workers == 1:
            for target, cand in enumerate(classes):
                out[target] = _render_class(cand, target, config, str(audio_dir))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {
                    pool.submit(_render_class, cand, target, config, str(audio_dir)): target
                    for target, cand in enumerate(classes)
                }
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()
    return out
