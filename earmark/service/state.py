"""The live model and the two kinds of work on it.

Readers never see a model being changed: what they get is an immutable snapshot, a frozen copy of the
model (``Model.frozen``: the learner's weights, not its statistics). Writes (learn or forget) run on the
single writer thread, which owns the one mutable model: change it in place, make the change durable
before anyone is told (an fsynced append to the model's change log), then freeze it and publish the copy
by swapping one reference. If a change fails half-way, or cannot be made durable, the writer's model is
rebuilt from disk, which holds exactly what was acknowledged. The log is folded into a full atomic save
every ``compact_every`` changes, after the requests are answered, and when writes pause.
Classification runs on a few worker threads that each take whatever requests are queued (up to a batch
of clips) and predict them together against the snapshot current when the batch starts.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("earmark.service")
MAX_GROUP_CLIPS = 256  # most clips committed by one grouped learn


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
    version: int  # changes applied since the model was created: grows with every acknowledged write
    counts: dict[str, int]
    info: dict

    def metrics(self) -> dict:
        return {"version": self.version, "counts": self.counts}


@dataclass
class WriteJob:
    """One learn or forget. A learn is given as (sources, label, names) so queued learns can be committed
    together (files over ``max_seconds`` are refused from their header); anything else is a
    ``change(model) -> report`` run alone."""

    future: Future
    cleanup: Callable[[], None]
    validate: Callable[[], None] | None = None
    change: Callable[[Any], dict] | None = None
    learn: tuple[list, str, list[str]] | None = None
    max_seconds: float | None = None


class ModelHolder:
    """Holds the writer's model, the published snapshot, the writer thread and the learn queue's admission count.

    The writer commits queued learns as a group: one ``learn`` call over all their clips, one log append,
    one publish, then every request of the group is answered. If the group's learn fails (one request's
    clip is bad or a duplicate), each request is applied on its own: ``Model.learn`` refuses bad input
    before it changes anything, and a change that fails half-way (``Model.torn``) sends the writer back
    to the model on disk.
    """

    def __init__(self, path: Path, learn_queue: int, max_group: int = 32, compact_every: int = 64,
                 compact_idle: float = 5.0, loader: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.compact_every = compact_every
        self.compact_idle = compact_idle
        self.loader = loader  # rebuilds the model from disk (everything acknowledged is there)
        self.model: Any = None  # the writer's model: touched by the writer thread only, once installed
        self._dropped = False  # a reload lost whole but unlogged changes: their requests must fail
        self.snapshot: Snapshot | None = None
        self.load_error: str | None = None
        self.learn_queue = learn_queue
        self.max_group = max_group
        self.pending = 0  # admitted writes not yet answered (touched on the event loop only)
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._carry: list[WriteJob | None] = []  # taken from the queue but not part of the group: next
        self._writer = threading.Thread(target=self._run, name="earmark-writer")  # not a daemon: saves finish

    def start(self) -> None:
        self._writer.start()

    # -- reading
    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    def install(self, model) -> Snapshot:
        """Hand the loaded model to the writer and publish its first snapshot (before the writer runs jobs)."""
        self.model = model
        return self.publish()

    def publish(self) -> Snapshot:
        m = self.model
        frozen = m.frozen()
        snap = Snapshot(frozen, int(m.version), dict(m.counts()), frozen.info())
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

    def submit(self, job: WriteJob) -> Future:
        """Queue a write; its future gives (report, snapshot) once the change is durable and published.

        ``job.cleanup`` (the request's temp files) runs on the writer thread when the job is over, so
        files are never deleted under a write that outlives its request.
        """
        self._jobs.put(job)
        return job.future

    def close(self) -> None:
        if self._writer.is_alive():
            self._jobs.put(None)
            self._writer.join()  # a write in progress finishes and is saved

    # -- the writer thread
    def _run(self) -> None:
        while True:
            try:
                job = self._carry.pop() if self._carry else self._jobs.get(timeout=self.compact_idle)
            except queue.Empty:
                self._compact()  # writes paused: fold the log into a full save
                continue
            if job is None:
                self._compact()
                return
            group = [job]
            if job.learn is not None:
                clips = len(job.learn[0])
                while len(group) < self.max_group and clips < MAX_GROUP_CLIPS:
                    try:
                        nxt = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None or nxt.learn is None:
                        self._carry.append(nxt)  # keeps the order: it runs next, on its own
                        break
                    group.append(nxt)
                    clips += len(nxt.learn[0])
            try:
                self._write([j for j in group if self._start(j)])
            except BaseException as exc:  # never let the writer die
                log.exception("write failed")
                for j in group:
                    _finish(j.future, exc=exc)
            finally:
                for j in group:
                    _cleanup(j.cleanup)
            if self.model is not None and self.model.logged >= self.compact_every:
                self._compact()  # after the answers: the long save delays the next write, not this one

    @staticmethod
    def _start(job: WriteJob) -> bool:
        if not job.future.set_running_or_notify_cancel():
            return False
        if job.validate is not None:
            try:
                job.validate()
            except BaseException as exc:
                _finish(job.future, exc=exc)
                return False
        return True

    def _write(self, group: list[WriteJob]) -> None:
        if not group:
            return
        if self.model is None:
            for j in group:
                _finish(j.future, exc=ClientError(503, "the model is not loaded yet"))
            return
        if group[0].learn is None:  # a forget (or any change): alone
            job = group[0]
            try:
                report = self._change(job.change)
            except BaseException as exc:
                _finish(job.future, exc=exc)
                return
            self._publish_durably([(job, report)])
            return
        done: list[tuple[WriteJob, dict]] = []
        known = set(self.model.counts())
        if len(group) > 1:
            try:
                self._change(lambda m: m.learn([p for j in group for p in j.learn[0]],
                                               [j.learn[1] for j in group for _ in j.learn[0]],
                                               names=[n for j in group for n in j.learn[2]],
                                               max_seconds=_limit(group)))
                done = [(j, _learn_report(j, known)) for j in group]
            except Exception:
                known = set(self.model.counts())  # nothing was applied: one by one, so one bad clip fails alone
        if not done:
            for j in group:
                try:
                    self._change(lambda m, j=j: m.learn(j.learn[0], j.learn[1], names=j.learn[2],
                                                        max_seconds=j.max_seconds))
                except BaseException as exc:
                    _finish(j.future, exc=exc)
                    continue
                done.append((j, _learn_report(j, known)))
        self._publish_durably(done)

    def _change(self, change: Callable[[Any], Any]) -> Any:
        """Run one change on the writer's model; if it fails half-way, go back to what is on disk."""
        if self.model is None:
            raise ClientError(503, "the model could not be reloaded after a failed write; see the server log")
        try:
            return change(self.model)
        except BaseException:
            if self.model.torn:
                self._recover(keep=True)
            raise

    def _recover(self, keep: bool) -> None:
        """Rebuild the writer's model from disk. ``keep``: first log the changes since the last append that
        were whole (earlier requests of this group); if that fails they are lost and their requests fail."""
        log.warning("reloading the model from %s after a failed write", self.path)
        if keep and self.model.unlogged:
            try:
                if self.model.loggable:
                    self.model.log()
            except Exception:
                log.exception("could not log the whole changes before reloading")
        self._dropped = bool(self.model.unlogged)
        self.model = None
        if self.loader is None:
            raise RuntimeError("the model cannot be rebuilt from disk (no loader): stop writing")
        self.model = self.loader()

    def _publish_durably(self, done: list[tuple[WriteJob, dict]]) -> None:
        """On disk before anyone is told (an fsynced log append; a full save after a merge), then publish."""
        if not done:
            return
        if self._dropped:  # the reload after a half-way failure lost these whole changes: refuse them
            self._dropped = False
            lost = RuntimeError("the change could not be made durable (see the server log); nothing was applied")
            for j, _ in done:
                _finish(j.future, exc=lost)
            return
        try:
            if self.model.loggable:
                self.model.log()
            else:
                self.model.save(self.path)
        except BaseException as exc:
            log.exception("could not make a change durable; reloading the model from disk")
            try:
                if self.model is not None:
                    self.model.unlogged = []  # not acknowledged: it must never reach the log
                    self._recover(keep=False)
            finally:
                for j, _ in done:
                    _finish(j.future, exc=exc)
            return
        snap = self.publish()
        for j, report in done:
            _finish(j.future, (report, snap))

    def _compact(self) -> None:
        """Fold the change log into a full save of the writer's model (on the writer thread)."""
        if self.model is None or not self.model.logged:
            return
        try:
            self.model.save(self.path)
            self.publish()
        except Exception:  # the log stays and is replayed on the next start: nothing acknowledged is lost
            log.exception("compacting the change log failed")


def _limit(group: list[WriteJob]) -> float | None:
    """The strictest of the group's duration limits (they come from one config, so all alike)."""
    limits = [j.max_seconds for j in group if j.max_seconds is not None]
    return min(limits) if limits else None


def _learn_report(job: WriteJob, known: set[str]) -> dict:
    """What ``Model.learn`` reports, for one request of a group (``known`` grows as labels appear)."""
    paths, label, _ = job.learn
    new = [] if label in known else [label]
    known.add(label)
    return {"learned": len(paths), "labels": {label: len(paths)}, "new": new, "skipped": []}


def _finish(future: Future, result=None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _cleanup(cleanup: Callable[[], None]) -> None:
    try:
        cleanup()
    except OSError:
        log.warning("could not remove a request's temp files", exc_info=True)


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
    unknown: dict = field(default_factory=dict)  # predict's unknown_threshold / reject_unknown, when given
    max_seconds: float | None = None  # longer files are refused from their header (413)
    clips: int = field(init=False)

    def __post_init__(self) -> None:
        self.clips = len(self.paths)


class Classifier:
    """Worker threads that batch queued classify jobs into one ``predict`` call each.

    Clips and long files (``window`` given) have their own queues and threads: a file of hours, classified
    window by window, never holds up the clips behind it, while the clips share one worker by default. A
    second clip worker gains little, because both run the encoder's many small ops under one GIL; the
    batching of whatever is queued does the scaling instead.
    """

    def __init__(self, holder: ModelHolder, workers: int, batch: int, max_queue: int, window_workers: int = 1) -> None:
        self.holder = holder
        self.batch = batch
        self.queue: queue.Queue[ClassifyJob | None] = queue.Queue(max_queue)
        self.window_queue: queue.Queue[ClassifyJob | None] = queue.Queue(max_queue)
        self.threads = [threading.Thread(target=self._run, args=(self.queue,), name=f"earmark-classify-{i}",
                                         daemon=True) for i in range(workers)]
        self.window_threads = [threading.Thread(target=self._run, args=(self.window_queue,), daemon=True,
                                                name=f"earmark-windows-{i}") for i in range(window_workers)]
        for t in self.threads + self.window_threads:
            t.start()

    def submit(self, job: ClassifyJob) -> None:
        try:
            (self.window_queue if job.window is not None else self.queue).put_nowait(job)
        except queue.Full:
            raise ClientError(429, "too many classify requests waiting; retry shortly", {"Retry-After": "1"}) from None

    def close(self) -> None:
        for q, threads in ((self.queue, self.threads), (self.window_queue, self.window_threads)):
            for _ in threads:
                q.put(None)
        for t in self.threads + self.window_threads:
            t.join(timeout=10)

    # -- worker side
    def _take(self, first: ClassifyJob, jobs_queue: queue.Queue) -> list[ClassifyJob]:
        jobs, clips = [first], first.clips
        if first.window is not None:
            return jobs  # a windowed file is a batch of its own
        while clips < self.batch:
            try:
                job = jobs_queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                jobs_queue.put(None)  # leave the stop signal for this or another worker
                break
            if (job.window is not None or job.unknown != first.unknown or job.max_seconds != first.max_seconds
                    or clips + job.clips > self.batch):
                self._run_jobs([job])  # does not fit this batch: run it right after on its own
                continue
            jobs.append(job)
            clips += job.clips
        return jobs

    def _run(self, jobs_queue: queue.Queue) -> None:
        while True:
            job = jobs_queue.get()
            if job is None:
                return
            self._run_jobs(self._take(job, jobs_queue))

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
                                                            hop=job.hop, names=job.names, max_seconds=job.max_seconds,
                                                            **job.unknown)))
                return
            paths = [p for job in ok for p in job.paths]
            names = [n for job in ok for n in job.names]
            k = max(job.top_k for job in ok)
            preds = snap.model.predict(paths, top_k=k, names=names, max_seconds=ok[0].max_seconds, **ok[0].unknown)
        except BaseException as exc:
            if len(ok) == 1:
                self._finish(ok[0], exc=exc)
                return
            # one bad file must not fail its neighbours: run each request on its own
            for job in ok:
                try:
                    self._finish(job, (snap, snap.model.predict(job.paths, top_k=job.top_k, names=job.names,
                                                                max_seconds=job.max_seconds, **job.unknown)))
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
