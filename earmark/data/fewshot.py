"""The few-shot class-incremental audio benchmarks, read from the split files their authors published.

Nothing is embedded here: each loader needs the user's local copy of the published split files, and
says which file is missing or malformed. Layouts (from the public FCAC_datasets repository of Xie et al.
and the LS-100 preparation script that ships with the published CSVs):

- NSynth-100 (``nsynth100``): ``nsynth-100-fs-meta/nsynth-100-fs_{train,val,test}.csv`` with columns
  ``filename,instrument,instrument_family,instrument_source,audio_source`` and
  ``nsynth-100-fs_vocab.json`` (``{instrument_str: label}``, labels 0..99). Audio is the NSynth release:
  ``<root>/<audio_source>/audio/<filename>.wav`` (``audio_source`` is e.g. ``nsynth-train``).
  Labels 0..54 are the base classes, 55..99 novel.
- FSC-89 (``fsc89``): ``FSC-89-meta/<setup>/Fsc89-<setup>-fsci_{train,val,test}.csv`` with columns
  ``data_folder,FSD_MIX_SED_filename,start_time,label`` (labels 0..88). Each row is a 1 s clip cut from a
  FSD-MIX-SED soundscape, stored by the FSD-MIX-CLIPS script as
  ``<root>/audio/<data_folder>/<soundscape stem>_<int(start_time * 44100)>.wav``. Labels 0..58 base, 59..88 novel.
- LS-100 (``ls100``): ``librispeech_fscil_{train,val,test}.csv`` with columns ``filename,speaker_id,label``
  (labels 0..99, one per LibriSpeech speaker); audio is a folder of 2 s segments ``<speaker>_<n>.wav``.
  Labels 0..59 base, 60..99 novel.

In all three, folds are the published files: 1 = train (base and novel training items; sessions draw
their few shots from it), 2 = val (base classes only), 3 = test (all classes). ``meta`` holds the base and
novel class ids and the usual protocol (5-way 5-shot sessions after the base session).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from earmark.data.base import DATASETS, DatasetLayoutError, read_csv_rows, require_files
from earmark.data.dataset import AudioDataset

FEWSHOT_FOLDS = {1: "train", 2: "val", 3: "test"}
_FSD_MIX_RATE = 44100  # FSD-MIX-CLIPS names a clip by its start sample at this rate


def _int(value: str, what: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetLayoutError(f"{where}: {what} {value!r} is not an integer") from None


def _fewshot_dataset(
    name: str,
    root: Path,
    items: list[tuple[Path, int, int]],
    class_names: list[str],
    n_base: int,
    check_files: bool,
    meta: dict,
) -> AudioDataset:
    """Check the published labels cover 0..N-1 and the base/novel cut fits, then build the dataset."""
    n = len(class_names)
    present = {t for _, t, _ in items}
    if present != set(range(n)):
        missing = sorted(set(range(n)) - present)
        raise DatasetLayoutError(f"{name}: labels are not 0..{n - 1}; no items for {missing[:10]}")
    if not 0 < n_base < n:
        raise ValueError(f"{name}: n_base must be in 1..{n - 1}, got {n_base}")
    way = 5  # the published protocol: 5-way 5-shot sessions after the base session
    paths = [p for p, _, _ in items]
    if check_files:
        require_files(paths, root)
    return AudioDataset(
        name=name,
        root=root,
        paths=paths,
        targets=[t for _, t, _ in items],
        class_names=class_names,
        folds=[f for _, _, f in items],
        meta={
            "layout": name,
            "split": "published few-shot split files: fold 1 train, 2 val (base classes), 3 test",
            "fold_names": dict(FEWSHOT_FOLDS),
            "base_classes": list(range(n_base)),
            "novel_classes": list(range(n_base, n)),
            "protocol": {"way": way, "shot": 5, "sessions": 1 + math.ceil((n - n_base) / way)},
            **meta,
        },
    )


def _labelled_names(pairs: dict[int, str], where: str) -> list[str]:
    """Names in label order; the published labels must be exactly 0..N-1."""
    if sorted(pairs) != list(range(len(pairs))):
        raise DatasetLayoutError(f"{where}: labels are not 0..{len(pairs) - 1} (got {sorted(pairs)[:10]} ...)")
    return [pairs[i] for i in range(len(pairs))]


@DATASETS.register("nsynth100")
def load_nsynth100(
    root: Path, meta_dir: Path | None = None, n_base: int = 55, check_files: bool = True
) -> AudioDataset:
    """NSynth-100: ``root`` is the NSynth folder (``nsynth-train/audio`` ...); split files in ``meta_dir``.

    ``meta_dir`` defaults to ``root / 'nsynth-100-fs-meta'``.
    """
    root = Path(root)
    meta_dir = Path(meta_dir) if meta_dir is not None else root / "nsynth-100-fs-meta"
    vocab_path = meta_dir / "nsynth-100-fs_vocab.json"
    if not vocab_path.is_file():
        raise DatasetLayoutError(
            f"{vocab_path}: NSynth-100 split file not found; nsynth100 needs the published "
            "nsynth-100-fs-meta folder (nsynth-100-fs_{train,val,test}.csv and nsynth-100-fs_vocab.json)"
        )
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{vocab_path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise DatasetLayoutError(f"{vocab_path}: expected an object {{instrument_str: label}}")
    by_label: dict[int, str] = {}
    for inst, label in vocab.items():
        if not isinstance(label, int) or by_label.setdefault(label, inst) != inst:
            raise DatasetLayoutError(f"{vocab_path}: label {label!r} of {inst!r} is not a unique integer")
    class_names = _labelled_names(by_label, str(vocab_path))
    items: list[tuple[Path, int, int]] = []
    for fold, split in FEWSHOT_FOLDS.items():
        csv_path = meta_dir / f"nsynth-100-fs_{split}.csv"
        for line, row in enumerate(read_csv_rows(csv_path, ["filename", "instrument", "audio_source"]), start=2):
            if row["instrument"] not in vocab:
                raise DatasetLayoutError(f"{csv_path} line {line}: instrument {row['instrument']!r} not in vocab")
            path = root / row["audio_source"] / "audio" / f"{row['filename']}.wav"
            items.append((path, vocab[row["instrument"]], fold))
    return _fewshot_dataset("nsynth100", root, items, class_names, n_base, check_files, {"split_dir": str(meta_dir)})


def _read_vocabulary(path: Path, n: int) -> list[str]:
    """Class names from a JSON list (index = label), ``{name: label}`` or ``{label: name}``."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: vocabulary file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetLayoutError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, list):
        pairs = {i: str(v) for i, v in enumerate(data)}
    elif isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        pairs = {v: str(k) for k, v in data.items()}
    elif isinstance(data, dict) and all(str(k).isdigit() for k in data):
        pairs = {int(k): str(v) for k, v in data.items()}
    else:
        raise DatasetLayoutError(f"{path}: expected a list of names, {{name: label}} or {{label: name}}")
    if sorted(pairs) != list(range(n)):
        raise DatasetLayoutError(f"{path}: names for labels {sorted(pairs)[:3]}..., expected exactly 0..{n - 1}")
    return [pairs[i] for i in range(n)]


