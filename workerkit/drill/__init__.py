"""``workerkit drill``: canary jobs through a rollout, and the report of what happened to them."""

from __future__ import annotations

__all__ = ()
