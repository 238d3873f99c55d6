"""Every registered loader against a small copy of its real layout (real wav files, real metadata formats)."""

import json

import numpy as np
import pytest
import soundfile as sf

from earmark.data import DATASETS, DatasetLayoutError, load_dataset
from earmark.data.folder import stratified_folds
from earmark.data.urbansound8k import US8K_COLUMNS


def wav(path, n=160, sr=16000, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(n, np.float32), sr, format=fmt)
    return path


def test_every_loader_is_registered():
    for name in ("urbansound8k", "speech_commands", "nsynth", "nsynth100", "fsc89", "ls100", "folder", "manifest"):
        assert name in DATASETS


# ---------------------------------------------------------------- UrbanSound8K


US8K_CLASSES = ["air_conditioner", "car_horn", "children_playing"]


def make_us8k(root, folds=(1, 2, 10), per=2):
    lines = [",".join(US8K_COLUMNS)]
    for cid, name in enumerate(US8K_CLASSES):
        for fold in folds:
            for k in range(per):
                fs_id = 100000 + 100 * cid + fold
                fn = f"{fs_id}-{cid}-0-{k}.wav"
                wav(root / "audio" / f"fold{fold}" / fn)
                lines.append(f"{fn},{fs_id},{k * 4.0},{k * 4.0 + 4.0},{1 + k % 2},{fold},{cid},{name}")
    (root / "audio" / "fold1" / ".DS_Store").write_bytes(b"\0")
    (root / "metadata").mkdir()
    (root / "metadata" / "UrbanSound8K.csv").write_text("\n".join(lines) + "\n")
    return root


def test_urbansound8k_layout(tmp_path):
    ds = load_dataset("urbansound8k", make_us8k(tmp_path / "UrbanSound8K"))
    assert ds.class_names == US8K_CLASSES
    assert len(ds) == 18
    assert np.bincount(ds.targets).tolist() == [6, 6, 6]
    assert sorted(set(ds.folds.tolist())) == [1, 2, 10]
    for p, t, f in zip(ds.paths, ds.targets, ds.folds, strict=True):
        assert p.parent.name == f"fold{f}" and p.name.split("-")[1] == str(t)
    train, test = ds.split(10)
    assert len(test) == 6 and set(ds.folds[test]) == {10} and len(train) == 12
    assert ds.meta["fold_names"][10] == "fold10"