@DATASETS.register("fsc89")
def load_fsc89(
    root: Path,
    meta_dir: Path | None = None,
    setup: str = "setup1",
    n_base: int = 59,
    vocabulary: Path | None = None,
    check_files: bool = True,
) -> AudioDataset:
    """FSC-89: ``root`` is the FSD-MIX-CLIPS data folder (holding ``audio/``); split CSVs in ``meta_dir/<setup>``.

    ``meta_dir`` defaults to ``root / 'FSC-89-meta'``; ``setup`` is ``setup1`` (the papers' default),
    ``setup2`` or ``mini``. The CSVs carry label ids only: names come from ``vocabulary`` (JSON) when
    given, else are ``fsc89_00`` .. ``fsc89_88``.
    """
    root = Path(root)
    meta_dir = Path(meta_dir) if meta_dir is not None else root / "FSC-89-meta"
    columns = ["data_folder", "FSD_MIX_SED_filename", "start_time", "label"]
    items: list[tuple[Path, int, int]] = []
    for fold, split in FEWSHOT_FOLDS.items():
        csv_path = meta_dir / setup / f"Fsc89-{setup}-fsci_{split}.csv"
        if not csv_path.is_file():
            raise DatasetLayoutError(
                f"{csv_path}: FSC-89 split file not found; fsc89 needs the published FSC-89-meta folder "
                f"({setup}/Fsc89-{setup}-fsci_{{train,val,test}}.csv)"
            )
        for line, row in enumerate(read_csv_rows(csv_path, columns), start=2):
            where = f"{csv_path} line {line}"
            try:
                start_sample = int(float(row["start_time"]) * _FSD_MIX_RATE)
            except ValueError:
                raise DatasetLayoutError(f"{where}: start_time {row['start_time']!r} is not a number") from None
            stem = row["FSD_MIX_SED_filename"].removesuffix(".wav")
            path = root / "audio" / row["data_folder"] / f"{stem}_{start_sample}.wav"
            items.append((path, _int(row["label"], "label", where), fold))
    n = max(t for _, t, _ in items) + 1
    names = _read_vocabulary(Path(vocabulary), n) if vocabulary is not None else [f"fsc89_{i:02d}" for i in range(n)]
    return _fewshot_dataset(
        "fsc89", root, items, names, n_base, check_files, {"split_dir": str(meta_dir / setup), "setup": setup}
    )


