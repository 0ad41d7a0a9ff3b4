"""The drill's side of the Redis engines (rq, celery): enqueue canaries, read their records."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workerkit.errors import ConfigurationError

if TYPE_CHECKING:
    from workerkit.drill.run import DrillSpec, EngineDriver

__all__ = ("open_redis_driver",)


def open_redis_driver(spec: DrillSpec) -> EngineDriver:
    raise ConfigurationError(f"workerkit drill {spec.engine}: not available yet")