def test_urbansound8k_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="UrbanSound8K.csv: metadata file not found"):
        load_dataset("urbansound8k", tmp_path)
    root = make_us8k(tmp_path / "u")
    (root / "audio" / "fold2" / "100102-1-0-1.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="1 audio file"):
        load_dataset("urbansound8k", root)
    csv = root / "metadata" / "UrbanSound8K.csv"
    csv.write_text(csv.read_text().replace(",1,car_horn", ",1,siren", 1))
    with pytest.raises(DatasetLayoutError, match="classID 1 is both"):
        load_dataset("urbansound8k", root, check_files=False)
    csv.write_text("slice_file_name,fsID,fold,class\nx.wav,1,1,dog_bark\n")
    with pytest.raises(DatasetLayoutError, match="missing column.*classID"):
        load_dataset("urbansound8k", root)


# ---------------------------------------------------------------- Speech Commands v2


def make_speech_commands(root):
    speakers = ["0a7c2a8d", "3cfc6b3a", "c50f55b8"]
    for word in ("yes", "no", "up"):
        for s in speakers:
            for n in range(2):
                wav(root / word / f"{s}_nohash_{n}.wav")
    wav(root / "_background_noise_" / "white_noise.wav")
    (root / "_background_noise_" / "README.md").write_text("noise\n")
    (root / "LICENSE").write_text("CC-BY-4.0\n")
    (root / "README.md").write_text("speech commands\n")
    # one speaker per list, as the official hash-based split does
    val = [f"{w}/3cfc6b3a_nohash_{n}.wav" for w in ("no", "up", "yes") for n in range(2)]
    test = [f"{w}/c50f55b8_nohash_{n}.wav" for w in ("no", "up", "yes") for n in range(2)]
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    return root


def test_speech_commands_layout(tmp_path):
    ds = load_dataset("speech_commands", make_speech_commands(tmp_path / "speech_commands_v0.02"))
    assert ds.class_names == ["no", "up", "yes"]
    assert len(ds) == 18
    assert all("_background_noise_" not in p.parts for p in ds.paths)
    assert ds.meta["excluded"] == ["_background_noise_"]
    assert ds.meta["fold_names"] == {1: "train", 2: "validation", 3: "test"}
    speaker_fold = {p.name.split("_")[0]: int(f) for p, f in zip(ds.paths, ds.folds, strict=True)}
    assert speaker_fold == {"0a7c2a8d": 1, "3cfc6b3a": 2, "c50f55b8": 3}
    for p, t in zip(ds.paths, ds.targets, strict=True):
        assert p.parent.name == ds.class_names[t]
    train, test = ds.split(3)
    assert len(test) == 6 and len(train) == 12 and set(ds.folds[train]) == {1, 2}
    sub = load_dataset("speech_commands", tmp_path / "speech_commands_v0.02", words=["yes", "no"])
    assert sub.class_names == ["no", "yes"] and len(sub) == 12
    assert np.bincount(sub.folds).tolist() == [0, 4, 4, 4]


def test_speech_commands_errors(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    with pytest.raises(DatasetLayoutError, match="no folder for word.*left"):
        load_dataset("speech_commands", root, words=["yes", "left"])
    (root / "up" / "c50f55b8_nohash_1.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="1 file.*split lists are missing, e.g. up/c50f55b8_nohash_1.wav"):
        load_dataset("speech_commands", root)
    assert len(load_dataset("speech_commands", root, words=["yes"])) == 6  # other words' entries are ignored
    (root / "validation_list.txt").write_text("yes/c50f55b8_nohash_0.wav\n")
    with pytest.raises(DatasetLayoutError, match="in both validation_list.txt and testing_list.txt"):
        load_dataset("speech_commands", root, check_files=False)
    (root / "testing_list.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="testing_list.txt: split list not found"):
        load_dataset("speech_commands", root)


# ---------------------------------------------------------------- NSynth

NSYNTH_SOURCES = ["acoustic", "electronic", "synthetic"]
NSYNTH_FAMILIES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead"]


def nsynth_example(note_str, instrument_id):
    inst, pitch, velocity = note_str.rsplit("-", 2)
    family, source = inst.split("_")[0], inst.split("_")[1]
    return {
        "note": 1000 + instrument_id,
        "note_str": note_str,
        "instrument": instrument_id,
        "instrument_str": inst,
        "pitch": int(pitch),
        "velocity": int(velocity),
        "sample_rate": 16000,
        "qualities": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        "qualities_str": ["dark"],
        "instrument_family": NSYNTH_FAMILIES.index(family),
        "instrument_family_str": family,
        "instrument_source": NSYNTH_SOURCES.index(source),
        "instrument_source_str": source,
    }


def make_nsynth(root):
    # as in the real release, no train instrument appears in valid or test
    split_instruments = {
        "train": {"bass_synthetic_033": 417, "guitar_acoustic_010": 219},
        "valid": {"keyboard_electronic_002": 51, "bass_electronic_018": 11},
        "test": {"keyboard_electronic_002": 51, "bass_electronic_018": 11},
    }
    for split, insts in split_instruments.items():
        examples = {}
        for inst, iid in insts.items():
            for pitch, vel in ((60, 25), (62, 127)):
                note = f"{inst}-{pitch:03d}-{vel:03d}"
                examples[note] = nsynth_example(note, iid)
                wav(root / f"nsynth-{split}" / "audio" / f"{note}.wav")
        (root / f"nsynth-{split}" / "examples.json").write_text(json.dumps(examples, indent=4))
    return root


def test_nsynth_layout(tmp_path):
    root = make_nsynth(tmp_path / "nsynth")
    ds = load_dataset("nsynth", root)
    assert ds.class_names == [
        "bass_electronic_018",
        "bass_synthetic_033",
        "guitar_acoustic_010",
        "keyboard_electronic_002",
    ]
    assert len(ds) == 12
    assert np.bincount(ds.folds).tolist() == [0, 4, 4, 4]
    assert ds.meta["fold_names"] == {1: "train", 2: "valid", 3: "test"}
    assert ds.meta["source_ids"]["bass_synthetic_033"] == 417
    for p, t, f in zip(ds.paths, ds.targets, ds.folds, strict=True):
        assert p.name.startswith(ds.class_names[t] + "-")
        assert p.parent.parent.name == f"nsynth-{ds.meta['fold_names'][int(f)]}"
    train, test = ds.split(3)
    assert set(ds.targets[train[ds.folds[train] == 1]]).isdisjoint(ds.targets[test])
    fam = load_dataset("nsynth", root, label="instrument_family_str", splits=["train", "test"])
    assert fam.class_names == ["bass", "guitar", "keyboard"] and len(fam) == 8
    assert fam.meta["source_ids"] == {"bass": 0, "guitar": 3, "keyboard": 4}
    assert fam.meta["fold_names"] == {1: "train", 3: "test"}


def test_nsynth_errors(tmp_path):
    root = make_nsynth(tmp_path / "n")
    with pytest.raises(ValueError, match="label must be one of"):
        load_dataset("nsynth", root, label="pitch")
    (root / "nsynth-valid" / "audio" / "bass_electronic_018-060-025.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="1 audio file"):
        load_dataset("nsynth", root)
    js = root / "nsynth-train" / "examples.json"
    data = json.loads(js.read_text())
    del next(iter(data.values()))["instrument_str"]
    js.write_text(json.dumps(data))
    with pytest.raises(DatasetLayoutError, match="examples.json: example .* has no field 'instrument_str'"):
        load_dataset("nsynth", root, check_files=False)
    (root / "nsynth-test" / "examples.json").unlink()
    with pytest.raises(DatasetLayoutError, match="nsynth-test/examples.json: metadata file not found"):
        load_dataset("nsynth", root, splits=["test"])


# ---------------------------------------------------------------- NSynth-100 (published few-shot split)

NS100_VOCAB = {"guitar_electronic_017": 0, "keyboard_acoustic_017": 1, "bass_synthetic_098": 2, "flute_acoustic_002": 3}


def make_nsynth100(root, n_train=(3, 3, 2, 2), n_val=2, n_test=2):
    meta = root / "nsynth-100-fs-meta"
    meta.mkdir(parents=True)
    (meta / "nsynth-100-fs_vocab.json").write_text(json.dumps(NS100_VOCAB))
    header = "filename,instrument,instrument_family,instrument_source,audio_source"
    rows = {"train": [header], "val": [header], "test": [header]}
    counter = 21
    for inst, label in NS100_VOCAB.items():
        family, source, _ = inst.split("_")
        counts = {"train": n_train[label], "val": n_val if label < 2 else 0, "test": n_test}
        for split, count in counts.items():
            for _ in range(count):
                note = f"{inst}-{counter:03d}-100"
                counter += 1
                audio_source = "nsynth-test" if (split == "test" and label == 3) else "nsynth-train"
                wav(root / audio_source / "audio" / f"{note}.wav")
                rows[split].append(f"{note},{inst},{family},{source},{audio_source}")
    for split, lines in rows.items():
        (meta / f"nsynth-100-fs_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_nsynth100_layout(tmp_path):
    ds = load_dataset("nsynth100", make_nsynth100(tmp_path / "NSynth"), n_base=2)
    assert ds.class_names == list(NS100_VOCAB)  # vocab order, not alphabetical
    assert len(ds) == 10 + 4 + 8
    assert np.bincount(ds.targets).tolist() == [7, 7, 4, 4]
    assert ds.meta["base_classes"] == [0, 1] and ds.meta["novel_classes"] == [2, 3]
    assert ds.meta["fold_names"] == {1: "train", 2: "val", 3: "test"}
    assert set(ds.targets[ds.folds == 2]) == {0, 1}  # validation holds base classes only
    assert set(ds.targets[ds.folds == 3]) == {0, 1, 2, 3}
    for p, t in zip(ds.paths, ds.targets, strict=True):
        assert p.name.startswith(ds.class_names[t] + "-") and p.parent.name == "audio"
    assert any(p.parent.parent.name == "nsynth-test" for p in ds.paths)
    assert ds.meta["protocol"] == {"way": 5, "shot": 5, "sessions": 2}


def test_nsynth100_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="nsynth-100-fs_vocab.json: NSynth-100 split file not found"):
        load_dataset("nsynth100", tmp_path)
    root = make_nsynth100(tmp_path / "n")
    with pytest.raises(ValueError, match="n_base must be in 1..3"):
        load_dataset("nsynth100", root, n_base=4)
    test_csv = root / "nsynth-100-fs-meta" / "nsynth-100-fs_test.csv"
    test_csv.write_text(test_csv.read_text().replace(",flute_acoustic_002,", ",flute_acoustic_099,", 1))
    with pytest.raises(DatasetLayoutError, match="nsynth-100-fs_test.csv line .*flute_acoustic_099.*not in vocab"):
        load_dataset("nsynth100", root, n_base=2)
    (root / "nsynth-100-fs-meta" / "nsynth-100-fs_val.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="nsynth-100-fs_val.csv: metadata file not found"):
        load_dataset("nsynth100", root, n_base=2)


# ---------------------------------------------------------------- FSC-89 (FSD-MIX-CLIPS)


def make_fsc89(root, setup="setup1", n_classes=4):
    meta = root / "FSC-89-meta" / setup
    meta.mkdir(parents=True)
    header = "data_folder,FSD_MIX_SED_filename,start_time,label"
    rows = {"train": [header], "val": [header], "test": [header]}
    starts = ["6.13", "0.57", "9.0", "1.15"]  # 0.57 s -> sample 25136 (int() truncates 25136.999...)
    for label in range(n_classes):
        base = label < 2
        for split in ("train", "val", "test"):
            if split == "val" and not base:
                continue
            folder = f"base/{split}" if base else ("novel_test" if split == "test" else "novel_val")
            for k in range(2):
                fn = f"soundscape_{1000 * label + 10 * len(rows[split]) + k}.wav"
                start = starts[(label + k) % 4]
                clip = fn.replace(".wav", f"_{int(float(start) * 44100)}.wav")
                wav(root / "audio" / folder / clip, n=441, sr=44100)
                rows[split].append(f"{folder},{fn},{start},{label}")
    for split, lines in rows.items():
        (meta / f"Fsc89-{setup}-fsci_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_fsc89_layout(tmp_path):
    root = make_fsc89(tmp_path / "FSD-MIX-CLIPS_data")
    ds = load_dataset("fsc89", root, n_base=2)
    assert ds.class_names == ["fsc89_00", "fsc89_01", "fsc89_02", "fsc89_03"]
    assert len(ds) == 2 * 2 * 3 + 2 * 2 * 2
    assert set(ds.targets[ds.folds == 2]) == {0, 1}
    assert ds.meta["base_classes"] == [0, 1] and ds.meta["setup"] == "setup1"
    names = {p.name for p in ds.paths}
    assert any(n.endswith("_25136.wav") for n in names) and not any(n.endswith("_25137.wav") for n in names)
    assert {p.parent.name for p in ds.paths} >= {"novel_val", "novel_test"}
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"Bark": 0, "Chirp": 1, "Crash": 2, "Gong": 3}))
    named = load_dataset("fsc89", root, n_base=2, vocabulary=vocab)
    assert named.class_names == ["Bark", "Chirp", "Crash", "Gong"]
    np.testing.assert_array_equal(named.targets, ds.targets)


def test_fsc89_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="Fsc89-setup2-fsci_train.csv: FSC-89 split file not found"):
        load_dataset("fsc89", tmp_path, setup="setup2")
    root = make_fsc89(tmp_path / "f")
    clip = next((root / "audio" / "novel_val").iterdir())
    clip.unlink()
    with pytest.raises(DatasetLayoutError, match="1 audio file"):
        load_dataset("fsc89", root, n_base=2)
    vocab = tmp_path / "v.json"
    vocab.write_text(json.dumps(["a", "b"]))
    with pytest.raises(DatasetLayoutError, match="expected exactly 0..3"):
        load_dataset("fsc89", root, n_base=2, vocabulary=vocab, check_files=False)
    train = root / "FSC-89-meta" / "setup1" / "Fsc89-setup1-fsci_train.csv"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(ln for ln in lines if not ln.endswith(",3")) + "\n")
    test = root / "FSC-89-meta" / "setup1" / "Fsc89-setup1-fsci_test.csv"
    test.write_text("\n".join(ln for ln in test.read_text().splitlines() if not ln.endswith(",3")) + "\n")
    with pytest.raises(ValueError, match="n_base must be in 1..2"):
        load_dataset("fsc89", root, n_base=3, check_files=False)
    train.write_text("data_folder,filename,start_time,label\n")
    with pytest.raises(DatasetLayoutError, match="missing column.*FSD_MIX_SED_filename"):
        load_dataset("fsc89", root)


# ---------------------------------------------------------------- LS-100 (LibriSpeech speakers)

LS_SPEAKERS = ["1069", "1081", "125", "8770"]


def make_ls100(root, audio="spk_segments"):
    rows = {s: ["filename,speaker_id,label"] for s in ("train", "val", "test")}
    for label, spk in enumerate(LS_SPEAKERS):
        counts = {"train": 3, "val": 1 if label < 2 else 0, "test": 2}
        i = 0
        for split, count in counts.items():
            for _ in range(count):
                wav(root / audio / f"{spk}_{i}.wav")
                rows[split].append(f"{spk}_{i}.wav,{spk},{label}")
                i += 1
    for split, lines in rows.items():
        (root / f"librispeech_fscil_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ls100_layout(tmp_path):
    ds = load_dataset("ls100", make_ls100(tmp_path / "librispeech_fscil"), n_base=2)
    assert ds.class_names == LS_SPEAKERS
    assert len(ds) == 4 * 3 + 2 + 4 * 2
    assert np.bincount(ds.folds).tolist() == [0, 12, 2, 8]
    assert all(p.name.split("_")[0] == ds.class_names[t] for p, t in zip(ds.paths, ds.targets, strict=True))
    assert all(p.parent.name == "spk_segments" for p in ds.paths)
    assert ds.meta["novel_classes"] == [2, 3]
    other = load_dataset("ls100", make_ls100(tmp_path / "other", audio="100spks_segments"), n_base=2)
    assert other.paths[0].parent.name == "100spks_segments"


def test_ls100_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="librispeech_fscil_train.csv: LS-100 split file not found"):
        load_dataset("ls100", tmp_path)
    root = make_ls100(tmp_path / "l")
    with pytest.raises(DatasetLayoutError, match=r"22 audio file\(s\) listed but missing"):
        load_dataset("ls100", root, audio_dir=tmp_path, n_base=2)
    test = root / "librispeech_fscil_test.csv"
    test.write_text(test.read_text().replace("125_", "999_").replace(",125,", ",999,"))
    with pytest.raises(DatasetLayoutError, match="label 2 is both speaker 125 and 999"):
        load_dataset("ls100", root, n_base=2, check_files=False)


# ---------------------------------------------------------------- folder


def make_folder(root, counts=None):
    counts = counts or {"dog": 7, "rain": 5, "clock tick": 6}
    for name, n in counts.items():
        for i in range(n):
            sub = root / name / ("take2" if i % 2 else "")
            if i % 3 == 0:
                wav(sub / f"{i:02d}.flac", fmt="FLAC")
            else:
                wav(sub / f"{i:02d}.wav")
        (root / name / "notes.txt").write_text("not audio\n")
        wav(root / name / ".hidden" / "x.wav")
    wav(root / "_unsorted" / "a.wav")
    wav(root / ".cache" / "b.wav")
    return root


def test_folder_layout(tmp_path):
    root = make_folder(tmp_path / "my_sounds")
    ds = load_dataset("folder", root, n_folds=3, seed=1)
    assert ds.class_names == ["clock tick", "dog", "rain"]
    assert np.bincount(ds.targets).tolist() == [6, 7, 5]
    assert {p.suffix for p in ds.paths} == {".wav", ".flac"}
    assert all(".hidden" not in p.parts and "_unsorted" not in p.parts for p in ds.paths)
    assert all(p.relative_to(root).parts[0] == ds.class_names[t] for p, t in zip(ds.paths, ds.targets, strict=True))
    assert sorted(set(ds.folds.tolist())) == [1, 2, 3]
    for c in range(3):  # stratified: every class spread evenly over the folds
        per_fold = np.bincount(ds.folds[ds.targets == c], minlength=4)[1:]
        assert per_fold.max() - per_fold.min() <= 1
    again = load_dataset("folder", root, n_folds=3, seed=1)
    np.testing.assert_array_equal(again.folds, ds.folds)
    other_seed = load_dataset("folder", root, n_folds=3, seed=2)
    assert not np.array_equal(other_seed.folds, ds.folds)
    make_folder(root, {"zebra": 4})
    grown = load_dataset("folder", root, n_folds=3, seed=1)
    assert grown.class_names[-1] == "zebra"
    np.testing.assert_array_equal(grown.folds[grown.targets < 3], ds.folds)  # other classes keep their folds


def test_stratified_folds_balance():
    targets = np.repeat(np.arange(4), [10, 11, 3, 1])
    folds = stratified_folds(targets, ["a", "b", "c", "d"], n_folds=5, seed=0)
    assert folds.min() >= 1 and folds.max() <= 5
    for c in range(4):
        counts = np.bincount(folds[targets == c], minlength=6)[1:]
        assert counts.sum() == (targets == c).sum() and counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        stratified_folds(targets, ["a", "b", "c", "d"], n_folds=1, seed=0)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="folder not found"):
        load_dataset("folder", tmp_path / "nope")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DatasetLayoutError, match="no class sub-folders"):
        load_dataset("folder", tmp_path / "empty_root")
    root = make_folder(tmp_path / "x", {"dog": 3})
    (root / "cat").mkdir()
    (root / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match="cat: class folder has no audio files"):
        load_dataset("folder", root)


