"""UrbanSound8K layout: ``audio/fold1..10/*.wav`` and ``metadata/UrbanSound8K.csv``.

The ten official folds are kept as they are: slices of one Freesound recording (``fsID``) share a fold,
so reshuffling them would leak near-identical audio between train and test.
"""

from __future__ import annotations

from pathlib import Path

from earmark.data.base import DATASETS, DatasetLayoutError, read_csv_rows, require_files
from earmark.data.dataset import AudioDataset

US8K_COLUMNS = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]


@DATASETS.register("urbansound8k")
def load_urbansound8k(root: Path, check_files: bool = True) -> AudioDataset:
    """Read an UrbanSound8K folder; targets are the dataset's ``classID``, folds its official 1..10."""
    root = Path(root)
    csv_path = root / "metadata" / "UrbanSound8K.csv"
    rows = read_csv_rows(csv_path, US8K_COLUMNS)
    names: dict[int, str] = {}
    paths, targets, folds = [], [], []
    for line, row in enumerate(rows, start=2):
        try:
            target, fold = int(row["classID"]), int(row["fold"])
        except ValueError:
            raise DatasetLayoutError(f"{csv_path} line {line}: non-integer classID or fold") from None
        if names.setdefault(target, row["class"]) != row["class"]:
            raise DatasetLayoutError(
                f"{csv_path} line {line}: classID {target} is both {names[target]!r} and {row['class']!r}"
            )
        paths.append(root / "audio" / f"fold{fold}" / row["slice_file_name"])
        targets.append(target)
        folds.append(fold)
    n_classes = max(names) + 1
    if sorted(names) != list(range(n_classes)):
        raise DatasetLayoutError(f"{csv_path}: classID values are not 0..{n_classes - 1}")
    if check_files:
        require_files(paths, root)
    return AudioDataset(
        name="urbansound8k",
        root=root,
        paths=paths,
        targets=targets,
        class_names=[names[i] for i in range(n_classes)],
        folds=folds,
        meta={
            "layout": "urbansound8k",
            "split": "official 10-fold cross-validation (fold k = audio/fold<k>)",
            "fold_names": {k: f"fold{k}" for k in sorted(set(folds))},
        },
    )
