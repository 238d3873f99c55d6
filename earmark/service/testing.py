"""Helpers for the service's tests and load benchmark: synthetic clips, a small real model, and the
real server started as a subprocess on a free loopback port."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
REPO_ROOT = Path(__file__).resolve().parents[2]
# Base classes of the test model: far-apart tones and a noise band, easy for any embedder to tell apart.
BASE_SOUNDS = {"low": 220.0, "mid": 880.0, "noise": "noise"}
NEW_SOUND = ("whistle", 3520.0)  # taught over HTTP in the tests
TOKEN = "test-token-0123456789abcdef"


def sound(kind: float | str, seconds: float = 1.0, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """A pure tone at ``kind`` Hz (random phase, slight level change, a little noise), or band noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    if kind == "noise":
        x = rng.standard_normal(len(t))
        x = np.convolve(x, np.ones(8) / 8, mode="same") * 0.6  # a low-passed hiss
    else:
        freq = float(kind) * (1 + rng.uniform(-0.01, 0.01))
        x = rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
        x += 0.005 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def write_clip(path: str | Path, kind: float | str, seconds: float = 1.0, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), sound(kind, seconds, seed), RATE, subtype="PCM_16")
    return path


def write_clips(folder: str | Path, name: str, kind: float | str, n: int, seconds: float = 1.0,
                first_seed: int = 0) -> list[Path]:
    return [write_clip(Path(folder) / f"{name}-{first_seed + i}.wav", kind, seconds, seed=first_seed + i)
            for i in range(n)]


_TEMPLATE: Path | None = None


# A smaller random-feature buffer than the analytic learner's default (2048): a learn's solve and save
# take tens of ms instead of about a second on 2 cores, which keeps the tests quick.
TEST_LEARNER_PARAMS = {"buffer_size": 512}


def build_model(dest: str | Path, clips_per_class: int = 6, learner_params: dict | None = None) -> Path:
    """A small real model on the base sounds, saved at ``dest``. Built once per process, then copied."""
    global _TEMPLATE
    dest = Path(dest)
    if _TEMPLATE is None or not _TEMPLATE.is_dir():
        from earmark.model import Model
        from earmark.training.supervised import TrainConfig

        learner_params = TEST_LEARNER_PARAMS if learner_params is None else learner_params
        work = Path(tempfile.mkdtemp(prefix="earmark-test-model-"))
        atexit.register(shutil.rmtree, work, True)
        paths, labels = [], []
        for k, (name, kind) in enumerate(BASE_SOUNDS.items()):
            for p in write_clips(work / "clips", name, kind, clips_per_class, first_seed=100 * k):
                paths.append(str(p))
                labels.append(name)
        model = Model.train(paths, labels, encoder="fast", learner="analytic", learner_params=learner_params,
                            train=TrainConfig(epochs=1), clip_seconds=1.0, progress=False)
        model.save(work / "model")
        _TEMPLATE = work / "model"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(_TEMPLATE, dest)
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`earmark serve` in a subprocess on 127.0.0.1; ``start()`` waits for /health/ready unless told not to."""

    def __init__(self, model: str | Path, *, token: str | None = TOKEN, read_only: bool = False,
                 args: list[str] | tuple[str, ...] = (), log_path: str | Path | None = None) -> None:
        self.model = Path(model)
        self.token = token
        self.read_only = read_only
        self.args = list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path is not None else None  # made by start() when not given
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "earmark.cli", "serve", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        return cmd + (["--read-only"] if self.read_only else [])

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("EARMARK_TOKEN_FILE", None)
        if self.token:
            env["EARMARK_TOKEN"] = self.token
        else:
            env.pop("EARMARK_TOKEN", None)
        return env

    def start(self, wait: bool = True, timeout: float = 90.0) -> ServerProcess:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="earmark-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO_ROOT))
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def wait_listening(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"server did not listen within {timeout} s:\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if httpx.get(self.url + "/health/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready within {timeout} s:\n{self.log()[-3000:]}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
