"""ONNX export of an embedder plus a closed-form learner head: fixed-length waveforms in, class scores out.

:func:`export_onnx` writes one ONNX file whose input is a float32 batch of waveforms ``(batch, samples)``
at the embedder's sample rate and clip length (the batch axis is dynamic) and whose outputs are

* ``scores``: the learner's ``decision_function``, float32 ``(batch, n_classes)``, columns in ``classes_`` order;
* ``proba``: its ``predict_proba`` (softmax of the learner's logits), float32 ``(batch, n_classes)``.

The class labels (``classes_``) are stored in the model's metadata (``classes``, a JSON list) and returned.

How the graph is made exportable, without changing what normal inference computes (nothing is patched:
the export runs on wrappers that share the embedder's tensors):

* Log-mel: ``torch.fft.rfft`` has no ONNX translation in the TorchScript exporter and relies on the DFT
  op in the dynamo one, so the export computes the same spectrum as a matmul with the windowed real DFT
  basis (cos and sin of the n_fft-point DFT on the window's samples: the zero padding to n_fft adds
  nothing), and the frames with a constant gather. The waveform length is therefore fixed.
* Mamba: the encoder's scans are Python loops inside custom autograd functions. The export uses
  :func:`export_scan`, a chunked scan of plain tensor ops (a closed form within chunks of 16 steps and a
  short unrolled loop over chunks), which the exporter turns into a compact graph; the ``reference``
  scan unrolled step by step exported too, but took ~3 minutes and ~20 MB for the ``fast`` preset.
  The decays within a chunk are formed in float64 (no cancellation in the cumulative sums).
* Heads: :func:`scoring_module` rebuilds the learner's scores from its state as a plain module, per
  learner family (:data:`HEADS`): ``ncm``/``teen`` cosine to the prototypes, ``lda``/``fetril`` linear,
  ``analytic``/``ranpac`` ReLU random expansion then linear, ``dsal`` both streams. The heads compute in
  float64 as the learners do (ONNX Runtime runs float64 MatMul on CPU); the outputs are cast to float32.

``torch.onnx.export`` with the dynamo exporter (torch.export, the default in torch 2.13) is used;
the TorchScript exporter (``dynamo=False``) fails on ``rms_norm`` and ``rfft``. ``onnx`` and
``onnxscript`` are needed to export, ``onnxruntime`` for ``check=True`` (``pip install earmark[onnx]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earmark.audio.features import LogMel, prepare_frames
from earmark.encoders.embedder import AudioEmbedder
from earmark.encoders.mamba import MambaMixer, _Branch, _front
from earmark.learners.base import IncrementalLearner
from earmark.registry import Registry

__all__ = ["HEADS", "OPSET", "ExportError", "export_onnx", "export_scan", "exportable_learners", "scoring_module"]

OPSET = 18
SCAN_CHUNK = 16


class ExportError(RuntimeError):
    """The export failed, or the exported model disagrees with PyTorch by more than the tolerance."""


# ----------------------------------------------------------------------------- heads


HEADS: Registry[Callable[[IncrementalLearner], nn.Module]] = Registry("exportable learner head")


def exportable_learners() -> list[str]:
    """Names of the learners :func:`scoring_module` (and so :func:`export_onnx`) can express."""
    return HEADS.names()


def scoring_module(learner: IncrementalLearner) -> nn.Module:
    """A plain module ``embeddings (n, d) -> (scores, proba logits)`` built from a fitted learner's state.

    ``scores`` equals ``learner.decision_function`` (float64 before the cast), ``proba logits`` the
    logits whose softmax is ``predict_proba``. The module holds copies of the state, so later
    ``partial_fit`` calls do not change it. Raises ValueError for a learner without a head here.
    """
    name = getattr(learner, "name", "")
    if name not in HEADS:
        raise ValueError(
            f"learner {name or type(learner).__name__!r} cannot be exported to ONNX: only closed-form heads "
            f"on embeddings can; exportable learners: {', '.join(exportable_learners())}"
        )
    learner._require_fitted()
    return HEADS.get(name)(learner)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64).clone()


class CosineHead(nn.Module):
    """``cos(x, p_c)`` against fixed prototypes; proba logits = scores / temperature."""

    def __init__(self, prototypes: Tensor, temperature: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", F.normalize(_f64(prototypes), dim=1))
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = F.normalize(x.to(torch.float64), dim=1) @ self.prototypes.T
        return s, s / self.temperature


class LinearHead(nn.Module):
    """``x W + b`` (W ``(d, C)``), on ``x / |x|`` when ``normalize``; proba logits = scores."""

    def __init__(self, weight: Tensor, bias: Tensor | None, normalize: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", _f64(weight))
        zero = torch.zeros(weight.shape[1], dtype=torch.float64)
        self.register_buffer("bias", zero if bias is None else _f64(bias))
        self.normalize = normalize

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(torch.float64)
        if self.normalize:
            x = F.normalize(x, dim=1)
        s = x @ self.weight + self.bias
        return s, s


class RandomFeatureHead(nn.Module):
    """``act(x P) W`` summed over streams (``P`` None: no projection); proba logits = scores.

    One stream (ReLU) is analytic / RanPAC; DS-AL adds ``C * act_comp(x P) W_comp``.
    """

    _ACTS: dict[str, Callable[[Tensor], Tensor]] = {
        "relu": torch.relu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "identity": lambda z: z,
    }

    def __init__(self, projection: Tensor | None, streams: list[tuple[str, float, Tensor]]) -> None:
        super().__init__()
        self.register_buffer("projection", None if projection is None else _f64(projection))
        self.acts = [act for act, _, _ in streams]
        self.ratios = [float(r) for _, r, _ in streams]
        for i, (_, _, w) in enumerate(streams):
            self.register_buffer(f"weight{i}", _f64(w))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = x.to(torch.float64)
        if self.projection is not None:
            z = z @ self.projection
        s = None
        for i, (act, ratio) in enumerate(zip(self.acts, self.ratios, strict=True)):
            part = self._ACTS[act](z) @ getattr(self, f"weight{i}")
            if ratio != 1.0:
                part = ratio * part
            s = part if s is None else s + part
        return s, s


def _projection(buffer: nn.Module) -> Tensor | None:
    return buffer.projection if buffer.size > 0 else None


@HEADS.register("ncm")
def _ncm_head(learner: Any) -> nn.Module:
    return CosineHead(learner.means_, learner.config.temperature)


@HEADS.register("teen")
def _teen_head(learner: Any) -> nn.Module:
    return CosineHead(learner.prototypes_, learner.config.temperature)


@HEADS.register("lda")
def _lda_head(learner: Any) -> nn.Module:
    return LinearHead(learner.weights_, learner.bias_)


@HEADS.register("fetril")
def _fetril_head(learner: Any) -> nn.Module:
    return LinearHead(learner.weight.T, learner.bias, normalize=learner.config.l2_normalize)


@HEADS.register("analytic")
def _analytic_head(learner: Any) -> nn.Module:
    return RandomFeatureHead(_projection(learner.buffer), [("relu", 1.0, learner.weights_)])


@HEADS.register("ranpac")
def _ranpac_head(learner: Any) -> nn.Module:
    return RandomFeatureHead(_projection(learner.buffer), [("relu", 1.0, learner.weights_)])


@HEADS.register("dsal")
def _dsal_head(learner: Any) -> nn.Module:
    main = ("relu" if learner.buffer.size > 0 else "identity", 1.0, learner.weights_)
    comp = (learner.config.comp_activation, learner.config.compensation_ratio, learner.comp_weights_)
    return RandomFeatureHead(_projection(learner.buffer), [main, comp])


# ----------------------------------------------------------------------------- encoder


def export_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    reverse: tuple[bool, ...],
    chunk: int = SCAN_CHUNK,
) -> Tensor:
    """The grouped selective scan (as :func:`earmark.encoders.scan.selective_scan`) in plain tensor ops.

    u, delta (G, batch, L, E), A (G, E, N), B, C (G, batch, L, N), D (G, E); ``reverse`` one flag per group.
    Time is padded to whole chunks (delta 0: the state passes unchanged, outputs dropped). Within a chunk
    ``h_t = sum_{s<=t} exp(S_t - S_s) x_s + exp(S_t) h_start`` with ``S`` the float64 cumulative sum of
    ``delta * A`` (all exponents <= 0), then an unrolled loop over chunks carries the state. Memory is
    ``batch * L * chunk * E * N`` per group. Float32 out (float64 if u is float64).
    """
    out = []
    for g, rev in enumerate(reverse):
        ug, dg, bg, cg = u[g], delta[g], B[g], C[g]
        if rev:
            ug, dg, bg, cg = ug.flip(1), dg.flip(1), bg.flip(1), cg.flip(1)
        y = _scan_one(ug, dg, A[g], bg, cg, chunk)
        if D is not None:
            y = y + D[g].to(y.dtype) * ug.to(y.dtype)
        out.append(y.flip(1) if rev else y)
    return torch.stack(out)


def _scan_one(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> Tensor:
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    bsz, length, e = u.shape
    n = A.shape[-1]
    lc = max(1, min(chunk, length))
    nc = -(-length // lc)
    pad = nc * lc - length
    u, delta, B, C = (t.to(dtype) for t in (u, delta, B, C))
    if pad:
        u, delta, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (u, delta, B, C))
    shape = (bsz, nc, lc)
    dA = delta.to(torch.float64).view(*shape, e, 1) * A.to(torch.float64).view(1, 1, 1, e, n)
    S = torch.cumsum(dA, dim=2)  # (b, nc, lc, E, N), <= 0
    x = (delta * u).view(*shape, e, 1) * B.view(*shape, 1, n)  # (b, nc, lc, E, N)
    seg = S[:, :, :, None] - S[:, :, None, :]  # (b, nc, t, s, E, N): S_t - S_s
    causal = torch.ones(lc, lc, dtype=torch.bool, device=u.device).tril().view(1, 1, lc, lc, 1, 1)
    decay = torch.where(causal, seg, torch.full_like(seg, -math.inf)).exp().to(dtype)
    h = (decay * x[:, :, None]).sum(3)  # (b, nc, lc, E, N): the chunk's own contribution
    into = S.exp().to(dtype)  # decay from the chunk's start to each step
    carried, states = None, []
    for c in range(nc):  # state entering each chunk
        states.append(carried)
        last = h[:, c, -1]
        carried = last if carried is None else into[:, c, -1] * carried + last
    if nc > 1:
        zero = torch.zeros_like(h[:, 0, 0])
        enter = torch.stack([zero if s is None else s for s in states], 1)  # (b, nc, E, N)
        h = h + into * enter[:, :, None]
    y = (h * C.view(*shape, 1, n)).sum(-1).reshape(bsz, nc * lc, e)
    return y[:, :length]


class _ExportMixer(nn.Module):
    """A MambaMixer's inference forward with :func:`export_scan`; shares the mixer's parameters."""

    def __init__(self, mixer: MambaMixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, h: Tensor) -> Tensor:
        m = self.mixer
        x, z = m.in_proj(h).chunk(2, dim=-1)
        dirs = m.directions()
        branch = _Branch(tuple(d.reverse for d in dirs), m.config.rank, m.config.d_state)
        u, delta, a, b, c, skip = _front(branch, x, [p for d in dirs for p in d.params()])
        y = export_scan(u, delta, a, b, c, skip, branch.reverse).to(x.dtype)
        y = y[0] if y.shape[0] == 1 else y.mean(0)
        return m.out_proj(y * F.silu(z))


@contextlib.contextmanager
def _export_mixers(encoder: nn.Module):
    """Within the block, every MambaMixer in ``encoder`` is replaced by its :class:`_ExportMixer`."""
    swapped = [
        (parent, name, child)
        for parent in encoder.modules()
        for name, child in parent.named_children()
        if isinstance(child, MambaMixer)
    ]
    for parent, name, child in swapped:
        setattr(parent, name, _ExportMixer(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class DFTLogMel(nn.Module):
    """:class:`~earmark.audio.features.LogMel` for a fixed number of samples with the rfft as a matmul."""

    def __init__(self, logmel: LogMel, samples: int) -> None:
        super().__init__()
        c = self.config = logmel.config
        wave_len = max(samples, c.win_length)
        self.pad = wave_len - samples
        frames = c.num_frames(wave_len)
        idx = torch.arange(frames)[:, None] * c.hop_length + torch.arange(c.win_length)[None]
        self.register_buffer("index", idx)
        t = torch.arange(c.win_length, dtype=torch.float64)[:, None]
        k = torch.arange(c.n_fft // 2 + 1, dtype=torch.float64)[None]
        angle = 2 * math.pi * ((t * k) % c.n_fft) / c.n_fft
        w = logmel.window.to(torch.float64)[:, None]
        self.register_buffer("cos", (w * torch.cos(angle)).float())
        self.register_buffer("sin", (w * torch.sin(angle)).float())
        self.register_buffer("fbank", logmel.fbank.T.contiguous().float())

    def forward(self, wave: Tensor) -> Tensor:
        if self.pad:
            wave = F.pad(wave, (0, self.pad))
        frames = prepare_frames(wave[:, self.index], self.config)  # (B, T, win)
        spec = (frames @ self.cos).square() + (frames @ self.sin).square()
        mel = spec @ self.fbank
        return torch.log(mel.clamp_min(self.config.log_floor)).transpose(1, 2)


class ExportModel(nn.Module):
    """waveforms (batch, samples) -> (scores, proba): DFT log-mel, normalizer, encoder, head."""

    def __init__(self, embedder: AudioEmbedder, head: nn.Module, samples: int) -> None:
        super().__init__()
        self.logmel = DFTLogMel(embedder.logmel, samples)
        self.normalizer = embedder.normalizer
        self.encoder = embedder.encoder
        self.head = head

    def forward(self, wave: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.encoder(self.normalizer(self.logmel(wave))).float()
        scores, logits = self.head(emb)
        return scores.float(), torch.softmax(logits, dim=1).float()


# ----------------------------------------------------------------------------- export


def export_onnx(
    embedder: AudioEmbedder,
    learner: IncrementalLearner,
    path: str | os.PathLike,
    *,
    check: bool = True,
    atol: float = 1e-4,
    samples: int | None = None,
    check_waves: Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``path``: an ONNX model from float32 waveforms ``(batch, samples)`` to class scores.

    Input ``wave``: float32 ``(batch, samples)`` at ``embedder.audio_config.sample_rate``; ``samples``
    defaults to the embedder's clip length (required when ``clip_seconds`` is None); the batch axis is
    dynamic. Outputs ``scores`` (``learner.decision_function``) and ``proba`` (``learner.predict_proba``),
    float32 ``(batch, n_classes)``, columns in ``learner.classes_`` order (also in the model metadata).

    ``check``: run the file with onnxruntime on ``check_waves`` (default: 4 seeded random clips, and a
    batch of 1) and compare with ``learner.decision_function(embedder.embed(wave))`` and
    ``predict_proba``; a max abs difference above ``atol`` raises :class:`ExportError` with the figure.

    Returns ``{"path", "input": "waveform", "input_name", "input_shape", "output_names", "output_shape",
    "sample_rate", "classes", "opset", "max_abs_diff", "max_abs_diff_proba", "max_abs_score", "bytes"}``
    (the check figures None without ``check``; ``max_abs_score`` is the largest PyTorch |score|, the
    scale the difference is relative to). Raises ValueError for a learner without an ONNX head (see
    :func:`exportable_learners`) or an unfitted one, FileNotFoundError / NotADirectoryError when the
    output directory does not exist.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"output directory {str(parent)!r} is not a directory")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file path such as model.onnx")
    head = scoring_module(learner)
    if learner.n_features_in_ != embedder.embed_dim:
        raise ValueError(
            f"learner was fitted on {learner.n_features_in_}-dim features, the embedder gives {embedder.embed_dim}"
        )
    if samples is None:
        samples = embedder.audio_config.clip_samples
        if samples is None:
            raise ValueError("the embedder has no fixed clip length (clip_seconds=None); pass samples=")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")

    device = next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    model = ExportModel(embedder, head, samples).to(device).eval()
    example = torch.randn(2, samples, generator=torch.Generator().manual_seed(0)).mul_(0.1).to(device)
    try:
        with torch.no_grad(), _export_mixers(embedder.encoder), _quiet():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=["wave"],
                output_names=["scores", "proba"],
                dynamic_shapes={"wave": {0: torch.export.Dim("batch", min=1, max=65536)}},
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {type(embedder.encoder).__name__}: {exc}") from exc
    finally:
        embedder.train(was_training)
    classes = learner.classes_.tolist()
    program.model.metadata_props["classes"] = json.dumps(classes)
    program.model.metadata_props["sample_rate"] = str(embedder.audio_config.sample_rate)
    program.model.metadata_props["learner"] = learner.name
    program.save(str(path))

    info: dict[str, Any] = {
        "path": str(path),
        "input": "waveform",
        "input_name": "wave",
        "input_shape": ["batch", samples],
        "output_names": ["scores", "proba"],
        "output_shape": ["batch", len(classes)],
        "sample_rate": embedder.audio_config.sample_rate,
        "classes": classes,
        "opset": OPSET,
        "max_abs_diff": None,
        "max_abs_diff_proba": None,
        "max_abs_score": None,
        "bytes": path.stat().st_size,
    }
    if check:
        if check_waves is None:
            g = torch.Generator().manual_seed(1)
            check_waves = torch.randn(4, samples, generator=g) * 0.1
        waves = torch.as_tensor(check_waves, dtype=torch.float32).cpu()
        info["max_abs_diff"], info["max_abs_diff_proba"], info["max_abs_score"] = _check(
            path, embedder, learner, waves
        )
        worst = max(info["max_abs_diff"], info["max_abs_diff_proba"])
        if not worst <= atol:
            raise ExportError(
                f"ONNX model {str(path)!r} differs from PyTorch by {worst:.3g} (scores {info['max_abs_diff']:.3g}, "
                f"proba {info['max_abs_diff_proba']:.3g}), more than atol={atol:g}; the largest |score| is "
                f"{info['max_abs_score']:.3g}: float32 rounding of the embedding grows with the head's weights "
                "(e.g. LDA with little shrinkage on few samples)"
            )
    return info


def _check(path: Path, embedder: AudioEmbedder, learner: IncrementalLearner, waves: Tensor) -> tuple[float, float]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("check=True needs onnxruntime: pip install 'earmark[onnx]'") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = worst_p = scale = 0.0
    for batch in (waves, waves[:1]):
        scores, proba = session.run(["scores", "proba"], {"wave": batch.numpy()})
        emb = embedder.embed(batch)
        want = learner.decision_function(emb).cpu().numpy()
        want_p = learner.predict_proba(emb).cpu().numpy()
        if scores.shape != want.shape:
            raise ExportError(f"ONNX scores have shape {scores.shape}, PyTorch {want.shape}")
        worst = max(worst, float(np.abs(scores - want).max()))
        worst_p = max(worst_p, float(np.abs(proba - want_p).max()))
        scale = max(scale, float(np.abs(want).max()))
    return worst, worst_p, scale


@contextlib.contextmanager
def _quiet():
    """The exporter prints its progress and warns about torchvision ops: keep the caller's output clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
