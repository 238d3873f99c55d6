"""Run the app under uvicorn, holding the model directory's writer lock for the server's lifetime."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from earmark.service.config import ConfigError, ServiceConfig


def serve(config: ServiceConfig, *, access_log: bool = True, log_level: str = "info") -> None:
    """Start the server; returns when it stops. Raises ConfigError / ModelLockedError before binding a port."""
    config.check()
    path = Path(config.model)
    if not path.is_dir():
        raise ConfigError(f"{path}: model directory not found")
    import uvicorn

    from earmark.model import Model
    from earmark.service.app import create_app

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lock = Model.lock(path) if config.mutating else contextlib.nullcontext()
    with lock:
        app = create_app(config, locked=True)
        uvicorn.run(app, host=config.host, port=config.port, access_log=access_log, log_level=log_level,
                    timeout_graceful_shutdown=30)