# ---------------------------------------------------------------- manifest


def make_manifest(tmp_path, header, rows, name="manifest.csv", bom=False):
    audio = tmp_path / "audio"
    for row in rows:
        wav(audio / row[0])
    lists = tmp_path / "lists"
    lists.mkdir(exist_ok=True)
    text = "\n".join([",".join(header)] + [",".join(["../audio/" + r[0], *r[1:]]) for r in rows]) + "\n"
    (lists / name).write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return lists / name


def test_manifest_split_column(tmp_path):
    rows = [
        (f"{lab}{i}.wav", lab, split)
        for lab in ("owl", "frog")
        for i, split in enumerate(["train"] * 3 + ["val", "test"])
    ]
    csv_path = make_manifest(tmp_path, ["path", "label", "split"], rows, bom=True)
    ds = load_dataset("manifest", csv_path.parent)  # folder holding manifest.csv
    assert ds.class_names == ["frog", "owl"]
    assert np.bincount(ds.targets).tolist() == [5, 5]
    assert ds.meta["fold_names"] == {1: "train", 2: "val", 3: "test"}
    assert np.bincount(ds.folds).tolist() == [0, 6, 2, 2]
    assert all(p.is_file() and p.parent.name == "audio" for p in ds.paths)  # resolved against the CSV's folder
    assert ds.paths[0].name == "owl0.wav" and ds.class_names[ds.targets[0]] == "owl"
    train, test = ds.split(3)
    assert len(test) == 2 and len(train) == 8


