"""Public names of an engine package, imported from their own module on first use (PEP 562).

The supervisor needs only each engine's :class:`~workerkit.engines.base.Engine` class, and the
package facades must not import the engine's libraries (SQLAlchemy, rq, Celery) for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ("lazy_attribute",)


def lazy_attribute(
    package: str, homes: Mapping[str, str], namespace: MutableMapping[str, Any], name: str
) -> Any:
    """``name`` of ``package``, from its module ``homes[name]``; cached in ``namespace``."""
    home = homes.get(name)
    if home is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{home}"), name)
    namespace[name] = value
    return value
