"""ONNX export: waveform -> scores parity with PyTorch (onnxruntime), refusals and path errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from earmark.encoders.embedder import AudioEmbedder  # noqa: E402
from earmark.encoders.scan import selective_scan  # noqa: E402
from earmark.export import ExportError, export_onnx, export_scan, exportable_learners, scoring_module  # noqa: E402
from earmark.learners import make_learner  # noqa: E402

SAMPLES = 32000  # the presets' 2 s clips at 16 kHz


def _clips(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, SAMPLES, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.fixture(scope="module")
def fast() -> AudioEmbedder:
    torch.manual_seed(0)
    return AudioEmbedder("fast").eval()


def _fitted(embedder: AudioEmbedder, name: str, **config) -> torch.nn.Module:
    learner = make_learner(name, **config)
    learner.partial_fit(embedder.embed(_clips(12, 1)), torch.tensor([5, 2, 9] * 4))
    return learner


def test_export_scan_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    G, b, L, E, N = 2, 3, 37, 8, 4
    u, delta = torch.randn(G, b, L, E, generator=g), torch.rand(G, b, L, E, generator=g)
    A = -5 * torch.rand(G, E, N, generator=g)
    B, C, D = torch.randn(G, b, L, N, generator=g), torch.randn(G, b, L, N, generator=g), torch.randn(G, E, generator=g)
    for rev in ((False, True), (True, False)):
        want = selective_scan(u, delta, A, B, C, D, impl="reference", reverse=rev)
        for chunk in (1, 5, 16, 64):
            torch.testing.assert_close(export_scan(u, delta, A, B, C, D, rev, chunk=chunk), want, atol=1e-5, rtol=1e-5)


# One full export per head family costs ~40 s of CPU each; the heads themselves are checked against the
# learners in test_heads_match_learners, so the ONNX round trip runs for analytic here (ReLU expansion +
# ridge: the most graph) and for ncm through the CLI in tests/test_cli_model.py.
@pytest.mark.slow
@pytest.mark.parametrize(("name", "config"), [("analytic", {"buffer_size": 256})])
def test_parity_fast_mamba(fast: AudioEmbedder, tmp_path, name: str, config: dict) -> None:
    learner = _fitted(fast, name, **config)
    path = tmp_path / f"{name}.onnx"
    info = export_onnx(fast, learner, path, check_waves=_clips(5, 2))
    assert info["input"] == "waveform" and info["input_shape"] == ["batch", SAMPLES]
    assert info["classes"] == [5, 2, 9] and info["output_shape"] == ["batch", 3]
    assert info["max_abs_diff"] <= 1e-4 and info["max_abs_diff_proba"] <= 1e-4
    assert info["bytes"] == path.stat().st_size > 0
    model = onnx.load(str(path))
    assert json.loads({p.key: p.value for p in model.metadata_props}["classes"]) == [5, 2, 9]


@pytest.mark.slow
def test_parity_ast(tmp_path) -> None:
    torch.manual_seed(0)
    embedder = AudioEmbedder("ast-fast").eval()
    info = export_onnx(embedder, _fitted(embedder, "ncm"), tmp_path / "ast.onnx")
    assert info["max_abs_diff"] <= 1e-4


def test_heads_match_learners(fast: AudioEmbedder) -> None:
    """Every registered head reproduces its learner's scores and proba logits in float64 (no ONNX)."""
    X = fast.embed(_clips(12, 1))
    y = torch.tensor([5, 2, 9] * 4)
    small = {"analytic": {"buffer_size": 64}, "ranpac": {"projection_size": 64}, "dsal": {"buffer_size": 64}}
    for name in exportable_learners():
        learner = make_learner(name, **small.get(name, {})).partial_fit(X[:6], y[:6]).partial_fit(X[6:], y[6:] + 1)
        scores, logits = scoring_module(learner)(X)
        torch.testing.assert_close(scores.float(), learner.decision_function(X), msg=name)
        torch.testing.assert_close(torch.softmax(logits, 1).float(), learner.predict_proba(X), msg=name)


def test_refuses_unexportable_learner(fast: AudioEmbedder, tmp_path) -> None:
    learner = make_learner("replay")
    with pytest.raises(ValueError, match="cannot be exported.*exportable learners: .*analytic"):
        export_onnx(fast, learner, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_refuses_unfitted_learner(fast: AudioEmbedder, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="not seen any data"):
        export_onnx(fast, make_learner("ncm"), tmp_path / "x.onnx")


def test_bad_output_paths(fast: AudioEmbedder, tmp_path) -> None:
    learner = _fitted(fast, "ncm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(fast, learner, tmp_path / "missing" / "m.onnx")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        export_onnx(fast, learner, tmp_path / "file" / "m.onnx")
    with pytest.raises(IsADirectoryError):
        export_onnx(fast, learner, tmp_path)


def test_parity_failure_raises_with_figure(fast: AudioEmbedder, tmp_path, monkeypatch) -> None:
    import earmark.export as ex

    learner = _fitted(fast, "ncm")
    monkeypatch.setattr(ex, "_check", lambda *a: (0.5, 0.0, 1.0))
    with pytest.raises(ExportError, match=r"differs from PyTorch by 0\.5"):  # a 0.1 s clip exports quickly
        export_onnx(fast, learner, tmp_path / "m.onnx", samples=1600, atol=1e-4)
