"""An append-only, fsynced log of records on top of one saved model generation.

A full save of a model rewrites its statistics (tens of MB for the ridge heads); a learn or a forget
changes them by a few rows. So a service acknowledges a change once its record (the embeddings and
labels it applied, never audio) is appended here and fsynced, and compacts the log into a full save
from time to time; loading replays the log on top of the saved generation.

Frame: 8-byte little-endian payload length, the payload's sha256 (32 bytes), the payload. A crash in
the middle of an append leaves a torn last frame: readers stop at the first frame that is short or
whose hash does not match, and the next append cuts the file back to the last whole frame first. A
torn frame was never acknowledged (the append had not returned), so nothing acknowledged is lost.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEADER = 8 + 32


class ChangeLogError(ValueError):
    """The log is not what the writer expected (another writer appended to it)."""


def read_log(path: str | Path) -> tuple[list[bytes], int]:
    """The whole frames' payloads and the byte offset where the last whole frame ends (0 for no file)."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    out, at = [], 0
    while at + HEADER <= len(data):
        n = int.from_bytes(data[at : at + 8], "little")
        end = at + HEADER + n
        if end > len(data):
            break
        payload = data[at + HEADER : end]
        if hashlib.sha256(payload).digest() != data[at + 8 : at + HEADER]:
            break
        out.append(payload)
        at = end
    return out, at


def append_log(path: str | Path, payloads: list[bytes], expect_end: int) -> int:
    """Append frames after byte ``expect_end`` (where this writer's view of the log ends), fsync; the new end.

    Bytes past ``expect_end`` that do not parse are a torn frame of a crashed append: cut off. Whole
    frames there were written by another writer: refused, so no change is lost or applied twice.
    """
    path = Path(path)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size < expect_end:
            raise ChangeLogError(f"{path}: shorter ({size} bytes) than this writer's view ({expect_end}); "
                                 "another writer compacted it")
        if size > expect_end:
            _, end = read_log(path)
            if end > expect_end:
                raise ChangeLogError(f"{path}: another writer appended changes since this model was loaded")
            os.ftruncate(fd, expect_end)
        frames = b"".join(len(p).to_bytes(8, "little") + hashlib.sha256(p).digest() + p for p in payloads)
        os.pwrite(fd, frames, expect_end)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return expect_end + len(frames)
