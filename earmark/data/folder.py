"""User data: one sub-folder per class (``folder``) or a CSV manifest of ``path,label`` (``manifest``).

Neither layout needs to define a split. When it does not, items are dealt into folds with
:func:`stratified_folds`: per class, the class's files (sorted by path) are shuffled by a generator
seeded from ``(seed, crc32(class name))`` and dealt round-robin into folds ``1..n_folds``, starting
at a seeded offset. So every class is spread evenly over the folds, fold sizes differ by at most one
per class, and a class's folds do not change when other classes are added or removed.
"""

from __future__ import annotations

import csv
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from earmark.data.base import DATASETS, DatasetLayoutError, DatasetWarning, require_files
from earmark.data.dataset import AudioDataset

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# Split names a manifest may use, and the fold id each one becomes; other names get ids 4, 5, ...
SPLIT_ALIASES = {
    "train": 1,
    "training": 1,
    "val": 2,
    "valid": 2,
    "validation": 2,
    "dev": 2,
    "test": 3,
    "testing": 3,
    "eval": 3,
    "evaluation": 3,
}


def class_index(names: Sequence[str]) -> list[str]:
    """Sorted unique class names; numerically when every name is an integer, so '10' follows '9'."""
    unique = set(names)
    if unique and all(n.strip().lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=lambda n: (int(n), n))
    return sorted(unique)


def stratified_folds(targets: np.ndarray, class_names: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Seeded per-class round-robin fold ids in ``1..n_folds`` (see the module docstring)."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    targets = np.asarray(targets, dtype=np.int64)
    folds = np.zeros(len(targets), dtype=np.int64)
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(targets == c)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        offset = int(rng.integers(n_folds))
        order = rng.permutation(len(idx))
        folds[idx[order]] = (np.arange(len(idx)) + offset) % n_folds + 1
    return folds


def _visible(rel: Path) -> bool:
    return not any(part.startswith(".") for part in rel.parts)


def _not_audio_file(p: Path) -> str | None:
    """Why an entry with an audio name is not a readable file, or None when it is one."""
    if p.is_symlink() and not p.exists():
        return "dangling symbolic link"
    if p.is_dir():
        return "a directory, not an audio file"
    if not p.is_file():
        return "not a regular file"
    return None


@DATASETS.register("folder")
def load_folder(
    root: Path,
    n_folds: int = 5,
    seed: int = 0,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
) -> AudioDataset:
    """Read ``root/<class name>/**/*.{wav,flac,ogg,mp3}``; class ids follow the sorted folder names
    (numerically when every name is an integer).

    Folders whose name starts with ``.`` or ``_`` are not classes (the Speech Commands convention for
    ``_background_noise_``); hidden files are skipped. Folds come from :func:`stratified_folds`.
    """
    root = Path(root)
    if root.is_file():
        raise DatasetLayoutError(f"{root}: is a file, not a folder (expected root/<class name>/<audio files>)")
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: folder not found")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))), key=lambda d: d.name
    )
    if not class_dirs:
        raise DatasetLayoutError(f"{root}: no class sub-folders (expected root/<class name>/<audio files>)")
    class_names = class_index([d.name for d in class_dirs])
    by_name = {d.name: d for d in class_dirs}
    paths: list[Path] = []
    targets: list[int] = []
    skipped: list[tuple[str, str]] = []
    for c, name in enumerate(class_names):
        d = by_name[name]
        files, passed = [], []
        for p in sorted(d.rglob("*"), key=lambda p: p.relative_to(d).as_posix()):
            if p.suffix.lower() not in exts or not _visible(p.relative_to(d)):
                continue
            reason = _not_audio_file(p)
            if reason is None:
                files.append(p)
            else:
                passed.append((str(p), reason))
        skipped.extend(passed)
        if not files:
            why = f"; passed over {passed[0][0]} ({passed[0][1]})" if passed else ""
            raise DatasetLayoutError(f"{d}: class folder has no audio files ({', '.join(sorted(exts))}){why}")
        paths.extend(files)
        targets.extend([c] * len(files))
    if skipped:
        shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"{root}: passed over {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} with audio "
                      f"names (listed in dataset.skipped): {shown}{more}", DatasetWarning, stacklevel=2)
    target_arr = np.asarray(targets, dtype=np.int64)
    return AudioDataset(
        skipped=skipped,
        name=root.name or "folder",
        root=root,
        paths=paths,
        targets=target_arr,
        class_names=class_names,
        folds=stratified_folds(target_arr, class_names, n_folds, seed),
        meta={
            "layout": "folder",
            "split": f"seeded stratified {n_folds}-fold (seed {seed}); no official split",
            "fold_names": {k: f"fold{k}" for k in range(1, n_folds + 1)},
        },
    )


