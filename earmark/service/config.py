"""Service settings: one dataclass with safe defaults, and where the bearer token comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_ENV = "EARMARK_TOKEN"
TOKEN_FILE_ENV = "EARMARK_TOKEN_FILE"
MIN_TOKEN_CHARS = 16


class ConfigError(ValueError):
    """The service cannot start with these settings (e.g. mutating mode without a token)."""


@dataclass
class ServiceConfig:
    """What `earmark serve` runs with. Every limit is per request unless it says otherwise."""

    model: str | Path = ""
    host: str = "127.0.0.1"
    port: int = 8000
    read_only: bool = False
    token: str | None = field(default=None, repr=False)  # never printed: repr hides it
    device: str = "cpu"
    # uploads
    max_request_bytes: int = 20 * 2**20  # all parts of one request together, counted while streaming
    max_files: int = 32  # audio parts per request
    max_clip_seconds: float = 30.0  # a clip to classify or learn from
    max_long_file_seconds: float = 600.0  # a file classified window by window (window=...)
    min_window_seconds: float = 0.1
    max_windows: int = 2000  # windows per windowed file
    max_top_k: int = 50
    # concurrency
    learn_queue: int = 4  # learn/forget requests admitted at once (one runs, the rest wait); more -> 429
    classify_workers: int = 1  # threads classifying clips; each batches whatever is queued
    window_workers: int = 1  # threads classifying long files window by window (their own queue)
    classify_batch: int = 32  # most clips in one prediction batch
    torch_threads: int = 1  # intra-op threads per worker: 1 avoids spin contention on a shared CPU
    classify_queue: int = 256  # classify requests waiting for a worker; more -> 429
    temp_dir: str | None = None  # where uploads spill (default: the system temp dir)
    upload_memory_bytes: int = 8 * 2**20  # a request's files kept in memory before they spill to temp_dir
    upload_memory_total: int = 64 * 2**20  # all requests' in-memory files together; past it new bytes spill
    # durability: a change is acknowledged once its record is fsynced to the model's change log; the log is
    # folded into a full save after this many changes, or once no write came for compact_idle seconds
    compact_every: int = 64
    compact_idle: float = 5.0
    load_delay: float = 0.0  # seconds to wait before loading the model (tests use it to see "not ready")

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_files", "learn_queue", "classify_workers", "window_workers",
                     "classify_batch", "torch_threads", "classify_queue", "max_windows", "max_top_k", "compact_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_clip_seconds <= 0 or self.max_long_file_seconds <= 0:
            raise ConfigError("clip duration limits must be positive")
        if self.upload_memory_total < 0:
            raise ConfigError("upload_memory_total must be >= 0")
        if self.upload_memory_bytes < 0:
            raise ConfigError("upload_memory_bytes must be >= 0 (0: every upload goes to temp_dir)")

    @property
    def mutating(self) -> bool:
        return not self.read_only

    def check(self) -> None:
        """Refuse to start in mutating mode without a usable token."""
        if self.read_only:
            return
        if not self.token:
            raise ConfigError(
                f"mutating mode needs a bearer token: set {TOKEN_ENV}, or {TOKEN_FILE_ENV} / --token-file to a "
                "file holding it (or run with --read-only)"
            )
        if len(self.token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"the bearer token is too short (at least {MIN_TOKEN_CHARS} characters)")


def read_token(token_file: str | Path | None = None, environ: dict | None = None) -> str | None:
    """The token from ``token_file``, else $EARMARK_TOKEN_FILE, else $EARMARK_TOKEN; None when none is set."""
    env = os.environ if environ is None else environ
    path = token_file or env.get(TOKEN_FILE_ENV)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: token file not found")
        token = p.read_text().strip()
        if not token:
            raise ConfigError(f"{p}: token file is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    return token or None
