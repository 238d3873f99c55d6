"""The HTTP API (FastAPI): classify, learn, forget, inspect; health, metrics and the web page.

Every error is JSON ``{"error": "..."}``. What a client sends can earn a 4xx, never a 500: bad audio
400 (with the decoder's reason, naming the client's filename), missing token 401, wrong token or
read-only server 403, unknown label 404, too large 413, not multipart / not audio 415, full queue 429;
503 while the model loads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import tempfile
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from earmark.service.config import ServiceConfig
from earmark.service.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from earmark.service.state import Classifier, ClassifyJob, ClientError, ModelHolder, Snapshot, WriteJob
from earmark.service.uploads import MemoryBudget, UploadError, Uploads, receive_uploads

log = logging.getLogger("earmark.service")
STATIC = Path(__file__).parent / "static"
# Declared types that are certainly not audio (many clients send application/octet-stream or nothing).
NOT_AUDIO_PREFIXES = ("text/", "image/", "font/", "application/json", "application/xml", "application/pdf",
                      "application/zip", "application/javascript", "application/x-www-form-urlencoded")

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "description": "audio files (wav, flac, ogg, mp3); any part name works"}},
        }}},
    }
}
ERRORS = {s: {"description": d, "content": {"application/json": {"example": {"error": "..."}}}} for s, d in {
    400: "bad audio or parameters", 413: "too large", 415: "not a multipart upload of audio", 503: "model loading",
}.items()}
WRITE_ERRORS = {**ERRORS, 401: {"description": "missing bearer token"},
                403: {"description": "wrong token, or read-only server"}, 404: {"description": "unknown label"},
                429: {"description": "learn queue full"}}


def _model_api():
    import earmark.model as m

    return m


def client_error(exc: BaseException, uploads: Uploads | None = None) -> ClientError | None:
    """The 4xx a model-side exception stands for, with temp paths told back as the client's filenames."""
    from earmark.audio import AudioDecodeError, AudioTooLongError

    api = _model_api()
    clean = uploads.clean if uploads is not None else (lambda s: s)
    if isinstance(exc, ClientError):
        return exc
    if isinstance(exc, AudioDecodeError):
        name = uploads.original(exc.path) if uploads is not None else exc.path.name
        return ClientError(413 if isinstance(exc, AudioTooLongError) else 400, f"{name}: {clean(exc.reason)}")
    unknown = getattr(api, "UnknownLabelError", None)
    if unknown is not None and isinstance(exc, unknown):
        return ClientError(404, clean(_message(exc)))
    if isinstance(exc, api.ModelError | ValueError):
        return ClientError(400, clean(_message(exc)))
    return None


def json_safe(obj: Any) -> Any:
    """Strict JSON: non-finite floats (e.g. an uncalibrated threshold of -inf) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def check_label(name: str) -> str:
    if not name.strip() or name != name.strip():
        raise ClientError(400, "a label name must be non-empty, without leading or trailing spaces")
    if len(name) > 64:
        raise ClientError(400, "a label name is at most 64 characters")
    if not name.isprintable() or any(c in name for c in "/\\"):
        raise ClientError(400, "a label name must be printable, without slashes")
    return name


def precheck(uploads: Uploads) -> None:
    """What can be refused without reading the files: none sent, empty, declared as not audio."""
    if not uploads.files:
        raise ClientError(400, "no audio files in the request (send them as multipart/form-data file parts)")
    for f in uploads.files:
        if f.size == 0:
            raise ClientError(400, f"{f.name}: empty file (0 bytes)")
        if f.content_type.startswith(NOT_AUDIO_PREFIXES):
            raise ClientError(415, f"{f.name}: content type {f.content_type} is not audio")


def _top(pred, k: int) -> list[dict]:
    return [{"label": name, "probability": json_safe(round(float(p), 6))} for name, p in list(pred.top)[:k]]


def format_predictions(preds: list, top_k: int, windowed: bool) -> list[dict]:
    """Predictions carry the client's filenames (``names=``); windows of one file come consecutively."""
    if not windowed:
        return [{"file": p.file, "top": _top(p, top_k)} for p in preds]
    out: list[dict] = []
    last = None
    for p in preds:
        if not out or p.file != out[-1]["file"] or (last is not None and p.start <= last):
            out.append({"file": p.file, "windows": []})
        out[-1]["windows"].append({"start": p.start, "end": p.end, "top": _top(p, top_k)})
        last = p.start
    return out


