"""Load test of `earmark serve` on loopback: N clients mixing classify and learn for a fixed time.

    python benchmarks/service_load.py --clients 8 --seconds 10 --learn 0.1
    python benchmarks/service_load.py --rates 25,50,100 --seconds 8     # open loop at fixed request rates

Starts the real server in a subprocess on 127.0.0.1 (a small model built on synthetic tones unless
--model is given; the model is copied, never changed in place), then prints requests/s, p50/p95/p99
latency per endpoint and errors, and checks that
  * the final labels and clip counts equal what the acknowledged learn requests imply, and
  * every learn is visible to the next classify its client sends (its version is at least the learn's).
Beside the clients' latencies (which include the load generator's own threads) it prints the server's
view from /metrics: the share of classify requests answered within 100 ms and the histogram bucket
that holds their p99 (first byte in to last byte out).
Bounded: at most --seconds per run (120 at most) and --max-requests per run; loopback only.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from earmark.service.testing import BASE_SOUNDS, RATE, TOKEN, ServerProcess, build_model, sound  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}
BENCH_LABELS = {"bench-a": 2600.0, "bench-b": 3100.0, "bench-c": 4200.0, "bench-d": 5300.0}
MAX_SECONDS = 120.0


def wav_bytes(kind, seconds: float, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, sound(kind, seconds, seed), RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class Run:
    def __init__(self, url: str, clients: int, seconds: float, learn: float, clip_seconds: float,
                 max_requests: int, rate: float | None, seed: int) -> None:
        self.url, self.clients, self.seconds, self.learn = url, clients, seconds, learn
        self.max_requests, self.rate = max_requests, rate
        rng = np.random.default_rng(seed)
        kinds = list(BASE_SOUNDS.values())
        self.classify_clips = [wav_bytes(kinds[i % len(kinds)], clip_seconds, 5000 + i) for i in range(12)]
        # Model.learn refuses a clip it has learned already: every learn sends fresh audio
        self.clip_seconds = clip_seconds
        self.learn_seed = 10_000 * (seed + 1)
        self.rng = rng
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = {"classify": [], "learn": []}
        self.errors: dict[str, int] = {}
        self.acked: dict[str, int] = {}  # label -> clips acknowledged
        self.sent = 0
        self.visibility_checks = 0
        self.visibility_failures = 0

    def _error(self, what: str) -> None:
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1

    def client(self, k: int, start: float) -> None:
        import httpx

        rng = np.random.default_rng(1000 + k)
        pending_version: int | None = None
        interval = self.clients / self.rate if self.rate else 0.0
        next_at = start + rng.uniform(0, interval) if interval else start
        with httpx.Client(base_url=self.url, timeout=30.0) as c:
            while True:
                now = time.perf_counter()
                if now - start >= self.seconds:
                    return
                with self.lock:
                    if self.sent >= self.max_requests:
                        return
                    self.sent += 1
                if interval:
                    if next_at > now:
                        time.sleep(next_at - now)
                    next_at += interval
                learn = rng.random() < self.learn
                if learn:
                    name = list(BENCH_LABELS)[int(rng.integers(len(BENCH_LABELS)))]
                    with self.lock:
                        self.learn_seed += 1
                        clip_seed = self.learn_seed
                    clip = wav_bytes(BENCH_LABELS[name], self.clip_seconds, clip_seed)
                    t0 = time.perf_counter()
                    try:
                        r = c.post(f"/labels/{name}/examples", files=[("files", ("clip.wav", clip, "audio/wav"))],
                                   headers=AUTH)
                    except httpx.HTTPError as exc:
                        self._error(f"learn {type(exc).__name__}")
                        continue
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        self._error(f"learn {r.status_code}")
                        continue
                    with self.lock:
                        self.lat["learn"].append(dt)
                        self.acked[name] = self.acked.get(name, 0) + 1
                    pending_version = r.json()["version"]
                else:
                    clip = self.classify_clips[int(rng.integers(len(self.classify_clips)))]
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/classify", files=[("files", ("clip.wav", clip, "audio/wav"))])
                    except httpx.HTTPError as exc:
                        self._error(f"classify {type(exc).__name__}")
                        continue
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        self._error(f"classify {r.status_code}")
                        continue
                    with self.lock:
                        self.lat["classify"].append(dt)
                        if pending_version is not None:
                            self.visibility_checks += 1
                            if r.json()["version"] < pending_version:
                                self.visibility_failures += 1
                    pending_version = None

    def go(self) -> float:
        start = time.perf_counter()
        threads = [threading.Thread(target=self.client, args=(k, start)) for k in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 60)
        return time.perf_counter() - start


_BUCKET = re.compile(r'^earmark_request_seconds_bucket\{(?P<labels>[^}]*)\} (?P<n>[0-9.e+]+)$', re.MULTILINE)


def server_buckets(url: str, endpoint: str = "/classify") -> dict[float, float]:
    """Cumulative counts of the server's latency histogram for one endpoint: upper bound (s) -> requests."""
    import httpx

    out: dict[float, float] = {}
    for m in _BUCKET.finditer(httpx.get(url + "/metrics", timeout=30).text):
        labels = dict(kv.split("=", 1) for kv in m["labels"].split(","))
        if labels.get("endpoint", "").strip('"') == endpoint:
            le = labels["le"].strip('"')
            out[float("inf") if le == "+Inf" else float(le)] = float(m["n"])
    return out