@DATASETS.register("ls100")
def load_ls100(
    root: Path,
    meta_dir: Path | None = None,
    audio_dir: Path | None = None,
    n_base: int = 60,
    check_files: bool = True,
) -> AudioDataset:
    """LS-100: split CSVs in ``meta_dir`` (default ``root``), segments in ``audio_dir``.

    ``audio_dir`` defaults to whichever of ``root/spk_segments`` and ``root/100spks_segments`` (the two
    names the published preparation scripts use) exists, else ``root``. Class names are speaker ids.
    """
    root = Path(root)
    meta_dir = Path(meta_dir) if meta_dir is not None else root
    if audio_dir is None:
        audio_dir = next((d for d in (root / "spk_segments", root / "100spks_segments") if d.is_dir()), root)
    audio_dir = Path(audio_dir)
    items: list[tuple[Path, int, int]] = []
    speakers: dict[int, str] = {}
    for fold, split in FEWSHOT_FOLDS.items():
        csv_path = meta_dir / f"librispeech_fscil_{split}.csv"
        if not csv_path.is_file():
            raise DatasetLayoutError(
                f"{csv_path}: LS-100 split file not found; ls100 needs the published "
                "librispeech_fscil_{train,val,test}.csv"
            )
        for line, row in enumerate(read_csv_rows(csv_path, ["filename", "speaker_id", "label"]), start=2):
            label = _int(row["label"], "label", f"{csv_path} line {line}")
            if speakers.setdefault(label, row["speaker_id"]) != row["speaker_id"]:
                raise DatasetLayoutError(
                    f"{csv_path} line {line}: label {label} is both speaker {speakers[label]} and {row['speaker_id']}"
                )
            items.append((audio_dir / row["filename"], label, fold))
    class_names = _labelled_names(speakers, str(meta_dir))
    return _fewshot_dataset(
        "ls100",
        root,
        items,
        class_names,
        n_base,
        check_files,
        {"split_dir": str(meta_dir), "audio_dir": str(audio_dir)},
    )
