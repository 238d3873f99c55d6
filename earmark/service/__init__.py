"""earmark as an HTTP service: `earmark serve MODEL` (FastAPI under uvicorn). Needs the `service` extra."""

from earmark.service.app import create_app
from earmark.service.config import ConfigError, ServiceConfig, read_token
from earmark.service.server import serve

__all__ = ["ConfigError", "ServiceConfig", "create_app", "read_token", "serve"]
