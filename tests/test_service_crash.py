"""Durability: SIGKILL the server in the middle of a stream of learn requests, restart it, and find every
acknowledged change and no partial one."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from earmark.service.testing import TOKEN, ServerProcess, build_model, write_clips  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}
NEW_CLIPS = 3  # each "new" request teaches a fresh label from this many clips
MORE_CLIPS = 2  # each "more" request adds this many clips to the base label "low"


def _labels(url: str) -> dict[str, int]:
    r = httpx.get(url + "/labels", timeout=30)
    r.raise_for_status()
    return {lab["name"]: lab["clips"] for lab in r.json()["labels"]}


def test_sigkill_during_learn_stream_loses_nothing_acknowledged(tmp_path):
    model = build_model(tmp_path / "model")
    uploads = tmp_path / "uploads"  # requests in flight at the kill leave their temp files here
    uploads.mkdir()
    srv = ServerProcess(model, args=["--learn-queue", "8", "--temp-dir", str(uploads)],
                        log_path=tmp_path / "server.log").start()
    base = _labels(srv.url)
    acked_new: list[str] = []
    acked_more = 0
    sent_new: list[str] = []
    sent_more = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        nonlocal acked_more, sent_more
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i in range(40):  # bounded: the kill comes long before
                if stop.is_set():
                    return
                new = (i + worker) % 2 == 0
                name = f"crash-{worker}-{i}" if new else "low"
                n = NEW_CLIPS if new else MORE_CLIPS
                kind = 1200.0 + 50 * i + 25 * worker if new else 220.0
                clips = write_clips(tmp_path / "clips", f"{worker}-{i}", kind, n, first_seed=1000 * worker + 10 * i)
                files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in clips]
                with lock:
                    if new:
                        sent_new.append(name)
                    else:
                        sent_more += 1
                try:
                    r = c.post(f"/labels/{name}/examples", files=files, headers=AUTH)
                except httpx.TransportError:
                    return  # the server died under this request: not acknowledged
                assert r.status_code == 200, r.text
                with lock:
                    if new:
                        acked_new.append(name)
                    else:
                        acked_more += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(acked_new) + acked_more < 5:
            assert time.monotonic() < deadline, f"too few learns acknowledged:\n{srv.log()[-2000:]}"
            time.sleep(0.01)
        time.sleep(0.15)  # land inside the next requests, not between them
        srv.kill()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert srv.proc.returncode == -9

    with lock:
        acked, more, sent, sent_m = list(acked_new), acked_more, list(sent_new), sent_more

    in_flight = len(sent) - len(acked) + sent_m - more
    print(f"\nacknowledged {len(acked)} new labels + {more} additions; {in_flight} request(s) in flight at the kill")
    again = ServerProcess(model, log_path=tmp_path / "server2.log").start()  # the lock died with the process
    try:
        after = _labels(again.url)
    finally:
        again.stop()
    for name in acked:
        assert after.get(name) == NEW_CLIPS, (name, after)
    for name in set(after) - set(base) - set(acked):
        assert name in sent and after[name] == NEW_CLIPS, (name, after)  # unacknowledged: whole or absent
    extra_low = after["low"] - base["low"] - MORE_CLIPS * more
    assert extra_low % MORE_CLIPS == 0 and 0 <= extra_low // MORE_CLIPS <= sent_m - more, (after["low"], base, more)
    for name in set(base):
        if name != "low":
            assert after[name] == base[name]