def server_view(before: dict[float, float], after: dict[float, float], within: float = 0.1) -> str:
    """The run's classify requests as the server timed them: share within ``within`` s, the p99's bucket."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return "server side: no classify requests"
    share = delta.get(within, 0.0) / total
    p99 = next(le for le in sorted(delta) if delta[le] >= 0.99 * total)
    return (f"server side: {share:.1%} of classify requests within {within * 1000:.0f} ms; "
            f"p99 in the bucket <= {p99 * 1000:.0f} ms")


def report(run: Run, elapsed: float, label: str) -> None:
    total = sum(len(v) for v in run.lat.values())
    print(f"\n== {label}: {elapsed:.1f} s, {total / elapsed:.1f} ok requests/s, load average {load_average()}")
    print(f"{'endpoint':10s} {'n':>6s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
    for name, xs in run.lat.items():
        ms = [x * 1000 for x in xs]
        print(f"{name:10s} {len(xs):6d} {len(xs) / elapsed:7.1f} {percentile(ms, 50):8.1f} {percentile(ms, 95):8.1f} "
              f"{percentile(ms, 99):8.1f} {max(ms, default=float('nan')):8.1f}")
    errors = sum(run.errors.values())
    print(f"errors: {errors}" + (f" {run.errors}" if errors else ""))
    print(f"learn visible to the client's next classify: {run.visibility_checks - run.visibility_failures}/"
          f"{run.visibility_checks}")


def check_counts(url: str, base: dict[str, int], acked: dict[str, int]) -> bool:
    import httpx

    got = {lab["name"]: lab["clips"] for lab in httpx.get(url + "/labels", timeout=30).json()["labels"]}
    want = dict(base)
    for name, n in acked.items():
        want[name] = want.get(name, 0) + n
    ok = got == want
    print(f"final labels and counts equal the acknowledged learns: {'OK' if ok else 'MISMATCH'}"
          + ("" if ok else f"\n  want {want}\n  got  {got}"))
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory (copied first); default: build a small one on tones")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help=f"per run, at most {MAX_SECONDS:g}")
    p.add_argument("--learn", type=float, default=0.1, help="share of requests that learn (default 0.1)")
    p.add_argument("--clip-seconds", type=float, default=1.0)
    p.add_argument("--rates", help="comma-separated total request rates (open loop); default: closed loop")
    p.add_argument("--max-requests", type=int, default=20000, help="per run")
    p.add_argument("--workers", type=int, default=1, help="server clip-classify workers (the server's default: 1)")
    p.add_argument("--server-args", default="", help="extra `earmark serve` arguments (--server-args='...')")
    p.add_argument("--buffer-size", type=int, default=2048,
                   help="analytic learner's buffer for the built model (2048: the default; the tests use 512)")
    args = p.parse_args(argv)
    seconds = min(args.seconds, MAX_SECONDS)

    work = Path(tempfile.mkdtemp(prefix="earmark-load-"))
    try:
        model = work / "model"
        if args.model:
            shutil.copytree(args.model, model)
        else:
            build_model(model, learner_params={"buffer_size": args.buffer_size})
        srv = ServerProcess(model, args=["--no-access-log", "--learn-queue", str(4 * args.clients),
                                         "--workers", str(args.workers), *args.server_args.split()],
                            log_path=work / "server.log")
        srv.start()
        try:
            import httpx

            base = {lab["name"]: lab["clips"] for lab in httpx.get(srv.url + "/labels").json()["labels"]}
            print(f"service_load: {args.clients} clients, {seconds:g} s per run, learn {args.learn:.0%}, "
                  f"{args.clip_seconds:g} s clips, server workers {args.workers}, cpus {os.cpu_count()}, "
                  f"{'given model' if args.model else f'analytic buffer {args.buffer_size}'}, "
                  f"load average {load_average()}")
            rates = [float(r) for r in args.rates.split(",")] if args.rates else [None]
            acked: dict[str, int] = {}
            ok = True
            for i, rate in enumerate(rates):
                run = Run(srv.url, args.clients, seconds, args.learn, args.clip_seconds, args.max_requests,
                          rate, seed=i)
                before = server_buckets(srv.url)
                elapsed = run.go()
                report(run, elapsed, f"open loop at {rate:g} req/s" if rate else "closed loop")
                print(server_view(before, server_buckets(srv.url)))
                for name, n in run.acked.items():
                    acked[name] = acked.get(name, 0) + n
                ok &= sum(run.errors.values()) == 0 and run.visibility_failures == 0
            ok &= check_counts(srv.url, base, acked)
        except BaseException:
            print("server log (last 3000 characters):\n" + srv.log()[-3000:], file=sys.stderr)
            raise
        finally:
            srv.stop()
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
