"""Multipart uploads read while the body arrives, with the byte and count limits enforced as it streams
(Starlette enforces none, and would spool the whole body first).

A request's files stay in memory up to ``memory_bytes`` in all (the decoders read them from there:
creating, opening twice and removing a temp file cost more CPU than decoding a 1 s clip); beyond that
they spill to a per-request temp dir. There each file keeps its original name (sanitized, behind an index
so duplicates cannot collide), so a decoder's message about ``/tmp/earmark-req-x/00-dog.wav`` can be told
back to the client as ``dog.wav``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from earmark.audio.io import AudioBytes, AudioSource

MAX_FIELD_BYTES = 1024  # a plain form field (top_k, window, ...)
MAX_FIELDS = 16
MEMORY_BYTES = 8 * 2**20  # a request's files held in memory before they spill to disk


class MemoryBudget:
    """Bytes of uploads held in memory across all requests in flight: past ``limit`` new bytes go to disk.

    Why: a per-request budget alone lets a full classify queue (hundreds of requests) hold gigabytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class UploadError(Exception):
    """A client error found while reading the body; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    name: str  # the client's filename, for messages
    path: Path | None = None  # where its bytes are once spilled to disk; None while they are in memory
    size: int = 0
    content_type: str = ""
    data: bytes = b""  # the bytes, while in memory

    @property
    def source(self) -> AudioSource:
        """What the decoders read: the spilled file, or the bytes under the client's filename."""
        return self.path if self.path is not None else AudioBytes(self.name, self.data)


@dataclass
class Uploads:
    """The files and fields of one request; ``close()`` deletes the temp dir if anything spilled."""

    dir: Path | None = None  # made on the first spill, under ``parent``
    files: list[Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    budget: MemoryBudget | None = None
    held: int = 0  # bytes of ``budget`` this request holds

    def release(self) -> None:
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.held = 0

    def spill_dir(self) -> Path:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="earmark-req-", dir=self.parent))
        return self.dir

    def original(self, path: str | Path) -> str:
        p = Path(path)
        for f in self.files:
            if f.path == p or (f.path is not None and f.path.name == p.name) or f.name == str(path):
                return f.name
        return p.name

    @property
    def sources(self) -> list[AudioSource]:
        return [f.source for f in self.files]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.files]

    def clean(self, text: str) -> str:
        """``text`` with every temp path replaced by the client's filename (and no temp dir left in it)."""
        for f in self.files:
            if f.path is not None:
                text = text.replace(str(f.path), f.name)
        if self.dir is None:
            return text
        return text.replace(str(self.dir) + "/", "").replace(str(self.dir), "")

    def close(self) -> None:
        self.release()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Uploads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str, index: int) -> str:
    """A filesystem-safe name that still reads like the original: ``03-dog_bark.wav``."""
    base = re.split(r"[\\/]", filename)[-1]
    base = _UNSAFE.sub("_", base).strip(".") or "upload"
    if len(base) > 100:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: 90] + dot + ext[:9]) if dot and len(ext) <= 9 else base[:100]
    return f"{index:02d}-{base}"


def _disposition(headers: dict[str, bytes]) -> tuple[str | None, str | None]:
    value = headers.get("content-disposition")
    if value is None:
        raise UploadError(400, "a multipart part has no Content-Disposition header")
    _, params = parse_options_header(value)
    name = params.get(b"name")
    filename = params.get(b"filename")

    def text(v: bytes | None) -> str | None:
        return None if v is None else v.decode("utf-8", "replace")

    return text(name), text(filename)


