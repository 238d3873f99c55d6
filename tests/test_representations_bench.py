"""benchmarks/representations.py on its tiny smoke setting: levers, seeds, the joint reference and the ratio."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "representations.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("representations_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_lever_is_a_valid_config(bench):
    from earmark.encoders.config import resolve_config
    from earmark.experiments import RunConfig

    base = RunConfig()
    for name, lever in bench.LEVERS.items():
        config = bench.lever_config(base, lever, 0, Path("/tmp/x"))
        resolve_config(config.encoder)  # the encoder changes make a valid EncoderConfig
        assert name == "baseline" or config.train != base.train or config.encoder != base.encoder, name


def test_smoke_run_over_two_seeds_and_two_levers(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EARMARK_DATA", str(tmp_path / "data"))
    out = tmp_path / "bench"
    results = bench.main(["--smoke", "--seeds", "0,1", "--levers", "pool-mean+max", "--learners", "ncm,analytic",
                          "--trials", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert list(results["levers"]) == ["baseline", "pool-mean+max"]  # the baseline always runs
    rows = {(r["lever"], r["head"]): r for r in results["rows"]}
    assert set(rows) == {(lever, head) for lever in ("baseline", "pool-mean+max")
                         for head in ("ncm", "analytic", "joint-ridge")}
    for (lever, head), row in rows.items():
        assert row["seeds"] == [0, 1]
        per_seed = [results["records"][lever][s]["heads"][head] for s in ("0", "1")]
        assert row["last"][0] == pytest.approx(sum(r["last"] for r in per_seed) / 2)
        for r in per_seed:
            assert r["ratio"] == pytest.approx(r["last"] / r["joint_last"])
        assert row["joint_last"] is not None and 0 < row["joint_last"][0] <= 1
    assert rows[("baseline", "ncm")]["delta_last"] == 0.0
    record = results["records"]["baseline"]["0"]
    assert record["classes"] == 4 and record["train_seconds"] > 0  # the tuning half of 8 classes
    assert "Levers against the current recipe" in printed and "pool-mean+max" in printed
    assert (out / "table.txt").read_text().startswith("Levers against")
    assert json.loads((out / "results.json").read_text())["rows"]
    # a rerun reuses every encoder and keeps the seconds of the first training
    again = bench.main(["--smoke", "--seeds", "0", "--levers", "baseline", "--learners", "ncm", "--trials", "1",
                        "--out", str(out)])
    assert again["records"]["baseline"]["0"]["reused"] == [True, True]
    assert again["records"]["baseline"]["0"]["train_seconds"] == record["train_seconds"]
