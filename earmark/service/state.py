"""The live model and the two kinds of work on it.

Readers never see a model being changed: the published model is an immutable snapshot. A write (learn
or forget) runs on the single writer thread: clone the snapshot, change the clone, save it (atomic, so
it is on disk before anyone is told), then publish it by swapping one reference. Classification runs
on a few worker threads that each take whatever requests are queued (up to a batch of clips) and
predict them together against the snapshot current when the batch starts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("earmark.service")


class ClientError(Exception):
    """Something the client sent is wrong; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class Snapshot:
    """What readers get without touching the model: taken once at publish time."""

    model: Any
    generation: int
    counts: dict[str, int]
    info: dict

    def metrics(self) -> dict:
        return {"generation": self.generation, "counts": self.counts}


class ModelHolder:
    """Holds the published snapshot, the writer thread and the learn queue's admission count."""

    def __init__(self, path: Path, learn_queue: int) -> None:
        self.path = path
        self.snapshot: Snapshot | None = None
        self.load_error: str | None = None
        self.learn_queue = learn_queue
        self.pending = 0  # admitted writes not yet answered (touched on the event loop only)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="earmark-writer")
        self._write_lock = threading.Lock()  # belt and braces: one write at a time even if a caller bypasses

    # -- reading
    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    def publish(self, model) -> Snapshot:
        snap = Snapshot(model, int(model.generation), dict(model.counts()), model.info())
        self.snapshot = snap  # one reference swap: readers see the old snapshot or the new, never a mix
        return snap

    # -- writing
    def admit(self) -> None:
        """Count one more write in, or refuse with 429 when the queue is full."""
        if self.pending >= self.learn_queue:
            raise ClientError(429, f"the learn queue is full ({self.learn_queue} requests); retry shortly",
                              {"Retry-After": "1"})
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    def submit_write(self, change: Callable[[Any], dict], cleanup: Callable[[], None]) -> Future:
        """Run ``change(clone)`` on the writer thread, save the clone, publish it; returns the report.

        ``cleanup`` (the request's temp files) runs on the writer thread when the job is over, so files
        are never deleted under a write that outlives its request.
        """

        def job() -> tuple[dict, Snapshot]:
            try:
                with self._write_lock:
                    base = self.snapshot
                    if base is None:
                        raise ClientError(503, "the model is not loaded yet")
                    new = base.model.clone()
                    report = change(new)
                    new.save(self.path)
                    return report, self.publish(new)
            finally:
                cleanup()

        fut = self._writer.submit(job)
        fut.add_done_callback(lambda f: cleanup() if f.cancelled() else None)  # cancelled before it ran
        return fut

    def close(self) -> None:
        self._writer.shutdown(wait=True)


@dataclass
class ClassifyJob:
    paths: list[str]
    names: list[str]  # the client's filenames, for predictions and error messages
    top_k: int
    window: float | None
    hop: float | None
    future: Future
    cleanup: Callable[[], None]
    validate: Callable[[], None] | None = None
    clips: int = field(init=False)

    def __post_init__(self) -> None:
        self.clips = len(self.paths)


class Classifier:
    """Worker threads that batch queued classify jobs into one ``predict`` call each."""

    def __init__(self, holder: ModelHolder, workers: int, batch: int, max_queue: int) -> None:
        self.holder = holder
        self.batch = batch
        self.queue: queue.Queue[ClassifyJob | None] = queue.Queue(max_queue)
        self.threads = [threading.Thread(target=self._run, name=f"earmark-classify-{i}", daemon=True)
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, job: ClassifyJob) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ClientError(429, "too many classify requests waiting; retry shortly", {"Retry-After": "1"}) from None

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(timeout=10)

    # -- worker side
    def _take(self, first: ClassifyJob) -> list[ClassifyJob]:
        jobs, clips = [first], first.clips
        if first.window is not None:
            return jobs  # a windowed file is a batch of its own
        while clips < self.batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # leave the stop signal for this or another worker
                break
            if job.window is not None or clips + job.clips > self.batch:
                self._run_jobs([job])  # does not fit this batch: run it right after on its own
                continue
            jobs.append(job)
            clips += job.clips
        return jobs

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self._run_jobs(self._take(job))

    def _run_jobs(self, jobs: list[ClassifyJob]) -> None:
        ok: list[ClassifyJob] = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                try:
                    if job.validate is not None:
                        job.validate()
                    ok.append(job)
                except BaseException as exc:
                    self._finish(job, exc=exc)
            else:
                job.cleanup()
        if not ok:
            return
        snap = self.holder.snapshot  # one snapshot for the whole batch
        try:
            if snap is None:
                raise ClientError(503, "the model is not loaded yet")
            if len(ok) == 1:
                job = ok[0]
                self._finish(job, (snap, snap.model.predict(job.paths, top_k=job.top_k, window=job.window,
                                                            hop=job.hop, names=job.names)))
                return
            paths = [p for job in ok for p in job.paths]
            names = [n for job in ok for n in job.names]
            k = max(job.top_k for job in ok)
            preds = snap.model.predict(paths, top_k=k, names=names)
        except BaseException as exc:
            if len(ok) == 1:
                self._finish(ok[0], exc=exc)
                return
            # one bad file must not fail its neighbours: run each request on its own
            for job in ok:
                try:
                    self._finish(job, (snap, snap.model.predict(job.paths, top_k=job.top_k, names=job.names)))
                except BaseException as exc2:
                    self._finish(job, exc=exc2)
            return
        at = 0
        for job in ok:
            part = preds[at: at + job.clips]
            at += job.clips
            self._finish(job, (snap, part))

    @staticmethod
    def _finish(job: ClassifyJob, result=None, exc: BaseException | None = None) -> None:
        try:
            job.cleanup()
        except OSError:
            log.warning("could not remove a request's temp files", exc_info=True)
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
