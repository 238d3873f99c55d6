"""Speech Commands (v2) layout: ``<word>/<speaker>_nohash_<n>.wav`` plus the two official list files.

The official split is kept in ``folds``: 1 = train (every file in neither list), 2 = validation
(``validation_list.txt``), 3 = test (``testing_list.txt``). The lists hold paths relative to root
such as ``right/a69b9b3e_nohash_0.wav``, chosen by a hash of the speaker so no speaker crosses splits.
``dataset.split(3)`` therefore trains on train + validation and tests on the official test list.
Folders starting with ``_`` (``_background_noise_``) hold no words and are excluded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from earmark.data.base import DATASETS, DatasetLayoutError
from earmark.data.dataset import AudioDataset

SPEECH_COMMANDS_FOLDS = {1: "train", 2: "validation", 3: "test"}


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetLayoutError(
            f"{path}: split list not found (Speech Commands ships validation_list.txt and testing_list.txt in its root)"
        )
    return [ln.strip().replace("\\", "/") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


@DATASETS.register("speech_commands")
def load_speech_commands(root: Path, words: Sequence[str] | None = None, check_files: bool = True) -> AudioDataset:
    """Read a Speech Commands folder; class ids follow the sorted word folders (or ``words``, if given).

    ``words`` keeps a subset (e.g. the ten keywords); list entries for other words are ignored.
    With ``check_files``, list entries of kept words must exist on disk.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: folder not found")
    available = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
    if not available:
        raise DatasetLayoutError(f"{root}: no word folders (expected root/<word>/<speaker>_nohash_<n>.wav)")
    if words is None:
        class_names = available
    else:
        unknown = [w for w in words if w not in available]
        if unknown:
            raise DatasetLayoutError(f"{root}: no folder for word(s) {', '.join(unknown)}")
        class_names = sorted(set(words))
    split_of: dict[str, int] = {}
    for fold, list_name in ((2, "validation_list.txt"), (3, "testing_list.txt")):
        for rel in _read_list(root / list_name):
            if split_of.setdefault(rel, fold) != fold:
                raise DatasetLayoutError(f"{root}: {rel} is in both validation_list.txt and testing_list.txt")
    ids = {w: i for i, w in enumerate(class_names)}
    paths, targets, folds = [], [], []
    found: set[str] = set()
    for word in class_names:
        for p in sorted((root / word).glob("*.wav")):
            rel = f"{word}/{p.name}"
            found.add(rel)
            paths.append(p)
            targets.append(ids[word])
            folds.append(split_of.get(rel, 1))
    if check_files:
        listed_missing = sorted(r for r in split_of if r.split("/", 1)[0] in ids and r not in found)
        if listed_missing:
            raise DatasetLayoutError(
                f"{root}: {len(listed_missing)} file(s) in the split lists are missing, e.g. {listed_missing[0]}"
            )
    if not paths:
        raise DatasetLayoutError(f"{root}: no .wav files in the word folders")
    return AudioDataset(
        name="speech_commands",
        root=root,
        paths=paths,
        targets=targets,
        class_names=class_names,
        folds=folds,
        meta={
            "layout": "speech_commands",
            "split": "official: validation_list.txt, testing_list.txt, train = the rest",
            "fold_names": dict(SPEECH_COMMANDS_FOLDS),
            "excluded": sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("_")),
        },
    )
