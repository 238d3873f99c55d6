"""ESC-50 layout: ``audio/*.wav`` and ``meta/esc50.csv``; also the layout of earmark's own dataset."""

from __future__ import annotations

from pathlib import Path

from earmark.data.base import DATASETS, DatasetLayoutError, read_csv_rows, require_files
from earmark.data.dataset import AudioDataset

ESC50_COLUMNS = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


@DATASETS.register("esc50")
def load_esc50(root: Path, check_files: bool = True) -> AudioDataset:
    """Read an ESC-50 style folder; keeps the dataset's own folds (source clips stay together)."""
    root = Path(root)
    rows = read_csv_rows(root / "meta" / "esc50.csv", ESC50_COLUMNS)
    names: dict[int, str] = {}
    paths, targets, folds = [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            target, fold = int(row["target"]), int(row["fold"])
        except ValueError:
            raise DatasetLayoutError(f"{root / 'meta' / 'esc50.csv'} line {line}: non-integer target or fold") from None
        if names.setdefault(target, row["category"]) != row["category"]:
            raise DatasetLayoutError(
                f"{root / 'meta' / 'esc50.csv'} line {line}: target {target} is both "
                f"{names[target]!r} and {row['category']!r}"
            )
        paths.append(root / "audio" / row["filename"])
        targets.append(target)
        folds.append(fold)
    n_classes = max(names) + 1
    if sorted(names) != list(range(n_classes)):
        raise DatasetLayoutError(f"{root / 'meta' / 'esc50.csv'}: targets are not 0..{n_classes - 1}")
    if check_files:
        require_files(paths, root)
    return AudioDataset(
        name=root.name or "esc50",
        root=root,
        paths=paths,
        targets=targets,
        class_names=[names[i] for i in range(n_classes)],
        folds=folds,
        meta={"layout": "esc50"},
    )
