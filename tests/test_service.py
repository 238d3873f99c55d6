"""The HTTP service end to end: the real server in a subprocess on a loopback port, driven over HTTP."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from earmark.service.testing import (  # noqa: E402
    BASE_SOUNDS,
    NEW_SOUND,
    REPO_ROOT,
    TOKEN,
    ServerProcess,
    build_model,
    sound,
    write_clip,
    write_clips,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT_ARGS = ["--max-request-bytes", "300KB", "--max-clip-seconds", "5", "--max-files", "8", "--learn-queue", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def server(work):
    model = build_model(work / "model")
    srv = ServerProcess(model, args=LIMIT_ARGS, log_path=work / "server.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


def files(*paths: Path, name: str = "files") -> list:
    return [(name, (p.name, p.read_bytes(), "audio/wav")) for p in paths]


def top(resp) -> str:
    return resp.json()["results"][0]["top"][0]["label"]


def test_classify_base_sounds(client, work):
    held_out = [write_clip(work / "held" / f"{name}.wav", kind, seed=900 + k)
                for k, (name, kind) in enumerate(BASE_SOUNDS.items())]
    r = client.post("/classify", params={"top_k": 2}, files=files(*held_out))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [res["file"] for res in body["results"]] == [p.name for p in held_out]
    for res, name in zip(body["results"], BASE_SOUNDS, strict=True):
        probs = [t["probability"] for t in res["top"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and 0 <= probs[-1] <= probs[0] <= 1
        assert res["top"][0]["label"] == name, res
    assert isinstance(body["version"], int)


def test_learn_new_label_classify_then_forget(client, work):
    name, freq = NEW_SOUND
    train = write_clips(work / "new", name, freq, 5)
    held_out = write_clip(work / "new" / "held-out.wav", freq, seed=999)
    before = client.get("/labels").json()
    assert name not in {lab["name"] for lab in before["labels"]}

    r = client.post(f"/labels/{name}/examples", files=files(*train), headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["learned"] == 5 and body["counts"][name] == 5 and name in body["new"]
    assert body["version"] > before["version"]
    # visible to the very next request
    labels = {lab["name"]: lab["clips"] for lab in client.get("/labels").json()["labels"]}
    assert labels[name] == 5
    r = client.post("/classify", files=files(held_out))
    assert r.status_code == 200 and top(r) == name, r.text

    # forget one clip exactly, then the whole label
    r = client.post(f"/labels/{name}/forget", files=files(train[0]), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["counts"][name] == 4
    r = client.delete(f"/labels/{name}", headers=AUTH)
    assert r.status_code == 200, r.text
    assert name not in r.json()["counts"]
    assert name not in {lab["name"] for lab in client.get("/labels").json()["labels"]}
    r = client.post("/classify", files=files(held_out))
    assert r.status_code == 200 and top(r) != name
    assert client.delete(f"/labels/{name}", headers=AUTH).status_code == 404


def test_auth_refusals(client, server, work):
    clip = write_clip(work / "auth.wav", 440.0)
    r = client.post("/labels/x/examples", files=files(clip))
    assert r.status_code == 401 and "bearer" in r.json()["error"].lower()
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/labels/x/examples", files=files(clip), headers={"Authorization": "Bearer wrong-token-value"})
    assert r.status_code == 403 and r.json() == {"error": "wrong bearer token"}
    r = client.post("/labels/x/examples", files=files(clip), headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401
    assert client.delete("/labels/low").status_code == 401
    assert client.post("/labels/low/forget", files=files(clip)).status_code == 401
    assert TOKEN not in server.log()


def _chunked(data: bytes, size: int = 16384):
    for i in range(0, len(data), size):
        yield data[i: i + size]


def test_upload_refusals(client, work):
    ok = write_clip(work / "ok.wav", 440.0)
    junk = work / "corrupt.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio at all" * 10)
    empty = work / "empty.wav"
    empty.write_bytes(b"")
    long_clip = write_clip(work / "long.wav", 440.0, seconds=6.0)  # over --max-clip-seconds 5
    big = work / "big.wav"
    big.write_bytes(b"\x00" * 400_000)  # over --max-request-bytes 300KB

    def check(r, status, *words):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        for w in words:
            assert w in err, err
        return err

    err = check(client.post("/classify", files=files(junk)), 400, "corrupt.wav")
    assert "/tmp" not in err and "earmark-req" not in err  # the client's name, not our temp path
    check(client.post("/classify", files=files(empty)), 400, "empty.wav", "empty")
    check(client.post("/classify", files=[("files", ("notes.txt", b"hello", "text/plain"))]), 415, "notes.txt")
    check(client.post("/classify", content=b"{}", headers={"content-type": "application/json"}), 415, "multipart")
    check(client.post("/classify", files={"note": (None, "a form field, no file")}), 400, "no audio files")
    check(client.post("/classify", files=files(long_clip)), 413, "long.wav", "5 s")
    check(client.post("/classify", files=files(big)), 413, "limit")
    check(client.post("/classify", files=files(*[ok] * 9)), 413, "8 files")
    check(client.post("/classify", params={"top_k": "many"}, files=files(ok)), 400, "top_k")
    check(client.post("/classify", params={"top_k": 0}, files=files(ok)), 400, "top_k")
    check(client.post("/classify", params={"hop": 1}, files=files(ok)), 400, "hop")

    # no Content-Length: the limit is counted while the body streams in
    boundary = "earmarkboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/classify", content=_chunked(body),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    check(r, 413, "limit")

    # learning from bad audio is refused and changes nothing
    before = client.get("/labels").json()
    check(client.post("/labels/low/examples", files=files(ok, junk), headers=AUTH), 400, "corrupt.wav")
    check(client.post("/labels/fresh/examples", files=files(empty), headers=AUTH), 400, "empty.wav")
    check(client.post("/labels/fresh/examples", files=files(long_clip), headers=AUTH), 413, "long.wav")
    assert client.get("/labels").json() == before
    # the server is fine afterwards
    assert client.post("/classify", files=files(ok)).status_code == 200


def test_bad_label_names_and_unknown_labels(client, work):
    clip = write_clip(work / "u.wav", 440.0)
    assert client.delete("/labels/no-such-label", headers=AUTH).status_code == 404
    r = client.post("/labels/no-such-label/forget", files=files(clip), headers=AUTH)
    assert r.status_code == 404 and "no-such-label" in r.json()["error"]
    r = client.post("/labels/%20padded%20/examples", files=files(clip), headers=AUTH)
    assert r.status_code == 400
    r = client.post("/labels/" + "x" * 65 + "/examples", files=files(clip), headers=AUTH)
    assert r.status_code == 400
    r = client.post("/labels/low/forget", files=files(clip), headers=AUTH)  # never learned
    assert r.status_code in (400, 404) and "error" in r.json()
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_windowed_classify(client, work):
    low, mid = BASE_SOUNDS["low"], BASE_SOUNDS["mid"]
    x = np.concatenate([sound(low, 2.0, seed=7), sound(mid, 2.0, seed=8)])
    path = work / "long-file.wav"
    sf.write(str(path), x, 16000)
    r = client.post("/classify", params={"window": 1.0, "hop": 1.0, "top_k": 1}, files=files(path))
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["file"] == "long-file.wav"
    wins = res["windows"]
    assert len(wins) >= 4
    assert wins[0]["start"] == 0 and wins[0]["top"][0]["label"] == "low"
    assert wins[3]["top"][0]["label"] == "mid"
    assert all(len(w["top"]) == 1 for w in wins)


def test_learn_queue_full_is_429(client, server, work):
    """--learn-queue 1: a learn still uploading holds the only slot; the next one is told 429."""
    boundary = "slowboundary"
    release = threading.Event()
    result: dict = {}

    def slow_body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"slow.wav\"\r\n"
               "Content-Type: audio/wav\r\n\r\n").encode()
        release.wait(30)
        yield b"not audio" + f"\r\n--{boundary}--\r\n".encode()

    def slow():
        with httpx.Client(base_url=server.url, timeout=60.0) as c:
            result["r"] = c.post("/labels/slow/examples", content=slow_body(),
                                 headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})

    t = threading.Thread(target=slow)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while "earmark_learn_queue 1.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the slow learn request was never admitted"
            time.sleep(0.05)
        r = client.post("/labels/other/examples", files=files(write_clip(work / "q.wav", 440.0)), headers=AUTH)
        assert r.status_code == 429 and "queue" in r.json()["error"] and r.headers["retry-after"]
    finally:
        release.set()
        t.join(30)
    assert result["r"].status_code == 400  # its audio was bad: refused, nothing applied
    assert "slow" not in {lab["name"] for lab in client.get("/labels").json()["labels"]}


def test_model_info_docs_and_page(client):
    info = client.get("/model").json()
    assert info["read_only"] is False and info["limits"]["max_files"] == 8
    assert "version" in info and "generation" in info
    assert "path" not in info
    spec = client.get("/openapi.json").json()
    for path in ("/classify", "/labels/{name}/examples", "/labels/{name}", "/labels/{name}/forget", "/labels",
                 "/model", "/health/live", "/health/ready", "/metrics"):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "earmark" in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text.replace("http://127.0.0.1", "") and "https://" not in page.text  # no CDN
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def _sample(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line) or re.match(rf"^{name} (\S+)$", line)
        if not m:
            continue
        if len(m.groups()) == 1:
            if not labels:
                return float(m.group(1))
            continue
        got = ",".join(sorted(m.group(1).split(",")))
        if got == want:
            return float(m.group(2))
    return 0.0


def test_metrics_count_requests(client, work):
    clip = write_clip(work / "m.wav", 220.0)
    before = client.get("/metrics").text
    n0 = _sample(before, "earmark_requests_total", endpoint="/classify", method="POST", status="200")
    for _ in range(3):
        assert client.post("/classify", files=files(clip)).status_code == 200
    client.delete("/labels/absent", headers=AUTH)
    text = client.get("/metrics").text
    assert _sample(text, "earmark_requests_total", endpoint="/classify", method="POST", status="200") == n0 + 3
    assert _sample(text, "earmark_requests_total", endpoint="/labels/{name}", method="DELETE", status="404") >= 1
    assert _sample(text, "earmark_request_seconds_count", endpoint="/classify", method="POST") >= n0 + 3
    assert _sample(text, "earmark_model_ready") == 1
    assert _sample(text, "earmark_model_version") >= 1
    assert _sample(text, "earmark_label_clips", label="low") == 6
    assert _sample(text, "earmark_model_labels") == len(client.get("/labels").json()["labels"])
    assert "/labels/absent" not in text  # endpoints are route templates, not raw paths


def test_second_writer_is_refused(server):
    """The running server holds the model's writer lock: a second mutating server on it stops at once."""
    other = ServerProcess(server.model)
    proc = subprocess.run(other.command(), env=other.env(), cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "earmark: error:" in proc.stderr


def test_ready_only_after_load_and_read_only_mode(work, tmp_path):
    model = build_model(tmp_path / "model")
    srv = ServerProcess(model, token=None, read_only=True, args=["--load-delay", "3"],
                        log_path=tmp_path / "server.log")
    srv.start(wait=False)
    try:
        srv.wait_listening()
        with httpx.Client(base_url=srv.url, timeout=30.0) as c:
            r = c.get("/health/ready")
            assert r.status_code == 503 and "loading" in r.json()["error"]
            assert c.get("/health/live").status_code == 200
            clip = write_clip(tmp_path / "c.wav", 220.0)
            assert c.post("/classify", files=files(clip)).status_code == 503
            srv.wait_ready()
            assert c.get("/health/ready").status_code == 200
            r = c.post("/classify", files=files(clip))
            assert r.status_code == 200 and top(r) == "low"
            r = c.post("/labels/x/examples", files=files(clip), headers=AUTH)
            assert r.status_code == 403 and "read-only" in r.json()["error"]
            assert c.delete("/labels/low").status_code == 403
            assert c.get("/model").json()["read_only"] is True
    finally:
        srv.stop()


def test_refuses_to_start_mutating_without_token(tmp_path):
    (tmp_path / "model").mkdir()
    srv = ServerProcess(tmp_path / "model", token=None)
    proc = subprocess.run(srv.command(), env=srv.env(), cwd=str(REPO_ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "EARMARK_TOKEN" in proc.stderr and "--read-only" in proc.stderr
    short = subprocess.run(srv.command(), env={**srv.env(), "EARMARK_TOKEN": "short"}, cwd=str(REPO_ROOT),
                           capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "too short" in short.stderr


def test_unknown_threshold_and_reject_unknown(client, work):
    clip = write_clip(work / "unk.wav", 220.0, seed=321)
    r = client.post("/classify", params={"unknown_threshold": 1e9, "top_k": 2}, files=files(clip))
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["top"][0]["label"] == "unknown" and len(res["top"]) == 2
    r = client.post("/classify", params={"reject_unknown": "false", "unknown_threshold": 1e9}, files=files(clip))
    assert r.status_code == 200 and top(r) == "low"
    assert client.post("/classify", params={"unknown_threshold": "inf"}, files=files(clip)).status_code == 400
    r = client.post("/labels/unknown/examples", files=files(clip), headers=AUTH)
    assert r.status_code == 400 and "reserved" in r.json()["error"]
