"""The built-in GM dataset renderer: layout, audio sanity, balance, determinism, caching."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from earmark.data.render import (
    ESC50_HEADER,
    RenderConfig,
    default_data_dir,
    default_dataset_root,
    distinct_candidates,
    render_default_dataset,
    select_classes,
)

SMALL = RenderConfig(n_classes=6, clips_per_class=10, clip_seconds=1.0, workers=1)


def _rows(root: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(root / "meta" / "esc50.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_default_dataset(tmp_path_factory.mktemp("gm") / "small", SMALL, progress=False)


def test_csv_layout(small_root: Path) -> None:
    header, rows = _rows(small_root)
    assert header == ESC50_HEADER
    assert len(rows) == SMALL.n_classes * SMALL.clips_per_class
    for row in rows:
        fold, src, take, target = Path(row["filename"]).stem.split("-")
        assert (fold, src, take, target) == (row["fold"], row["src_file"], row["take"], row["target"])
        assert row["esc10"] == "False" and row["take"] == "A"
    assert {int(r["target"]) for r in rows} == set(range(SMALL.n_classes))
    assert len({r["src_file"] for r in rows}) == len(rows)


def test_esc50_loader_reads_it(small_root: Path) -> None:
    from earmark.data.esc50 import load_esc50

    ds = load_esc50(small_root)
    assert len(ds) == SMALL.n_classes * SMALL.clips_per_class
    assert ds.class_names == [c.name for c in select_classes(SMALL)]
    assert sorted(set(ds.folds.tolist())) == list(range(1, SMALL.n_folds + 1))


def test_audio_files_decode(small_root: Path) -> None:
    _, rows = _rows(small_root)
    for row in rows:
        path = small_root / "audio" / row["filename"]
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        x, _ = sf.read(path, dtype="float32")
        assert x.shape == (round(SMALL.clip_seconds * 16000),)
        assert np.isfinite(x).all()
        assert np.abs(x).max() > 0.01, f"{row['filename']} is (nearly) silent"
        assert np.abs(x).max() < 1.0


def test_folds_balanced_per_class(small_root: Path) -> None:
    _, rows = _rows(small_root)
    counts = Counter((r["target"], r["fold"]) for r in rows)
    per_fold = SMALL.clips_per_class // SMALL.n_folds
    assert len(counts) == SMALL.n_classes * SMALL.n_folds
    assert set(counts.values()) == {per_fold}
    assert {int(r["fold"]) for r in rows} == set(range(1, SMALL.n_folds + 1))


def test_class_names_unique_slugs(small_root: Path) -> None:
    _, rows = _rows(small_root)
    by_target = {int(r["target"]): r["category"] for r in rows}
    names = [by_target[t] for t in range(SMALL.n_classes)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", n) for n in names)
    assert names == [c.name for c in select_classes(SMALL)]
    # all 100 default classes are unique slugs too, and the small set is a subset of them
    default_names = [c.name for c in select_classes(RenderConfig())]
    assert len(default_names) == 100 == len(set(default_names))
    assert all(re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", n) for n in default_names)
    assert set(names) <= set(default_names)


def test_near_duplicates_dropped() -> None:
    distinct = {c.name for c in distinct_candidates(RenderConfig())}
    assert 100 <= len(distinct) < 128 + 47
    # TimGM6mb plays both GM bass drums from the same sample: at most one of them can be distinct.
    assert not {"drum_acoustic_bass_drum", "drum_bass_drum_1"} <= distinct


def test_too_many_classes_raises(tmp_path: Path) -> None:
    n_distinct = len(distinct_candidates(RenderConfig()))
    with pytest.raises(ValueError, match="distinct"):
        render_default_dataset(tmp_path / "big", RenderConfig(n_classes=n_distinct + 1), progress=False)
    assert not (tmp_path / "big").exists()


def test_bad_fold_split_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        render_default_dataset(tmp_path / "x", RenderConfig(clips_per_class=7), progress=False)


def test_deterministic_and_seed_dependent(small_root: Path, tmp_path: Path) -> None:
    # same seed, other folder, two worker threads instead of one: byte-identical
    again = render_default_dataset(tmp_path / "again", replace(SMALL, workers=2), False)
    assert _snapshot(again) == _snapshot(small_root)
    other = render_default_dataset(tmp_path / "other", replace(SMALL, seed=1), False)
    a, b = _snapshot(small_root), _snapshot(other)
    assert a.keys() == b.keys()
    differing = [k for k in a if k.startswith("audio") and a[k] != b[k]]
    assert len(differing) == len([k for k in a if k.startswith("audio")])


def test_cache_reused_and_invalidated(tmp_path: Path) -> None:
    cfg = RenderConfig(n_classes=2, clips_per_class=5, clip_seconds=0.5, workers=1)
    root = render_default_dataset(tmp_path / "c", cfg, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert render_default_dataset(root, cfg, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes

    # a missing clip makes the render incomplete: it is rendered again, with the same bytes
    victim = next(iter(sorted((root / "audio").iterdir())))
    original = victim.read_bytes()
    victim.unlink()
    render_default_dataset(root, cfg, progress=False)
    assert victim.read_bytes() == original

    # another config at the same root replaces the render; nothing half-written is left next to it
    cfg2 = replace(cfg, clips_per_class=10)
    render_default_dataset(root, cfg2, progress=False)
    assert len(_rows(root)[1]) == 2 * 10
    assert json.loads((root / "meta" / "render.json").read_text())["n_clips"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = RenderConfig(n_classes=2, clips_per_class=5, clip_seconds=0.5, workers=1)
    with pytest.raises(FileExistsError):
        render_default_dataset(tmp_path / "mine", cfg, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_default_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EARMARK_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    root = default_dataset_root()
    assert root.parent == tmp_path and root.name.startswith("gm-default-")
    assert default_dataset_root(RenderConfig(seed=1)) != root
    assert default_dataset_root(RenderConfig(workers=1)) == root  # workers do not change the data
    monkeypatch.delenv("EARMARK_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "earmark"
