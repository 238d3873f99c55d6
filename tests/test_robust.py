"""Crashes, resumes, reproducibility and the messages for odd inputs (issues 18 and 20)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from earmark.audio import AudioConfig, AudioWarning, load_audio
from earmark.checkpoint import CheckpointError, atomic_write_bytes, load_tensors
from earmark.cli import main
from earmark.data import load_dataset
from earmark.data.base import DatasetLayoutError, DatasetWarning
from earmark.encoders.config import EncoderConfig
from earmark.encoders.mamba import build_encoder
from earmark.experiments.rundir import MARKER, RunFolderError, RunWriter
from earmark.training.supervised import TrainConfig, train_supervised

REPO = Path(__file__).resolve().parents[1]
TINY = EncoderConfig(embed_dim=16, depth=1, n_mels=32, d_state=4, expand=1, pool="mean")
CFG = TrainConfig(epochs=5, batch_size=8, lr=3e-3, warmup_epochs=0.5, checkpoint_every=1, threads=1)

# The training job of the kill test, run in a fresh process: argv = checkpoint, result file, seconds to sleep
# after each epoch (so the kill lands in the middle of the run), seed.
JOB = r"""
import sys, time
import torch
from safetensors.torch import save_file
from tests.test_robust import TINY, CFG, data
from dataclasses import replace
from earmark.encoders.mamba import build_encoder
from earmark.training.supervised import train_supervised
ckpt, out, pause, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(seed)
enc = build_encoder(TINY)
feats, labels = data()
train_supervised(enc, feats, labels, 4, replace(CFG, seed=seed), progress=False,
                 checkpoint_path=ckpt if ckpt != "-" else None,
                 on_epoch=lambda e, m: time.sleep(pause))
save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, out)
"""


def data():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(32) % 4
    feats = torch.randn(4, TINY.n_mels, 32, generator=g)[labels] + 0.5 * torch.randn(32, TINY.n_mels, 32, generator=g)
    return feats, labels


def _job(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", JOB, *map(str, args)], cwd=REPO, env=env, **kw)


def _train_here(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    enc = build_encoder(TINY)
    feats, labels = data()
    from dataclasses import replace

    train_supervised(enc, feats, labels, 4, replace(CFG, seed=seed), progress=False, **kw)
    return enc.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- base training: kill and resume


def test_sigkill_during_base_training_then_resume_gives_the_uninterrupted_weights(tmp_path):
    ckpt = tmp_path / "partial.safetensors"
    whole = _job("-", tmp_path / "whole.safetensors", 0, 0)
    victim = _job(ckpt, tmp_path / "never.safetensors", 1.0, 0)
    deadline = time.time() + 300
    while not ckpt.exists():  # kill after the first checkpoint appears, in the pause after an epoch
        assert victim.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _, meta, _ = load_tensors(ckpt, kind="train-partial")
    assert 1 <= meta["epoch"] < CFG.epochs  # killed in the middle
    assert not (tmp_path / "never.safetensors").exists()
    resumed = _job(ckpt, tmp_path / "resumed.safetensors", 0, 0)
    assert resumed.wait(timeout=300) == 0 and whole.wait(timeout=300) == 0
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert _equal(a, b)
    # the same training in this process (another process, same machine, fixed threads) is bit-identical too
    assert _equal(_train_here(), a)
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_from_each_epoch_in_process_and_refuse_another_training(tmp_path):
    ref = _train_here()
    for stop in (1, 3):
        ckpt = tmp_path / f"p{stop}.safetensors"

        class Stop(Exception):
            pass

        def interrupt(epoch, _m, stop=stop):
            if epoch + 1 == stop:
                raise Stop

        with pytest.raises(Stop):
            _train_here(checkpoint_path=ckpt, on_epoch=interrupt)
        assert load_tensors(ckpt)[1]["epoch"] == stop
        assert _equal(_train_here(checkpoint_path=ckpt), ref)
    with pytest.raises(CheckpointError, match="another training.*train"):
        _train_here(seed=1, checkpoint_path=tmp_path / "p1.safetensors")
    assert not _equal(_train_here(seed=1, checkpoint_path=tmp_path / "p1.safetensors", resume=False), ref)


def test_same_training_twice_in_one_process_is_identical_and_a_new_seed_is_not():
    a, b = _train_here(), _train_here()
    assert _equal(a, b)
    assert not _equal(a, _train_here(seed=1))


def test_training_restores_the_thread_count():
    before = torch.get_num_threads()
    _train_here()
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()


def test_harness_partial_checkpoint_is_keyed_and_deleted(tmp_path, monkeypatch):
    from earmark.data import RenderConfig
    from earmark.experiments import RunConfig, prepare

    monkeypatch.setenv("EARMARK_DATA", str(tmp_path / "data"))
    cfg = RunConfig(out=str(tmp_path / "out"), initial=4, increment=2, shots=2, encoder={"embed_dim": 16, "depth": 1},
                    clip_seconds=0.5, learners=["ncm"], progress=False, cache_dir=str(tmp_path / "cache"),
                    render=RenderConfig(n_classes=6, clips_per_class=5, clip_seconds=0.5),
                    train=TrainConfig(epochs=2, batch_size=4))
    prep = prepare(cfg)
    encoders = tmp_path / "cache" / "encoders"
    ckpt = Path(prep.training["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == encoders
    assert not list(encoders.glob("*.partial.*"))  # deleted once the encoder is saved


# ----------------------------------------------------------------------------- run folders


# Writes run "new" into a run folder, SIGKILLing itself at a named moment.
WRITE = r"""
import os, signal, sys
from pathlib import Path
from earmark.experiments import rundir
out, moment = sys.argv[1], sys.argv[2]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if moment == "between renames":  # the fallback without renameat2
    rundir._exchange = lambda a, b: False
    real = os.rename
    def rename(a, b):
        real(a, b)
        if ".old-" in str(b):
            die()
    os.rename = rename
