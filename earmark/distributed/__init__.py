"""Scale out: embed a collection and learn from it on a Ray cluster (``pip install 'earmark[ray]'``).

Two engines behind ``earmark embed`` and ``earmark learn``:

* ``local``: the single-process path (``earmark.encoders.cache.embed_paths``, ``Model.learn``).
* ``ray``: Ray Data embeds with an actor pool, each actor holding the encoder; ``learn`` fits a fresh
  learner per shard on the workers and merges the statistics on the driver (``Model.merge``). The
  closed-form learners' statistics add up exactly, so the merged model equals the local one.

Ray is optional: nothing here imports it until a ray engine is asked for, and then
:func:`import_ray` says how to install it. See ``docs/scale.md``.
"""

from __future__ import annotations

from typing import Any

INSTALL_HINT = "pip install 'earmark[ray]'  (or: pip install 'ray[data]')"
ENGINES = ("local", "ray")


class EngineUnavailableError(ValueError):
    """An engine was asked for whose optional dependency is not installed; the message says how to install it."""


def import_ray() -> Any:
    """``ray`` with Ray Data, or an :class:`EngineUnavailableError` that names the install command."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Core alone has no actor-pool map_batches)
    except ImportError as exc:
        raise EngineUnavailableError(f"--engine ray needs Ray with Ray Data, which is not installed here ({exc}); "
                                     f"install it with: {INSTALL_HINT}") from None
    return ray


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "INSTALL_HINT", "EngineUnavailableError", "check_engine", "import_ray"]