async def receive_uploads(request: Request, max_bytes: int, max_files: int, temp_dir: str | None = None,
                          memory_bytes: int = MEMORY_BYTES, budget: MemoryBudget | None = None) -> Uploads:
    """Read a multipart/form-data body into memory, spilling to a temp dir past ``memory_bytes`` (or when
    the process-wide ``budget`` is spent); raises :class:`UploadError` (413/415/400)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        shown = ctype.decode("latin-1") or "none"
        raise UploadError(415, f"expected a multipart/form-data upload of audio files, got content type {shown}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise UploadError(413, f"request body is {int(length)} bytes; the limit is {max_bytes} bytes")

    uploads = Uploads(parent=temp_dir, budget=budget)
    state: dict = {"headers": {}, "field": None, "value": b"", "file": None, "upload": None, "error": None,
                   "buffer": None, "in_memory": 0}
    header_name = bytearray()
    header_value = bytearray()

    def fail(status: int, message: str) -> None:
        if state["error"] is None:
            state["error"] = UploadError(status, message)

    def on_part_begin() -> None:
        state["headers"] = {}
        state["field"] = None
        state["value"] = b""
        state["file"] = None
        state["upload"] = None
        state["buffer"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        state["headers"][header_name.decode("latin-1").lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        if state["error"] is not None:
            return
        try:
            name, filename = _disposition(state["headers"])
        except UploadError as exc:
            fail(exc.status, exc.message)
            return
        if filename is None:
            if len(uploads.fields) >= MAX_FIELDS:
                fail(413, f"more than {MAX_FIELDS} form fields")
            state["field"] = name or ""
            return
        if len(uploads.files) >= max_files:
            fail(413, f"more than {max_files} files in one request")
            return
        ctype = state["headers"].get("content-type", b"").decode("latin-1").strip().lower()
        up = Upload(filename or "upload", content_type=ctype)
        uploads.files.append(up)
        state["upload"] = up
        state["buffer"] = bytearray()

    def spill(up: Upload, buffer: bytearray) -> None:
        up.path = uploads.spill_dir() / safe_name(up.name, len(uploads.files) - 1)
        state["file"] = fh = open(up.path, "wb")  # noqa: SIM115 - closed in on_part_end or below
        fh.write(buffer)
        state["in_memory"] -= len(buffer)
        if budget is not None:
            budget.give(len(buffer))
            uploads.held -= len(buffer)
        state["buffer"] = None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["error"] is not None:
            return
        fh: IO[bytes] | None = state["file"]
        buffer: bytearray | None = state["buffer"]
        if fh is not None:
            fh.write(data[start:end])
            state["upload"].size += end - start
        elif buffer is not None:
            n = end - start
            state["upload"].size += n
            granted = budget is None or budget.take(n)
            if granted:
                buffer += data[start:end]
                state["in_memory"] += n
                uploads.held += n if budget is not None else 0
            if not granted or state["in_memory"] > memory_bytes:
                spill(state["upload"], buffer)  # what was in memory goes to disk and is given back
                if not granted:
                    state["file"].write(data[start:end])
        elif state["field"] is not None:
            state["value"] += data[start:end]
            if len(state["value"]) > MAX_FIELD_BYTES:
                fail(413, f"form field {state['field']!r} is longer than {MAX_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        fh = state["file"]
        if fh is not None:
            fh.close()
            state["file"] = None
        elif state["buffer"] is not None:
            state["upload"].data = bytes(state["buffer"])
            state["buffer"] = None
        elif state["field"] is not None and state["error"] is None:
            uploads.fields[state["field"]] = state["value"].decode("utf-8", "replace")
            state["field"] = None

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    })
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise UploadError(413, f"request body is over the limit of {max_bytes} bytes")
            if chunk:
                parser.write(chunk)
            if state["error"] is not None:
                raise state["error"]
        parser.finalize()
        if state["error"] is not None:
            raise state["error"]
        if state["file"] is not None or state["buffer"] is not None:  # body ended inside a file part
            raise UploadError(400, "the multipart body ended before its last part was complete")
    except MultipartParseError as exc:
        uploads.close()
        raise UploadError(400, f"malformed multipart body ({exc})") from None
    except BaseException:  # UploadError, ClientDisconnect, cancellation: nothing of this request stays
        uploads.close()
        raise
    finally:
        if state["file"] is not None:
            state["file"].close()
    return uploads
