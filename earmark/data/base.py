"""The dataset registry: each loader reads a local copy and returns an :class:`AudioDataset`."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from earmark.data.dataset import AudioDataset
from earmark.registry import Registry

DatasetLoader = Callable[..., AudioDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


class DatasetLayoutError(ValueError):
    """A dataset folder does not have the layout its loader expects."""


class DatasetWarning(UserWarning):
    """A loader passed over something in the dataset folder (the message says what and why)."""


def read_csv_rows(path: Path, required: list[str]) -> list[dict[str, str]]:
    """Read a metadata CSV and check that it has the required columns."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: metadata file not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetLayoutError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise DatasetLayoutError(f"{path}: no rows")
    return rows


def require_files(paths: Sequence[Path], where: Path) -> None:
    """Fail early, naming one example, when listed audio files are not on disk (not at first decode)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetLayoutError(f"{where}: {len(missing)} audio file(s) listed but missing, e.g. {missing[0]}")


def load_dataset(name: str, root: str | Path, **kwargs) -> AudioDataset:
    """Load a registered dataset from a local folder (the ``manifest`` loader also takes the CSV itself)."""
    loader = DATASETS.get(name)
    root = Path(root)
    if name != "manifest" and root.is_file():
        hint = "; a CSV of path,label is read with --dataset manifest" if root.suffix.lower() == ".csv" else ""
        raise DatasetLayoutError(f"{root}: is a file, not a folder (the {name!r} loader reads a dataset folder{hint})")
    return loader(root, **kwargs)
