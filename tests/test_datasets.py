import numpy as np
import pytest
import soundfile as sf

from earmark.data.base import DATASETS, DatasetLayoutError, load_dataset
from earmark.data.esc50 import ESC50_COLUMNS


def make_esc50(root, classes=("dog", "rain", "clock_tick"), per_fold=2, folds=5):
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    lines = [",".join(ESC50_COLUMNS)]
    for target, name in enumerate(classes):
        for fold in range(1, folds + 1):
            for k in range(per_fold):
                src = f"{target}{fold}{k}"
                fn = f"{fold}-{src}-A-{target}.wav"
                sf.write(root / "audio" / fn, np.zeros(160, np.float32), 16000)
                lines.append(f"{fn},{fold},{target},{name},False,{src},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


def test_esc50_layout(tmp_path):
    ds = load_dataset("esc50", make_esc50(tmp_path / "ESC-50"))
    assert "esc50" in DATASETS
    assert ds.class_names == ["dog", "rain", "clock_tick"]
    assert len(ds) == 30 and ds.num_classes == 3
    assert sorted(set(ds.folds.tolist())) == [1, 2, 3, 4, 5]
    train, test = ds.split(5)
    assert len(test) == 6 and len(train) == 24
    assert set(ds.folds[test]) == {5}
    assert all(p.is_file() for p in ds.paths)
    with pytest.raises(ValueError, match="no fold 9"):
        ds.split(9)


def test_esc50_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetLayoutError, match="esc50.csv: metadata file not found"):
        load_dataset("esc50", tmp_path)
    root = make_esc50(tmp_path / "x")
    (root / "audio" / "1-010-A-0.wav").unlink()
    with pytest.raises(DatasetLayoutError, match="1 audio file"):
        load_dataset("esc50", root)
    csv = root / "meta" / "esc50.csv"
    csv.write_text("filename,fold\n")
    with pytest.raises(DatasetLayoutError, match="missing column"):
        load_dataset("esc50", root)


def test_unknown_dataset_lists_known():
    with pytest.raises(KeyError, match="esc50"):
        load_dataset("nope", ".")