def _read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a user CSV; tolerates a UTF-8 BOM and padded header names (spreadsheet exports)."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: manifest file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        rows = [dict(zip(header, (v.strip() for v in line), strict=False)) for line in reader if any(line)]
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DatasetLayoutError(f"{path}: missing column(s) {', '.join(missing)} (need path,label[,split][,fold])")
    if not rows:
        raise DatasetLayoutError(f"{path}: no rows")
    return header, rows


def _split_folds(csv_path: Path, splits: list[str]) -> tuple[list[int], dict[int, str]]:
    """Fold ids for split names: train 1, validation 2, test 3 (with aliases), others 4, 5, ..."""
    ids: dict[str, int] = {}
    extra = sorted({s for s in splits if s.lower() not in SPLIT_ALIASES})
    for s in sorted(set(splits)):
        ids[s] = SPLIT_ALIASES.get(s.lower()) or 4 + extra.index(s)
    names: dict[int, str] = {}
    for s, k in sorted(ids.items()):
        if k in names:
            raise DatasetLayoutError(f"{csv_path}: split names {names[k]!r} and {s!r} both mean fold {k}")
        names[k] = s
    return [ids[s] for s in splits], dict(sorted(names.items()))


@DATASETS.register("manifest")
def load_manifest(
    root: Path,
    filename: str = "manifest.csv",
    n_folds: int = 5,
    seed: int = 0,
    check_files: bool = True,
) -> AudioDataset:
    """Read a CSV with ``path,label`` and optional ``split`` and/or ``fold`` columns.

    ``root`` is the CSV itself or the folder holding ``filename``; relative paths are resolved against
    the CSV's folder. Folds: the ``fold`` column (integers) when present, else the ``split`` column
    (train=1, val/valid/validation/dev=2, test/eval=3, any other name 4, 5, ... in sorted order), else
    :func:`stratified_folds`. With both columns, each fold must belong to a single split, and
    ``meta['fold_names']`` maps fold -> split. Class ids follow the sorted labels (numeric if all are integers).
    """
    root = Path(root)
    csv_path = root if root.is_file() else root / filename
    header, rows = _read_manifest(csv_path)
    base = csv_path.parent
    paths: list[Path] = []
    labels: list[str] = []
    for line, row in enumerate(rows, start=2):
        p, label = row.get("path", ""), row.get("label", "")
        if not p or not label:
            raise DatasetLayoutError(f"{csv_path} line {line}: empty path or label")
        paths.append(Path(p) if Path(p).is_absolute() else base / p)
        labels.append(label)
    class_names = class_index(labels)
    ids = {n: i for i, n in enumerate(class_names)}
    targets = np.asarray([ids[n] for n in labels], dtype=np.int64)
    splits = [row.get("split", "") for row in rows] if "split" in header else None
    if splits is not None and not all(splits):
        raise DatasetLayoutError(f"{csv_path} line {2 + splits.index('')}: empty split")
    if "fold" in header:
        folds = []
        for line, row in enumerate(rows, start=2):
            try:
                folds.append(int(row.get("fold", "")))
            except ValueError:
                raise DatasetLayoutError(
                    f"{csv_path} line {line}: fold {row.get('fold')!r} is not an integer"
                ) from None
        fold_names: dict[int, str] = {k: f"fold{k}" for k in sorted(set(folds))}
        if splits is not None:
            seen: dict[int, str] = {}
            for line, (k, s) in enumerate(zip(folds, splits, strict=True), start=2):
                if seen.setdefault(k, s) != s:
                    raise DatasetLayoutError(f"{csv_path} line {line}: fold {k} holds both split {seen[k]!r} and {s!r}")
            fold_names = dict(sorted(seen.items()))
        split_desc = "fold column" + (" (fold -> split in fold_names)" if splits is not None else "")
    elif splits is not None:
        folds, fold_names = _split_folds(csv_path, splits)
        split_desc = "split column"
    else:
        folds = stratified_folds(targets, class_names, n_folds, seed).tolist()
        fold_names = {k: f"fold{k}" for k in range(1, n_folds + 1)}
        split_desc = f"seeded stratified {n_folds}-fold (seed {seed}); the manifest has no split or fold column"
    if check_files:
        require_files(paths, csv_path)
    return AudioDataset(
        name=csv_path.parent.name or csv_path.stem,
        root=base,
        paths=paths,
        targets=targets,
        class_names=class_names,
        folds=folds,
        meta={"layout": "manifest", "manifest": str(csv_path), "split": split_desc, "fold_names": fold_names},
    )
