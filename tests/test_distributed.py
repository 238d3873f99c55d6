"""The Ray engine on a local cluster: sharded embedding and sharded learning equal the single-process paths.

One local Ray instance for the whole module (2 CPUs, no dashboard, loopback only), under a watchdog:
past ``WATCHDOG_S`` the run stops with every thread's traceback. Without Ray installed these tests
are skipped, except the one that checks the commands say how to install it.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import pytest
import torch

from earmark.audio import AudioConfig, AudioDecodeError
from earmark.cli import main
from earmark.encoders.cache import EmbeddingCache, audio_digest, embedder_fingerprint
from earmark.encoders.config import resolve_config
from earmark.encoders.embedder import AudioEmbedder
from earmark.model import Model, ModelError
from tests.audio_fixtures import FREQS, write_class
from tests.test_forget import FORGETTABLE

WATCHDOG_S = 600  # the module takes about 80 s on a loaded 2-core machine
MERGEABLE = {k: v for k, v in FORGETTABLE.items() if k != "teen"}  # ranpac with a pinned lambda


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from earmark.distributed.ray_engine import init_local

    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hung cluster ends the run, with tracebacks
    try:
        context = init_local(ray, num_cpus=2)  # loopback only, no dashboard
        try:
            assert context.address_info["node_ip_address"] == "127.0.0.1"
            assert context.address_info["gcs_address"].startswith("127.0.0.1:")
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield ray
        finally:
            ray.shutdown()
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("clips")
    return {name: write_class(root / "folder", name, freq, 6) for name, freq in FREQS.items()}


@pytest.fixture(scope="module")
def embedder() -> AudioEmbedder:
    torch.manual_seed(0)
    return AudioEmbedder(resolve_config("fast"), AudioConfig(clip_seconds=1.0)).eval()


def fresh(embedder, learner: str) -> Model:
    return Model.from_embedder(embedder, learner, MERGEABLE.get(learner, {}))


def request(clips) -> tuple[list[Path], list[str]]:
    """A mixed request (labels interleaved, one label recurring from the model's first session)."""
    order = [("mid", 3), ("whistle", 0), ("high", 0), ("mid", 4), ("whistle", 1), ("high", 1), ("whistle", 2),
             ("high", 2), ("mid", 5), ("low", 3), ("low", 4), ("high", 3)]
    return [clips[n][i] for n, i in order], [n for n, _ in order]


def same_journal(a: list[dict], b: list[dict]) -> bool:
    strip = [{k: v for k, v in e.items() if k != "time"} for e in a]
    return strip == [{k: v for k, v in e.items() if k != "time"} for e in b] and len({e["time"] for e in b}) <= 2


def assert_same_learner(a, b, rtol: float = 1e-9) -> None:
    """Equal label columns and every state tensor equal to ``rtol`` (relative, Frobenius)."""
    assert a.classes_.tolist() == b.classes_.tolist()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        x, y = sa[key], sb[key]
        if key == "ridges":  # ranpac's lambda per partial_fit call: a merge makes no call; the lambda is pinned
            assert set(x.tolist()) == set(y.tolist()), key
            continue
        assert x.shape == y.shape, key
        if not x.is_floating_point():
            assert torch.equal(x, y), key
        elif key.endswith("factors.rows"):  # a factor is unique up to an orthogonal mix: compare F'F per class
            continue
        else:
            scale = max(float(y.double().norm()), 1e-300)
            assert float((x.double() - y.double()).norm()) / scale < rtol, key


# ----------------------------------------------------------------------------- embedding


def test_sharded_embedding_equals_single_process_bitwise(ray_cluster, clips, embedder, tmp_path):
    from earmark.distributed.ray_engine import embed_local, embed_with_ray

    paths = [p for name in FREQS for p in clips[name]]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    local = embed_local(embedder, paths, tmp_path / "local", batch_size=7, progress=False)
    sharded = embed_with_ray(embedder, [*paths[:5], bad, *paths[5:]], tmp_path / "ray", num_workers=2, batch_size=5,
                             progress=False, flush_rows=8, on_error="skip")
    assert (local.computed, sharded.computed, sharded.cached) == (len(paths), len(paths), 0)
    assert [p for p, _ in sharded.skipped] == [str(bad)]  # reported as the local path reports it
    fp = embedder_fingerprint(embedder)
    a, b = EmbeddingCache(tmp_path / "local", fp), EmbeddingCache(tmp_path / "ray", fp)
    assert len(b) == len(paths) and len(list(b.dir.glob("shard-*.safetensors"))) > 1  # several shards, one format
    for p in paths:
        key = audio_digest(p)
        assert torch.equal(a.get(key), b.get(key)), p  # the same bits: embeddings are batch-invariant
    again = embed_with_ray(embedder, paths, tmp_path / "ray", num_workers=2, progress=False)
    assert (again.computed, again.cached) == (0, len(paths))  # a rerun recomputes nothing


def test_a_killed_embedding_actor_is_restarted_and_its_batch_rerun(ray_cluster, clips, embedder, tmp_path):
    from earmark.distributed.ray_engine import EmbedActor, embed_local, embed_with_ray

    marker = tmp_path / "crashed-once"

    class CrashOnce(EmbedActor):
        def __call__(self, batch):
            if not marker.exists():  # the first batch kills its actor; Ray restarts it and reruns the batch
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    paths = [p for name in ("low", "whistle") for p in clips[name]]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF nonsense")
    embed_local(embedder, paths, tmp_path / "local", progress=False)
    with pytest.raises(AudioDecodeError, match="broken.wav"):  # on_error="fail": raised once the rest is written
        embed_with_ray(embedder, [*paths[:3], bad, *paths[3:]], tmp_path / "ray", num_workers=2, batch_size=4,
                       progress=False, actor=CrashOnce)
    assert marker.exists()
    fp = embedder_fingerprint(embedder)
    a, b = EmbeddingCache(tmp_path / "local", fp), EmbeddingCache(tmp_path / "ray", fp)
    assert len(b) == len(paths) and all(torch.equal(a.get(audio_digest(p)), b.get(audio_digest(p))) for p in paths)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("learner", sorted(MERGEABLE))
def test_sharded_learning_equals_one_process(ray_cluster, clips, embedder, learner):
    from earmark.distributed.ray_engine import learn_with_ray

    local, sharded = fresh(embedder, learner), fresh(embedder, learner)
    for m in (local, sharded):
        m.learn(clips["low"][:3], "low")  # an earlier session: the model knows a label already
    paths, labels = request(clips)
    want = local.learn(paths, labels)
    got = learn_with_ray(sharded, paths, labels, num_workers=2, shard_size=4)
    assert got["shards"] == 4 and got["learned"] == want["learned"] and got["labels"] == want["labels"]
    assert got["new"] == want["new"]
    assert sharded.labels == local.labels and sharded.counts() == local.counts()
    assert same_journal(sharded.journal, local.journal)
    assert_same_learner(sharded.learner, local.learner)
    X = local.embed(local.decode(paths).waves)
    a, b = sharded.learner._checked_scores(X), local.learner._checked_scores(X)
    assert float((a - b).norm() / b.norm()) < 1e-9
    sharded.forget(files=paths[:2])  # the journal is the one learned: clips can be forgotten exactly
    local.forget(files=paths[:2])
    a, b = sharded.learner._checked_scores(X), local.learner._checked_scores(X)
    assert float((a - b).norm() / b.norm()) < 1e-9


def test_a_killed_worker_is_rerun_and_nothing_is_counted_twice(ray_cluster, clips, embedder, tmp_path):
    from earmark.distributed.ray_engine import fit_shard, learn_with_ray

    marker = tmp_path / "crashed-once"

    def crash_first_attempt(*args, **kwargs):
        if not marker.exists():  # the first task to start dies hard, mid-job; its retry finds the marker
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return fit_shard(*args, **kwargs)

    local, sharded = fresh(embedder, "analytic"), fresh(embedder, "analytic")
    paths, labels = request(clips)
    local.learn(paths, labels)
    report = learn_with_ray(sharded, paths, labels, num_workers=2, shard_size=3, max_retries=2,
                            shard_fn=crash_first_attempt)
    assert marker.exists() and report["learned"] == len(paths)
    assert sharded.counts() == local.counts() and same_journal(sharded.journal, local.journal)
    assert_same_learner(sharded.learner, local.learner)


def test_sharded_learning_refuses_what_one_process_refuses(ray_cluster, clips, embedder, tmp_path):
    from earmark.distributed.ray_engine import learn_with_ray

    model = fresh(embedder, "ncm")
    model.learn(clips["low"][:2], "low")
    with pytest.raises(ModelError, match="already learned"):
        learn_with_ray(model, [clips["mid"][0], clips["low"][1]], ["mid", "low"], num_workers=2, shard_size=1)
    with pytest.raises(ModelError, match="given twice"):
        learn_with_ray(model, [clips["mid"][0], clips["mid"][0]], "mid", num_workers=2, shard_size=1)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF nonsense")
    with pytest.raises(AudioDecodeError, match="broken.wav"):
        learn_with_ray(model, [clips["mid"][0], bad], "mid", num_workers=2, shard_size=1)
    assert model.counts() == {"low": 2} and len(model.journal) == 2  # nothing was learned
    with pytest.raises(ModelError, match="'whistle'"):  # a label left with no valid clip: nothing learned
        learn_with_ray(model, [clips["mid"][0], bad], ["mid", "whistle"], num_workers=2, shard_size=1,
                       on_error="skip")
    report = learn_with_ray(model, [clips["mid"][0], bad, clips["mid"][1]], "mid", num_workers=2, shard_size=1,
                            on_error="skip")
    assert report["learned"] == 2 and [s["file"] for s in report["skipped"]] == [str(bad)]
    twin = model.clone()
    want = twin.learn([clips["low"][0], clips["low"][3]], "low", on_error="skip")  # one clip learned before
    got = learn_with_ray(model, [clips["low"][0], clips["low"][3]], "low", num_workers=2, shard_size=1,
                         on_error="skip")
    assert got["learned"] == want["learned"] == 1 and got["skipped"] == want["skipped"]
    assert "already learned as 'low'" in got["skipped"][0]["reason"]
    teen = fresh(embedder, "teen")
    with pytest.raises(ModelError, match="cannot merge.*analytic, lda, ncm, ranpac"):
        learn_with_ray(teen, clips["mid"][:2], "mid")


# ----------------------------------------------------------------------------- the command line


def test_cli_embed_and_learn_with_ray_equal_local(ray_cluster, clips, embedder, tmp_path, capsys):
    folder = clips["low"][0].parent.parent
    base = fresh(embedder, "analytic")
    base.save(tmp_path / "a")
    base.save(tmp_path / "b")
    assert main(["embed", "--engine", "ray", "--num-workers", "2", "--folder", str(folder), "--model",
                 str(tmp_path / "a"), "-o", str(tmp_path / "cache-ray"), "--no-progress"]) == 0
    assert "24 computed" in capsys.readouterr().out
    assert main(["embed", "--folder", str(folder), "--model", str(tmp_path / "a"), "-o", str(tmp_path / "cache"),
                 "--no-progress"]) == 0
    fp = Model.load(tmp_path / "a").embedder.digest
    a, b = EmbeddingCache(tmp_path / "cache", fp), EmbeddingCache(tmp_path / "cache-ray", fp)
    assert len(a) == len(b) == 24 and all(torch.equal(a.get(audio_digest(p)), b.get(audio_digest(p)))
                                          for name in FREQS for p in clips[name])
    assert main(["learn", str(tmp_path / "a"), "--folder", str(folder)]) == 0
    assert main(["learn", str(tmp_path / "b"), "--folder", str(folder), "--engine", "ray", "--num-workers", "2"]) == 0
    local, sharded = Model.load(tmp_path / "a"), Model.load(tmp_path / "b")
    assert same_journal(sharded.journal, local.journal)
    assert_same_learner(sharded.learner, local.learner)
    assert sharded.history[-1]["engine"] == "ray"


def test_merge_of_two_sites_learned_on_ray_equals_one_model_trained_on_both(ray_cluster, clips, embedder, tmp_path):
    from earmark.distributed.ray_engine import learn_with_ray

    site_a, site_b, both = (fresh(embedder, "lda") for _ in range(3))
    a_paths, a_labels = clips["low"][:4] + clips["mid"][:3], ["low"] * 4 + ["mid"] * 3
    b_paths, b_labels = clips["mid"][3:6] + clips["whistle"][:4], ["mid"] * 3 + ["whistle"] * 4
    learn_with_ray(site_a, a_paths, a_labels, num_workers=2, shard_size=3)
    learn_with_ray(site_b, b_paths, b_labels, num_workers=2, shard_size=3)
    both.learn(a_paths + b_paths, a_labels + b_labels)
    site_a.save(tmp_path / "a")
    site_b.save(tmp_path / "b")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c")]) == 0
    merged = Model.load(tmp_path / "c")
    assert merged.counts() == both.counts() and same_journal(merged.journal, both.journal)
    assert_same_learner(merged.learner, both.learner)


def test_without_ray_the_commands_say_how_to_install_it(monkeypatch, tmp_path, capsys, clips, embedder):
    fresh(embedder, "ncm").save(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as when it is missing
    monkeypatch.setitem(sys.modules, "ray.data", None)
    folder = clips["low"][0].parent.parent
    assert main(["embed", "--engine", "ray", "--folder", str(folder), "--model", str(tmp_path / "m"), "-o",
                 str(tmp_path / "cache")]) == 2
    assert "pip install 'earmark[ray]'" in capsys.readouterr().err
    assert main(["learn", str(tmp_path / "m"), "--folder", str(folder), "--engine", "ray"]) == 2
    assert "pip install 'earmark[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and Model.load(tmp_path / "m").journal == []
    from earmark.distributed import EngineUnavailableError
    from earmark.distributed.ray_engine import learn_with_ray

    with pytest.raises(EngineUnavailableError, match="earmark\\[ray\\]"):
        learn_with_ray(Model.load(tmp_path / "m"), clips["low"][:2], "low")