def test_manifest_fold_and_numeric_labels(tmp_path):
    rows = [(f"c{lab}_{i}.wav", lab, str(i % 3 + 1)) for lab in ("2", "10", "1") for i in range(3)]
    ds = load_dataset("manifest", make_manifest(tmp_path, ["path", "label", "fold"], rows, name="m.csv"))
    assert ds.class_names == ["1", "2", "10"]  # numeric order, not string order
    assert np.bincount(ds.folds).tolist() == [0, 3, 3, 3]
    assert ds.meta["fold_names"] == {1: "fold1", 2: "fold2", 3: "fold3"}


def test_manifest_fold_with_split_and_no_split(tmp_path):
    rows = [(f"{lab}{i}.wav", lab, "test" if i == 4 else "train", str(i + 1)) for lab in "ab" for i in range(5)]
    ds = load_dataset("manifest", make_manifest(tmp_path, ["path", "label", "split", "fold"], rows))
    assert ds.meta["fold_names"] == {1: "train", 2: "train", 3: "train", 4: "train", 5: "test"}
    assert set(ds.folds[ds.targets == 0]) == {1, 2, 3, 4, 5}
    plain = load_dataset(
        "manifest", make_manifest(tmp_path, ["path", "label"], [r[:2] for r in rows], name="p.csv"), n_folds=5, seed=3
    )
    assert sorted(set(plain.folds.tolist())) == [1, 2, 3, 4, 5]
    assert "seeded stratified 5-fold" in plain.meta["split"]


