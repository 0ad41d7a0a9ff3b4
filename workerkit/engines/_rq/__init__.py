"""The RQ engine's internals: Redis leases and scripts, the worker classes, the task allowlist.

The public names are re-exported by :mod:`workerkit.engines.rq`; import them from there.
"""

from __future__ import annotations

__all__ = ()
