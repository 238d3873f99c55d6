"""Service pieces that need no server: config, token sources, upload names, the classify batcher."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from earmark.service.config import ConfigError, ServiceConfig, read_token  # noqa: E402
from earmark.service.state import Classifier, ClassifyJob, ClientError, ModelHolder  # noqa: E402
from earmark.service.uploads import Upload, Uploads, safe_name  # noqa: E402


def test_mutating_mode_needs_a_token():
    with pytest.raises(ConfigError, match="EARMARK_TOKEN"):
        ServiceConfig(model="m").check()
    with pytest.raises(ConfigError, match="too short"):
        ServiceConfig(model="m", token="abc").check()
    ServiceConfig(model="m", read_only=True).check()
    ServiceConfig(model="m", token="x" * 16).check()
    assert "x" * 16 not in repr(ServiceConfig(model="m", token="x" * 16))
    with pytest.raises(ConfigError):
        ServiceConfig(learn_queue=0)


def test_token_sources(tmp_path):
    f = tmp_path / "token"
    f.write_text("  from-the-file-0123456789\n")
    assert read_token(f, environ={}) == "from-the-file-0123456789"
    assert read_token(None, environ={"EARMARK_TOKEN_FILE": str(f), "EARMARK_TOKEN": "env"}) == \
        "from-the-file-0123456789"
    assert read_token(None, environ={"EARMARK_TOKEN": " env-token "}) == "env-token"
    assert read_token(None, environ={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(tmp_path / "empty", environ={})
    with pytest.raises(ConfigError, match="not found"):
        read_token(tmp_path / "missing", environ={})


@pytest.mark.parametrize("given, want", [
    ("dog bark.wav", "00-dog_bark.wav"),
    ("../../etc/passwd", "00-passwd"),
    ("C:\\Users\\me\\clip.flac", "00-clip.flac"),
    ("...", "00-upload"),
    ("", "00-upload"),
    ("é.wav", "00-_.wav"),
])
def test_safe_name(given, want):
    assert safe_name(given, 0) == want


def test_safe_name_is_bounded_and_keeps_the_extension():
    name = safe_name("a" * 500 + ".wav", 3)
    assert name.startswith("03-") and name.endswith(".wav") and len(name) < 110


def test_temp_paths_are_told_back_as_client_names(tmp_path):
    up = Uploads(tmp_path / "earmark-req-x")
    up.dir.mkdir()
    up.files.append(Upload("my dog.wav", up.dir / "00-my_dog.wav"))
    assert up.original(up.dir / "00-my_dog.wav") == "my dog.wav"
    assert up.clean(f"Error opening '{up.dir / '00-my_dog.wav'}': Format not recognised.") == \
        "Error opening 'my dog.wav': Format not recognised."
    up.close()
    assert not up.dir.exists()


class _Pred:
    def __init__(self, file):
        self.file, self.start, self.end, self.top = file, None, None, [("a", 0.9), ("b", 0.1)]


class _Model:
    version, labels = 1, ["a", "b"]

    def __init__(self):
        self.calls: list[list[str]] = []

    def predict(self, paths, top_k=5, window=None, hop=None, names=None, max_seconds=None):
        self.calls.append(list(paths))
        if any("bad" in p for p in paths):
            raise ValueError("bad audio")
        return [_Pred(p) for p in paths]

    def counts(self):
        return {"a": 1, "b": 1}

    def info(self):
        return {}

    def frozen(self):
        return self  # never changes


def test_batcher_batches_queued_jobs_and_isolates_a_bad_one():
    holder = ModelHolder(Path("."), 1)
    model = _Model()
    holder.install(model)
    clf = Classifier(holder, workers=1, batch=8, max_queue=16)
    try:
        # queue several jobs behind a slow validation so the worker finds them waiting
        gate = threading.Event()
        jobs = [ClassifyJob([f"f{i}"], [f"f{i}"], 1, None, None, Future(), lambda: None,
                            validate=(gate.wait if i == 0 else None)) for i in range(4)]
        jobs.append(ClassifyJob(["bad"], ["bad"], 1, None, None, Future(), lambda: None))
        for j in jobs:
            clf.submit(j)
        gate.set()
        results = [j.future.result(10) if "bad" not in j.paths[0] else None for j in jobs]
        with pytest.raises(ValueError):
            jobs[-1].future.result(10)
        assert [r[1][0].file for r in results[:4]] == ["f0", "f1", "f2", "f3"]
        assert any(len(c) > 1 for c in model.calls)  # batched
    finally:
        clf.close()
        holder.close()


def test_a_long_file_does_not_hold_up_the_clips_behind_it():
    holder = ModelHolder(Path("."), 1)
    holder.install(_Model())
    clf = Classifier(holder, workers=1, batch=8, max_queue=16, window_workers=1)
    gate = threading.Event()
    try:
        long_file = ClassifyJob(["hours"], ["hours"], 1, 1.0, 1.0, Future(), lambda: None, validate=gate.wait)
        clf.submit(long_file)  # its worker blocks on the gate, as on a file of hours
        clips = [ClassifyJob([f"c{i}"], [f"c{i}"], 1, None, None, Future(), lambda: None) for i in range(3)]
        for j in clips:
            clf.submit(j)
        assert [j.future.result(10)[1][0].file for j in clips] == ["c0", "c1", "c2"]
        assert not long_file.future.done()
        gate.set()
        assert long_file.future.result(10)[1][0].file == "hours"
    finally:
        gate.set()
        clf.close()
        holder.close()


def test_full_classify_queue_is_429():
    holder = ModelHolder(Path("."), 1)
    clf = Classifier(holder, workers=1, batch=1, max_queue=1)
    gate = threading.Event()
    try:
        holder.install(_Model())
        clf.submit(ClassifyJob(["x"], ["x"], 1, None, None, Future(), lambda: None, validate=gate.wait))
        deadline = time.monotonic() + 5
        while not clf.queue.empty() and time.monotonic() < deadline:  # the worker took it and is blocked
            time.sleep(0.01)
        clf.submit(ClassifyJob(["y"], ["y"], 1, None, None, Future(), lambda: None))
        with pytest.raises(ClientError) as err:
            clf.submit(ClassifyJob(["z"], ["z"], 1, None, None, Future(), lambda: None))
        assert err.value.status == 429
    finally:
        gate.set()
        clf.close()
        holder.close()


class _Learner:
    """A model stand-in for the writer: learn raises for a path containing 'bad', like Model.learn (no change);
    a path containing 'torn' raises half-way, after changing the data (like a Model left ``torn``)."""

    torn, loggable = False, True

    def __init__(self):
        self.data: dict[str, int] = {}
        self.version = 0
        self.learn_calls = 0
        self.saves = 0  # commits: log appends and full saves
        self.logged, self.unlogged, self._unloggable = 0, [], False

    def clone(self):
        other = _Learner()
        other.data, other.version, other.learn_calls, other.saves = dict(self.data), self.version, \
            self.learn_calls, self.saves
        other.logged, other.unlogged = self.logged, list(self.unlogged)
        return other

    def learn(self, paths, labels, names=None, max_seconds=None):
        self.learn_calls += 1
        labels = [labels] * len(paths) if isinstance(labels, str) else labels
        if any("bad" in p for p in paths):
            raise ValueError("bad clip")
        for lab in labels:
            self.data[lab] = self.data.get(lab, 0) + 1
        if any("torn" in p for p in paths):
            self.torn = True
            raise RuntimeError("half-way")
        self.version += 1
        self.unlogged.append(labels)
        return {}

    def log(self):
        self.saves += 1
        self.logged += len(self.unlogged)
        self.unlogged = []

    def save(self, path):
        self.saves += 1
        self.logged, self.unlogged = 0, []

    def counts(self):
        return dict(self.data)

    def info(self):
        return {}

    def frozen(self):
        return self.clone()


def test_writer_groups_queued_learns_and_isolates_a_bad_one():
    from earmark.service.state import WriteJob

    holder = ModelHolder(Path("."), 10)
    holder.install(_Learner())
    gate = threading.Event()
    first = WriteJob(Future(), lambda: None, validate=gate.wait, learn=(["a0"], "a", ["a0"]))
    rest = [WriteJob(Future(), lambda: None, learn=([f"{x}{i}" for i in range(2)], x, ["n", "n"]))
            for x in ("b", "bad", "c")]
    holder.start()
    try:
        holder.submit(first)  # holds the writer until the others are queued
        for j in rest:
            holder.submit(j)
        gate.set()
        report, snap = first.future.result(10)
        assert report == {"learned": 1, "labels": {"a": 1}, "new": ["a"], "skipped": []}
        b, c = rest[0].future.result(10), rest[2].future.result(10)
        with pytest.raises(ValueError):
            rest[1].future.result(10)
        assert b[1] is c[1]  # one group: one save, one snapshot for both
        assert c[1].counts == {"a": 1, "b": 2, "c": 2}  # the bad request changed nothing
        assert c[1].model.saves <= 2  # "a" alone or in the group, then b+bad+c: never one save per request
        assert b[0] == {"learned": 2, "labels": {"b": 2}, "new": ["b"], "skipped": []}
    finally:
        holder.close()


def _learn_job(path: str, label: str = "x"):
    from earmark.service.state import WriteJob

    return WriteJob(Future(), lambda: None, learn=([path], label, ["n"]))


def _wait_until(cond, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_writer_acknowledges_through_the_log_and_compacts_once_long_after_answering():
    holder = ModelHolder(Path("."), 10, compact_every=3, compact_idle=60)  # idle compaction never fires here
    holder.install(_Learner())
    holder.start()
    try:
        for k in range(2):
            job = _learn_job(f"x{k}")
            holder.submit(job)
            _, snap = job.future.result(10)
        assert snap.model.logged == 2 and snap.version == 2  # two log appends, no save yet
        job = _learn_job("x2")
        holder.submit(job)
        _, snap = job.future.result(10)
        assert snap.model.logged == 3  # answered once logged: the save comes after the answer
        assert _wait_until(lambda: holder.snapshot.model.logged == 0)  # then folded into a full save
        assert holder.snapshot.version == 3 and holder.snapshot.counts == {"x": 3}
    finally:
        holder.close()


def test_writer_compacts_when_writes_pause():
    holder = ModelHolder(Path("."), 10, compact_every=100, compact_idle=0.3)
    holder.install(_Learner())
    holder.start()
    try:
        job = _learn_job("x0")
        holder.submit(job)
        _, snap = job.future.result(10)
        assert snap.model.logged == 1
        assert _wait_until(lambda: holder.snapshot.model.logged == 0)  # writes paused: folded into a save
        assert holder.snapshot.counts == {"x": 1}
    finally:
        holder.close()


def test_snapshots_are_frozen_copies_the_writer_never_touches():
    holder = ModelHolder(Path("."), 10)
    holder.install(_Learner())
    first = holder.snapshot
    holder.start()
    try:
        job = _learn_job("x0")
        holder.submit(job)
        _, snap = job.future.result(10)
        assert first.model.data == {} and first.counts == {}  # what a reader holds stays as it was
        assert snap.model is not holder.model and snap.model.data == {"x": 1}
    finally:
        holder.close()


class _Disk:
    """What a stand-in model made durable: ``loader`` rebuilds a model from it."""

    def __init__(self):
        self.data: dict[str, int] = {}
        self.loads = 0

    def loader(self):
        self.loads += 1
        m = _Disk.Model(self)
        m.data = dict(self.data)
        return m

    class Model(_Learner):
        def __init__(self, disk):
            super().__init__()
            self.disk = disk
            self.fail_log = False

        def log(self):
            if self.fail_log:
                raise OSError("disk full")
            for labels in self.unlogged:
                for lab in labels:
                    self.disk.data[lab] = self.disk.data.get(lab, 0) + 1
            super().log()


def test_a_change_that_fails_half_way_sends_the_writer_back_to_disk():
    from earmark.service.state import WriteJob

    disk = _Disk()
    holder = ModelHolder(Path("."), 10, compact_idle=60, loader=disk.loader)
    holder.install(disk.loader())
    gate = threading.Event()
    first = WriteJob(Future(), lambda: None, validate=gate.wait, learn=(["a0"], "a", ["n"]))
    group = [_learn_job("b0", "b"), _learn_job("torn0", "t"), _learn_job("c0", "c")]
    holder.start()
    try:
        holder.submit(first)
        for j in group:
            holder.submit(j)
        gate.set()
        first.future.result(10)
        _, snap_b = group[0].future.result(10)
        with pytest.raises(RuntimeError):
            group[1].future.result(10)
        _, snap_c = group[2].future.result(10)
        assert disk.loads == 3  # the install, a reload after the group's torn learn, one after the request alone
        assert snap_c.counts == {"a": 1, "b": 1, "c": 1}  # b (whole, logged before the reload) and c kept
        assert disk.data == {"a": 1, "b": 1, "c": 1} and "t" not in holder.model.data
    finally:
        holder.close()


def test_a_change_that_cannot_be_made_durable_is_refused_and_not_applied():
    disk = _Disk()
    holder = ModelHolder(Path("."), 10, compact_idle=60, loader=disk.loader)
    holder.install(disk.loader())
    holder.model.fail_log = True
    holder.start()
    try:
        job = _learn_job("x0")
        holder.submit(job)
        with pytest.raises(OSError):
            job.future.result(10)
        assert holder.snapshot.counts == {} and holder.model.data == {} and disk.data == {}
        job = _learn_job("x1")  # the reloaded model logs again
        holder.submit(job)
        _, snap = job.future.result(10)
        assert snap.counts == {"x": 1} and disk.data == {"x": 1}
    finally:
        holder.close()


def _multipart(files: list[tuple[str, bytes]], boundary: str = "xyzzy") -> bytes:
    out = b""
    for name, data in files:
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                "Content-Type: audio/wav\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _request(body: bytes, chunk: int = 1000):
    from starlette.requests import Request

    parts = [body[i: i + chunk] for i in range(0, len(body), chunk)]

    async def receive():
        data = parts.pop(0) if parts else b""
        return {"type": "http.request", "body": data, "more_body": bool(parts)}

    headers = [(b"content-type", b"multipart/form-data; boundary=xyzzy"), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def test_uploads_stay_in_memory_until_the_budget_then_spill(tmp_path):
    import asyncio

    from earmark.audio import AudioBytes
    from earmark.service.uploads import receive_uploads

    small, big = b"a" * 3000, b"b" * 9000
    body = _multipart([("one.wav", small), ("two.wav", big), ("three.wav", small)])
    up = asyncio.run(receive_uploads(_request(body), 10**6, 8, str(tmp_path), memory_bytes=10**6))
    assert up.dir is None and not list(tmp_path.iterdir())  # nothing touched the disk
    assert [s.data for s in up.sources] == [small, big, small]
    assert all(isinstance(s, AudioBytes) for s in up.sources) and up.names == ["one.wav", "two.wav", "three.wav"]
    up.close()

    up = asyncio.run(receive_uploads(_request(body), 10**6, 8, str(tmp_path), memory_bytes=5000))
    first, second, third = up.sources
    assert isinstance(first, AudioBytes) and first.data == small  # under the budget
    assert second.read_bytes() == big and third.read_bytes() == small  # past it: on disk, whole
    assert up.original(second) == "two.wav" and second.parent == up.dir and up.dir.parent == tmp_path
    up.close()
    assert not up.dir.exists()


def test_the_process_wide_memory_budget_spills_what_it_cannot_hold_and_is_given_back(tmp_path):
    import asyncio

    from earmark.audio import AudioBytes
    from earmark.service.uploads import MemoryBudget, receive_uploads

    budget = MemoryBudget(10_000)
    first = asyncio.run(receive_uploads(_request(_multipart([("a.wav", b"a" * 6000)])), 10**6, 8, str(tmp_path),
                                        memory_bytes=10**6, budget=budget))
    assert isinstance(first.sources[0], AudioBytes) and budget.used == 6000
    second = asyncio.run(receive_uploads(_request(_multipart([("b.wav", b"b" * 6000)])), 10**6, 8, str(tmp_path),
                                         memory_bytes=10**6, budget=budget))
    spilled = second.sources[0]
    assert not isinstance(spilled, AudioBytes) and spilled.read_bytes() == b"b" * 6000  # on disk, whole
    assert budget.used == 6000  # the spilled bytes were given back
    second.close()
    first.close()
    assert budget.used == 0
    third = asyncio.run(receive_uploads(_request(_multipart([("c.wav", b"c" * 6000)])), 10**6, 8, str(tmp_path),
                                        memory_bytes=10**6, budget=budget))
    assert isinstance(third.sources[0], AudioBytes)  # room again
    third.close()
    assert budget.used == 0
