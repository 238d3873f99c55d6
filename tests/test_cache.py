import numpy as np
import pytest
import soundfile as sf
import torch

from earmark.audio import AudioConfig, AudioDecodeError
from earmark.encoders.cache import EmbeddingCache, audio_digest, embed_paths, embedder_fingerprint
from earmark.encoders.config import EncoderConfig
from earmark.encoders.embedder import AudioEmbedder

SMALL = EncoderConfig(embed_dim=32, depth=2)


@pytest.fixture
def embedder():
    torch.manual_seed(0)
    return AudioEmbedder(SMALL, AudioConfig(clip_seconds=0.5)).eval()


def _clips(tmp_path, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = tmp_path / f"clip {i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        paths.append(p)
    return paths


def test_digest_follows_content_not_name(tmp_path):
    a, b = _clips(tmp_path, 2)
    copy = tmp_path / "renamed.wav"
    copy.write_bytes(a.read_bytes())
    assert audio_digest(a) == audio_digest(copy) != audio_digest(b)


def test_embeddings_are_computed_once_and_match(tmp_path, embedder):
    paths = _clips(tmp_path, 5)
    cache = EmbeddingCache(tmp_path / "cache", embedder_fingerprint(embedder))
    first = embed_paths(embedder, paths, cache, batch_size=2, progress=False)
    assert first.computed == 5 and first.embeddings.shape == (5, 32)
    # a new cache object reads what the first wrote to disk
    again = embed_paths(embedder, paths, EmbeddingCache(tmp_path / "cache", embedder_fingerprint(embedder)),
                        progress=False)
    assert again.computed == 0
    assert torch.allclose(again.embeddings, first.embeddings)
    direct = embedder.embed(np.stack([sf.read(p, dtype="float32")[0] for p in paths]))
    assert torch.allclose(direct, first.embeddings, atol=1e-5)


def test_another_encoder_does_not_hit_the_cache(tmp_path, embedder):
    paths = _clips(tmp_path, 2)
    embed_paths(embedder, paths, EmbeddingCache(tmp_path / "c", embedder_fingerprint(embedder)), progress=False)
    torch.manual_seed(1)
    other = AudioEmbedder(SMALL, AudioConfig(clip_seconds=0.5))
    assert embedder_fingerprint(other) != embedder_fingerprint(embedder)
    res = embed_paths(other, paths, EmbeddingCache(tmp_path / "c", embedder_fingerprint(other)), progress=False)
    assert res.computed == 2


def test_bad_file_stops_the_run_but_keeps_finished_work(tmp_path, embedder):
    paths = _clips(tmp_path, 4)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    paths.insert(3, bad)
    cache = EmbeddingCache(tmp_path / "c", embedder_fingerprint(embedder))
    with pytest.raises(AudioDecodeError, match="bad.wav"):
        embed_paths(embedder, paths, cache, batch_size=2, progress=False)
    fresh = EmbeddingCache(tmp_path / "c", embedder_fingerprint(embedder))
    assert len(fresh) == 2  # the first batch reached the disk before the failing one
    res = embed_paths(embedder, paths, fresh, batch_size=2, on_error="skip", progress=False)
    assert res.computed == 2  # resumed: only the clips not done before
    assert [p for p, _ in res.skipped] == [str(bad)]
    assert "cannot be decoded" in res.skipped[0][1]
    assert list(res.kept) == [0, 1, 2, 4]


def test_cache_compacts_many_shards(tmp_path):
    cache = EmbeddingCache(tmp_path, "f" * 64, max_shards=3)
    for i in range(5):
        cache.add([f"k{i}"], torch.full((1, 4), float(i)))
    reopened = EmbeddingCache(tmp_path, "f" * 64, max_shards=3)
    assert len(reopened) == 5
    assert len(list(reopened.dir.glob("shard-*.safetensors"))) == 1
    assert torch.equal(reopened.get("k3"), torch.full((4,), 3.0))


def test_embedder_checkpoint_round_trip(tmp_path, embedder):
    embedder.normalizer.fit(torch.randn(2, 128, 10) * 3 + 1)
    digest = embedder.save(tmp_path / "e.safetensors")
    loaded = AudioEmbedder.load(tmp_path / "e.safetensors")
    assert loaded.digest == digest == embedder_fingerprint(loaded)
    wave = torch.randn(2, 8000) * 0.1
    assert torch.allclose(loaded.embed(wave), embedder.embed(wave), atol=1e-6)
    assert loaded.audio_config == embedder.audio_config
