"""NSynth layout: ``nsynth-{train,valid,test}/examples.json`` and ``nsynth-<split>/audio/<note_str>.wav``.

``examples.json`` maps each ``note_str`` to its annotations (``instrument_str``, ``instrument``,
``instrument_family_str``, ``instrument_source_str``, ``pitch``, ``velocity``, ...). The official splits
become folds 1 = train, 2 = valid, 3 = test. NSynth puts no instrument of the train split in valid or
test, so with ``label='instrument_str'`` the official folds test on unseen classes: use them for
instrument family / source labels, and the ``nsynth100`` split for few-shot class-incremental work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from earmark.data.base import DATASETS, DatasetLayoutError, require_files
from earmark.data.dataset import AudioDataset

NSYNTH_SPLITS = {"train": 1, "valid": 2, "test": 3}
NSYNTH_LABELS = ("instrument_str", "instrument_family_str", "instrument_source_str")


def _read_examples(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: metadata file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise DatasetLayoutError(f"{path}: expected a non-empty object keyed by note_str")
    return data


@DATASETS.register("nsynth")
def load_nsynth(
    root: Path,
    label: str = "instrument_str",
    splits: Sequence[str] = ("train", "valid", "test"),
    check_files: bool = True,
) -> AudioDataset:
    """Read an NSynth folder (json/wav release); class ids follow the sorted label names of the loaded splits.

    ``meta['source_ids']`` keeps NSynth's own integer id for each class name (e.g. ``instrument``).
    """
    root = Path(root)
    if label not in NSYNTH_LABELS:
        raise ValueError(f"label must be one of {', '.join(NSYNTH_LABELS)}, got {label!r}")
    bad = [s for s in splits if s not in NSYNTH_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {', '.join(NSYNTH_SPLITS)}, got {list(splits)}")
    id_field = label.removesuffix("_str")
    items: list[tuple[Path, str, int]] = []
    source_ids: dict[str, int] = {}
    for split in splits:
        split_dir = root / f"nsynth-{split}"
        json_path = split_dir / "examples.json"
        for key, ann in _read_examples(json_path).items():
            if not isinstance(ann, dict) or label not in ann:
                raise DatasetLayoutError(f"{json_path}: example {key!r} has no field {label!r}")
            name = str(ann[label])
            if id_field in ann and source_ids.setdefault(name, int(ann[id_field])) != int(ann[id_field]):
                raise DatasetLayoutError(
                    f"{json_path}: {label} {name!r} has {id_field} {source_ids[name]} and {ann[id_field]}"
                )
            items.append((split_dir / "audio" / f"{ann.get('note_str', key)}.wav", name, NSYNTH_SPLITS[split]))
    class_names = sorted({name for _, name, _ in items})
    ids = {n: i for i, n in enumerate(class_names)}
    paths = [p for p, _, _ in items]
    if check_files:
        require_files(paths, root)
    return AudioDataset(
        name="nsynth",
        root=root,
        paths=paths,
        targets=[ids[n] for _, n, _ in items],
        class_names=class_names,
        folds=[f for _, _, f in items],
        meta={
            "layout": "nsynth",
            "label": label,
            "split": "official nsynth-train / nsynth-valid / nsynth-test",
            "fold_names": {f: s for s, f in NSYNTH_SPLITS.items() if s in splits},
            "source_ids": source_ids,
        },
    )