def _write_tone(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    return path


def create_app(config: ServiceConfig, *, locked: bool = False) -> FastAPI:
    """The ASGI app. In mutating mode it takes the model directory's writer lock for its lifetime unless
    the caller already holds it (``locked=True``, as `earmark serve` does, to fail before binding a port)."""
    config.check()
    path = Path(config.model)
    holder = ModelHolder(path, config.learn_queue, compact_every=config.compact_every,
                         compact_idle=config.compact_idle,
                         loader=lambda: _model_api().Model.load(path, device=config.device))
    metrics = Metrics(lambda: holder.snapshot.metrics() if holder.snapshot else None)
    token = (config.token or "").encode()
    upload_budget = MemoryBudget(config.upload_memory_total)  # uploads in memory across requests
    runtime: dict[str, Any] = {}

    def load() -> None:
        try:
            if config.load_delay > 0:
                time.sleep(config.load_delay)
            api = _model_api()
            model = api.Model.load(path, device=config.device)
            if model.labels:  # first call pays lazy initialisation: do it before saying ready
                with tempfile.TemporaryDirectory(prefix="earmark-warm-", dir=config.temp_dir) as tmp:
                    model.predict([str(_write_tone(Path(tmp) / "warmup.wav"))], top_k=1)
            snap = holder.install(model)
            log.info("model %s loaded: %d labels, version %d", path, len(snap.counts), snap.version)
        except BaseException as exc:  # reported by /health/ready; the process stays up to say so
            holder.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", path, holder.load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        torch.set_num_threads(config.torch_threads)
        lock = None
        if config.mutating and not locked:
            lock = _model_api().Model.lock(path)
            lock.__enter__()
        holder.start()
        runtime["classifier"] = Classifier(holder, config.classify_workers, config.classify_batch,
                                           config.classify_queue, config.window_workers)
        threading.Thread(target=load, name="earmark-load", daemon=True).start()
        try:
            yield
        finally:
            runtime["classifier"].close()
            holder.close()  # waits for a write in progress: it finishes and is saved
            if lock is not None:
                lock.__exit__(None, None, None)

    app = FastAPI(
        title="earmark", version="0.1.0", lifespan=lifespan, redoc_url=None,
        description="Teach a sound classifier new sounds over time; classify, learn, forget over HTTP. "
                    "Mutating endpoints need `Authorization: Bearer <token>`.",
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.config = config
    app.state.holder = holder
    app.state.metrics = metrics

    # -- errors: always {"error": "..."}
    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError):
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return JSONResponse({"error": exc.message}, exc.status, headers={"Connection": "close"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, 400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error (logged by the server)"}, 500)

    # -- helpers
    def ready() -> Snapshot:
        snap = holder.snapshot
        if snap is None:
            msg = f"the model failed to load ({holder.load_error})" if holder.load_error else "the model is loading"
            raise ClientError(503, msg, {"Retry-After": "1"})
        return snap

    def authorize(request: Request) -> None:
        if config.read_only:
            raise ClientError(403, "this server is read-only (started with --read-only)")
        header = request.headers.get("authorization")
        if not header:
            raise ClientError(401, "missing bearer token: send Authorization: Bearer <token>",
                              {"WWW-Authenticate": 'Bearer realm="earmark"'})
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ClientError(401, "the Authorization header must be 'Bearer <token>'",
                              {"WWW-Authenticate": 'Bearer realm="earmark", error="invalid_request"'})
        if not hmac.compare_digest(given.strip().encode(), token):
            raise ClientError(403, "wrong bearer token")

    async def receive(request: Request) -> Uploads:
        """The request's uploads, prechecked; on a refusal the temporary files are removed at once."""
        uploads = await receive_uploads(request, config.max_request_bytes, config.max_files, config.temp_dir,
                                        config.upload_memory_bytes, upload_budget)
        try:
            precheck(uploads)
        except BaseException:
            uploads.close()
            raise
        return uploads

    async def write(change=None, uploads: Uploads | None = None, learn=None) -> tuple[dict, Snapshot]:
        """Admitted already; queue a write for the writer thread and wait until it is saved and published."""
        cleanup = uploads.close if uploads is not None else (lambda: None)
        fut = holder.submit(WriteJob(Future(), cleanup, None, change, learn, config.max_clip_seconds))
        try:
            return await asyncio.wrap_future(fut)
        except Exception as exc:
            mapped = client_error(exc, uploads)
            if mapped is None:
                raise
            raise mapped from None

    async def with_admission(request: Request, run):
        try:
            holder.admit()
        except ClientError:
            metrics.rejected.labels("learn").inc()
            raise
        metrics.learn_queue.set(holder.pending)
        try:
            return await run()
        finally:
            holder.release()
            metrics.learn_queue.set(holder.pending)

    def written(snap: Snapshot, report: dict, **extra) -> dict:
        return {**extra, **report, "counts": snap.counts, "version": snap.version}

    # -- reading
    @app.post("/classify", openapi_extra=UPLOAD_BODY, responses=ERRORS, tags=["classify"])
    async def classify(
        request: Request,
        top_k: int = Query(5, ge=1, description="labels per result"),
        window: float | None = Query(None, gt=0, description="classify a long file window by window (s)"),
        hop: float | None = Query(None, gt=0, description="seconds between window starts (default: window)"),
        unknown_threshold: float | None = Query(None, description="answer `unknown` below this known-ness score "
                                                "(default: the model's calibrated threshold)"),
        reject_unknown: bool = Query(True, description="false: never answer `unknown`"),
    ):
        """Top-k labels with probabilities for each uploaded file; per-window results with `window`/`hop`."""
        ready()
        if top_k > config.max_top_k:
            raise ClientError(400, f"top_k is at most {config.max_top_k}")
        if unknown_threshold is not None and not math.isfinite(unknown_threshold):
            raise ClientError(400, "unknown_threshold must be a finite number")
        if hop is not None and window is None:
            raise ClientError(400, "hop needs window")
        if window is not None:
            hop = hop or window
            if window < config.min_window_seconds or window > config.max_clip_seconds:
                raise ClientError(400, f"window must be {config.min_window_seconds:g}..{config.max_clip_seconds:g} s")
            if hop < config.min_window_seconds:
                raise ClientError(400, f"hop must be at least {config.min_window_seconds:g} s")
        uploads = await receive(request)
        try:
            longest = config.max_long_file_seconds if window is not None else config.max_clip_seconds
            if window is not None:
                longest = min(longest, window + hop * (config.max_windows - 1))
            unknown = {} if unknown_threshold is None and reject_unknown else \
                {"unknown_threshold": unknown_threshold, "reject_unknown": reject_unknown}
            # no separate header check: the decoder refuses a file over `longest` from its header (413)
            job = ClassifyJob(uploads.sources, uploads.names, top_k, window, hop, Future(), uploads.close,
                              unknown=unknown, max_seconds=longest)
            try:
                runtime["classifier"].submit(job)
            except ClientError:
                metrics.rejected.labels("classify").inc()
                raise
        except BaseException:
            uploads.close()
            raise
        try:
            snap, preds = await asyncio.wrap_future(job.future)
        except Exception as exc:
            mapped = client_error(exc, uploads)
            if mapped is None:
                raise
            raise mapped from None
        return {"version": snap.version,
                "results": format_predictions(preds, top_k, window is not None)}

    @app.get("/labels", tags=["inspect"], responses={503: ERRORS[503]})
    async def labels():
        """Every label and its number of learned clips."""
        snap = ready()
        return {"labels": [{"name": n, "clips": c} for n, c in snap.counts.items()], "version": snap.version}

    @app.get("/model", tags=["inspect"], responses={503: ERRORS[503]})
    async def model_info():
        """The model's description (classes, learner, encoder, bytes, format, version) and the limits."""
        snap = ready()
        limits = {k: getattr(config, k) for k in ("max_request_bytes", "max_files", "max_clip_seconds",
                                                    "max_long_file_seconds", "max_windows", "max_top_k",
                                                    "learn_queue")}
        info = {k: json_safe(v) for k, v in snap.info.items() if k != "path"}  # no server paths to anonymous clients
        return {**info, "version": snap.version, "read_only": config.read_only, "limits": limits}

    # -- writing
    @app.post("/labels/{name}/examples", dependencies=[Depends(authorize)], openapi_extra=UPLOAD_BODY,
              responses=WRITE_ERRORS, tags=["teach"])
    async def learn(name: str, request: Request):
        """Learn the uploaded clips as examples of `name` (a new label, or more examples of a known one).
        Answered once the changed model is saved."""
        ready()
        check_label(name)

        async def run():
            uploads = await receive(request)
            report, snap = await write(uploads=uploads, learn=(uploads.sources, name, uploads.names))
            return written(snap, report, label=name)

        return await with_admission(request, run)

    @app.delete("/labels/{name}", dependencies=[Depends(authorize)], responses=WRITE_ERRORS, tags=["teach"])
    async def forget_label(name: str, request: Request):
        """Forget a label entirely (exact unlearning). Answered once the changed model is saved."""
        ready()
        if name not in ready().counts:
            raise ClientError(404, f"unknown label {name!r}")

        async def run():
            report, snap = await write(lambda m: m.forget(label=name))
            return written(snap, report, label=name)

        return await with_admission(request, run)

    @app.post("/labels/{name}/forget", dependencies=[Depends(authorize)], openapi_extra=UPLOAD_BODY,
              responses=WRITE_ERRORS, tags=["teach"])
    async def forget_clips(name: str, request: Request):
        """Forget the uploaded clips, learned before as examples of `name` (exact unlearning)."""
        ready()
        if name not in ready().counts:
            raise ClientError(404, f"unknown label {name!r}")

        async def run():
            uploads = await receive(request)

            def change(m):
                report = m.forget(files=uploads.sources, names=uploads.names, max_seconds=config.max_clip_seconds)
                others = sorted(set(report.get("labels", {})) - {name})
                if others:  # raised before the save: the changed clone is dropped, nothing is applied
                    raise ClientError(400, f"some clips were learned as {', '.join(map(repr, others))}, not "
                                           f"{name!r}; nothing forgotten")
                return report

            report, snap = await write(change, uploads)
            return written(snap, report, label=name)

        return await with_admission(request, run)

    # -- operations
    @app.get("/health/live", tags=["operations"])
    async def live():
        """The process answers."""
        return {"status": "live"}

    @app.get("/health/ready", tags=["operations"], responses={503: ERRORS[503]})
    async def is_ready():
        """200 once the model is loaded (it loads in the background at startup), 503 before."""
        snap = ready()
        return {"status": "ready", "version": snap.version, "labels": len(snap.counts)}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus():
        """Prometheus text: requests and latencies per endpoint, labels, clip counts, model version."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # -- the page
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
