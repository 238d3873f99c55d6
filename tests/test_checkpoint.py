import json

import pytest
import torch

from earmark.checkpoint import CheckpointError, atomic_write_bytes, load_tensors, save_tensors


def test_round_trip_and_digest(tmp_path):
    p = tmp_path / "m.safetensors"
    digest = save_tensors(p, {"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "thing", "x": [1, 2]})
    tensors, meta, digest2 = load_tensors(p, kind="thing")
    assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
    assert meta == {"kind": "thing", "x": [1, 2]}
    assert digest == digest2 and len(digest) == 64
    assert json.loads(p.with_suffix(".json").read_text())["x"] == [1, 2]  # readable copy for people


def test_wrong_kind_and_corrupt_files(tmp_path):
    p = tmp_path / "m.safetensors"
    save_tensors(p, {"w": torch.ones(1)}, {"kind": "a"})
    with pytest.raises(CheckpointError, match="expected a 'b'"):
        load_tensors(p, kind="b")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=str(bad)):
        load_tensors(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_tensors(tmp_path / "none.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "state.bin"
    atomic_write_bytes(p, b"old")

    import earmark.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["state.bin"]  # no temp file left behind
