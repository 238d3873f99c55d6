"""Run folders written as a whole: a crash leaves the old run or the new one, never a mix of the two.

Every file of a run goes to a temporary sibling folder (``.<name>.tmp-<pid>-<random>`` beside
``<name>``); :meth:`RunWriter.commit` fsyncs it and puts it in the place of the old folder in one
step: ``renameat2(RENAME_EXCHANGE)`` on Linux swaps the two folders atomically, after which the
old run (now under the temporary name) is deleted. Where the exchange is not available it falls
back to two renames (old folder aside to ``.<name>.old-<pid>-<random>``, new folder in); a crash
between them leaves no ``<name>`` but both complete folders, and the next writer puts the old one
back before it starts. Each writer first removes temporary and old folders left by writers that
no longer run (their pid is in the name).

Why a folder swap rather than a manifest of digests written last: with a manifest a crash halfway
through destroys the old run (its files are already overwritten) and readers must refuse the
folder; the swap keeps the old run readable until the new one is complete, and readers need no
change.

Usage::

    with RunWriter(config.out) as w:      # checks that out may be replaced, before any slow work
        w.write_text("results.json", text)
        save_tensors(w.path("learner-ncm.safetensors"), ...)
        w.path("model").mkdir()            # a sub-folder another function fills
    # leaving the block commits; an exception discards the new files and keeps the old run

A folder is only replaced when it is empty, carries the ``.earmark-run`` marker, or looks like a
run folder written before the marker existed (it holds results.json or tune.json), so ``--out .``
cannot delete a folder of other things.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from earmark.checkpoint import atomic_write_bytes

MARKER = ".earmark-run"
LEGACY_FILES = ("results.json", "tune.json")


class RunFolderError(ValueError):
    """The output folder cannot be replaced by a run folder."""


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str, tag: str) -> int | None:
    """The pid in ``.<run>.<tag>-<pid>-<random>``, or None."""
    rest = name.split(f".{tag}-", 1)[-1]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink():
                continue
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def recover(out: str | Path) -> list[Path]:
    """Undo what crashed writers of ``out`` left: put a set-aside old run back if ``out`` is missing,
    delete stale temporary and old folders. Returns what was removed. Folders of live writers stay."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    removed: list[Path] = []
    olds, tmps = [], []
    for p in parent.iterdir():
        for tag, bucket in (("old", olds), ("tmp", tmps)):
            if p.name.startswith(f".{out.name}.{tag}-"):
                pid = _owner_pid(p.name, tag)
                if pid is None or not _pid_alive(pid):
                    bucket.append(p)
    if not out.exists() and olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, out)
        olds.remove(newest)
    for p in olds + tmps:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        _fsync_dir(parent)
    return removed


def check_replaceable(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunFolderError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if names and MARKER not in names and not names & set(LEGACY_FILES):
            raise RunFolderError(
                f"{out}: exists and is not an earmark run folder (no {MARKER}); refusing to replace it, "
                "choose another output folder"
            )


class RunWriter:
    """Collects a run's files in a temporary sibling folder; :meth:`commit` replaces ``out`` with it."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.removed = recover(self.out)
        check_replaceable(self.out)
        self.tmp: Path | None = None
        self._start()

    def _start(self, copy_from: Path | None = None) -> None:
        prefix = f".{self.out.name}.tmp-{os.getpid()}-"
        if copy_from is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
        else:
            self.tmp = self.out.parent / f"{prefix}{uuid.uuid4().hex[:8]}"
            shutil.copytree(copy_from, self.tmp, symlinks=True)
        (self.tmp / MARKER).write_text("written by earmark; this folder is replaced as a whole by the next run\n")

    @property
    def folder(self) -> Path:
        """The temporary folder being written (becomes ``out`` on commit)."""
        if self.tmp is None:
            raise RuntimeError("this run folder was already committed or discarded")
        return self.tmp

    def path(self, *parts: str) -> Path:
        """A path inside the folder being written (parents created): a file or a sub-folder to fill."""
        p = self.folder.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def final(self, *parts: str) -> Path:
        """Where ``path(*parts)`` will be once committed (for messages and recorded paths)."""
        return self.out.joinpath(*parts)

    def write_bytes(self, name: str, data: bytes) -> Path:
        p = self.path(name)
        atomic_write_bytes(p, data)
        return p

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def commit(self, keep_writing: bool = False) -> Path:
        """Put the new folder in place of ``out`` in one step; with ``keep_writing``, continue on a copy
        (so a long job can publish what it has finished and go on)."""
        tmp = self.folder
        _fsync_tree(tmp)
        out = self.out
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # it holds the old run now
        else:
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out.parent)
        self.tmp = None
        if keep_writing:
            self._start(copy_from=out)
        return out

    def discard(self) -> None:
        """Drop the new files; the old run stays as it was."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.tmp is not None:
            self.commit()
        else:
            self.discard()


__all__ = ["MARKER", "RunFolderError", "RunWriter", "check_replaceable", "recover"]