if moment == "after exchange":
    real_ex = rundir._exchange
    def ex(a, b):
        assert real_ex(a, b)
        die()
    rundir._exchange = ex
w = rundir.RunWriter(out)
for k in range(4):
    w.write_text(f"file{k}.txt", "new")
    if moment == f"after file {k}":
        die()
w.path("model").mkdir()
(w.path("model") / "weights.bin").write_bytes(b"new")
w.commit()
if moment == "after commit":
    die()
"""


def _write_old(out: Path) -> None:
    with RunWriter(out) as w:
        for k in range(4):
            w.write_text(f"file{k}.txt", "old")
        w.path("model").mkdir()
        (w.path("model") / "weights.bin").write_bytes(b"old")


def _which_run(out: Path) -> str:
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [MARKER, "file0.txt", "file1.txt", "file2.txt", "file3.txt", "model/weights.bin"], files
    texts = {(out / f).read_text() for f in files if f != MARKER}
    assert len(texts) == 1, f"a mix of two runs: {texts}"
    return texts.pop()


@pytest.mark.parametrize("moment, expect", [
    ("after file 0", "old"), ("after file 3", "old"), ("between renames", "old"), ("after exchange", "new"),
    ("after commit", "new"),
])
def test_sigkill_during_a_run_folder_write_leaves_one_whole_run(tmp_path, moment, expect):
    out = tmp_path / "run"
    _write_old(out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", WRITE, str(out), moment], env=env)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p != out]
    if moment == "between renames":
        assert not out.exists() and leftovers  # the moment in between: both whole runs aside
        RunWriter(out).discard()  # the next writer puts the old run back first
    else:
        assert _which_run(out) == expect
    assert _which_run(out) == expect
    with RunWriter(out) as w:  # the next write removes what the killed one left
        w.write_text("file0.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "file0.txt"]  # the new run alone, no old file


def test_run_writer_keeps_the_old_run_on_error_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "run"
    _write_old(out)
    with pytest.raises(RuntimeError), RunWriter(out) as w:
        w.write_text("file0.txt", "new")
        raise RuntimeError
    assert _which_run(out) == "old" and [p.name for p in tmp_path.iterdir()] == ["run"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(RunFolderError, match="not an earmark run folder"):
        RunWriter(mine)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"):
        RunWriter(tmp_path / "afile")
    legacy = tmp_path / "legacy"  # a run folder from before the marker
    legacy.mkdir()
    (legacy / "results.json").write_text("{}")
    with RunWriter(legacy) as w:
        w.write_text("results.json", "{}")
    assert (legacy / MARKER).is_file()


def test_keep_writing_publishes_and_goes_on(tmp_path):
    out = tmp_path / "tune"
    with RunWriter(out) as w:
        w.write_text("a.txt", "1")
        w.commit(keep_writing=True)
        assert (out / "a.txt").read_text() == "1"
        w.write_text("b.txt", "2")
        assert not (out / "b.txt").exists()
    assert (out / "a.txt").read_text() == "1" and (out / "b.txt").read_text() == "2"


def test_plots_are_written_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from earmark.plots import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = save_figure(fig, tmp_path / "a.png")
    good = path.read_bytes()
    assert good[:4] == b"\x89PNG"

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom

    fig.savefig = fail
    with pytest.raises(Boom):
        save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_stale_temporary_of_a_dead_writer_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".x.bin.{int(dead.stdout)}.abc.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".x.bin.{os.getppid()}.abc.tmp"  # a live writer's: kept
    live.write_bytes(b"busy")
    atomic_write_bytes(tmp_path / "x.bin", b"whole")
    assert not stale.exists() and live.exists() and (tmp_path / "x.bin").read_bytes() == b"whole"


# ----------------------------------------------------------------------------- audio and dataset messages

TONE = (0.3 * np.sin(np.arange(32000) / 5)).astype(np.float32)


def test_truncated_and_too_short_audio_warn_naming_the_file(tmp_path):
    ok = tmp_path / "ok.wav"
    sf.write(ok, TONE, 16000)
    trunc = tmp_path / "trunc.wav"
    trunc.write_bytes(ok.read_bytes()[: 44 + 32000])
    huge = tmp_path / "huge.wav"
    b = bytearray(ok.read_bytes())
    i = b.find(b"data")
    b[i + 4 : i + 8] = struct.pack("<I", 0xFFFFFF00)
    huge.write_bytes(bytes(b))
    blip = tmp_path / "blip.wav"
    sf.write(blip, TONE[:16], 16000)  # 1 ms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(ok)  # a whole file: no warning
    for path, text in ((trunc, "truncated"), (huge, "truncated"), (blip, "1.0 ms of audio")):
        with pytest.warns(AudioWarning, match=text) as rec:
            load_audio(path)
        assert str(path) in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(blip, AudioConfig(min_seconds=0))  # the minimum can be switched off
    with warnings.catch_warnings():
        warnings.simplefilter("error", AudioWarning)  # callers can escalate them
        with pytest.raises(AudioWarning):
            load_audio(trunc)


def test_folder_dataset_reports_what_it_skipped(tmp_path):
    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(2):
            sf.write(root / c / f"{k}.wav", TONE[:1600], 16000)
    (root / "a" / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    (root / "b" / "x.wav").mkdir()
    with pytest.warns(DatasetWarning, match="passed over 2") as rec:
        ds = load_dataset("folder", root)
    assert "dangling symbolic link" in str(rec[0].message) and "x.wav" in str(rec[0].message)
    assert len(ds) == 4
    assert sorted((Path(p).name, r) for p, r in ds.skipped) == [
        ("gone.wav", "dangling symbolic link"), ("x.wav", "a directory, not an audio file")]


def test_root_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "clips.zip"
    f.write_bytes(b"PK")
    for name in ("folder", "esc50"):
        with pytest.raises(DatasetLayoutError, match="is a file, not a folder"):
            load_dataset(name, f)


def test_corrupt_config_results_and_params_files_are_named(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("train: {epochs: [1, 2\n")
    assert main(["run", "--config", str(bad), "--no-progress"]) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    params.write_text("analytic: {gamma: [\n")
    assert main(["run", "--params", str(params), "--no-progress"]) == 2
    assert f"{params}: not valid YAML" in capsys.readouterr().err
    from earmark.checkpoint import read_json

    results = tmp_path / "results.json"
    results.write_text('{"scenario": {"label_map": {')
    with pytest.raises(ValueError, match=f"{results}: not valid JSON"):
        read_json(results, "results")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text("{")
    assert main(["info", str(model)]) == 2
    assert f"{model / 'model.json'}: not valid JSON" in capsys.readouterr().err


def test_version_flag(capsys):
    import earmark

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"earmark {earmark.__version__}"
    assert earmark.__version__ and earmark.__version__[0].isdigit()


def test_results_environment_names_what_figures_depend_on():
    from earmark.experiments import RunConfig
    from earmark.experiments.run import environment

    env = environment(RunConfig())
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["train_threads"] == TrainConfig().threads and "numba" in env
    json.dumps(env)