def test_manifest_errors(tmp_path):
    with pytest.raises(DatasetLayoutError, match="manifest.csv: manifest file not found"):
        load_dataset("manifest", tmp_path)
    bad = make_manifest(tmp_path, ["file", "label"], [("a.wav", "x")], name="bad.csv")
    with pytest.raises(DatasetLayoutError, match="bad.csv: missing column.*path"):
        load_dataset("manifest", bad)
    mixed = make_manifest(
        tmp_path,
        ["path", "label", "split", "fold"],
        [("a.wav", "x", "train", "1"), ("b.wav", "y", "test", "1")],
        name="mixed.csv",
    )
    with pytest.raises(DatasetLayoutError, match="mixed.csv line 3: fold 1 holds both split 'train' and 'test'"):
        load_dataset("manifest", mixed)
    aliases = make_manifest(
        tmp_path, ["path", "label", "split"], [("a.wav", "x", "val"), ("b.wav", "y", "valid")], name="al.csv"
    )
    with pytest.raises(DatasetLayoutError, match="'val' and 'valid' both mean fold 2"):
        load_dataset("manifest", aliases)
    gone = make_manifest(tmp_path, ["path", "label"], [("c.wav", "x"), ("d.wav", "y")], name="gone.csv")
    (tmp_path / "audio" / "d.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="gone.csv: 1 audio file"):
        load_dataset("manifest", gone)
    fold = make_manifest(tmp_path, ["path", "label", "fold"], [("e.wav", "x", "one")], name="fold.csv")
    with pytest.raises(DatasetLayoutError, match="fold.csv line 2: fold 'one' is not an integer"):
        load_dataset("manifest", fold)
