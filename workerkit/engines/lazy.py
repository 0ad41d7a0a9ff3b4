"""Public names of an engine package, imported from their own module on first use (PEP 562).

The supervisor needs only each engine's :class:`~workerkit.engines.base.Engine` class, and the
package facades must not import the engine's libraries (SQLAlchemy, rq, Celery) for it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

__all__ = ("lazy_attribute", "lazy_dir")


def lazy_attribute(
    package: str, homes: Mapping[str, str], namespace: MutableMapping[str, Any], name: str
) -> Any:
    """``name`` of ``package``, from its module ``homes[name]``; cached in ``namespace``."""
    home = homes.get(name)
    if home is None:
        if not name.startswith("_"):
            # A submodule not imported yet (``import workerkit; workerkit.settings``), as an
            # eager package's imports made it an attribute before.
            with contextlib.suppress(ModuleNotFoundError):
                return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{home}"), name)
    namespace[name] = value
    return value


def lazy_dir(namespace: Mapping[str, Any], public: Sequence[str]) -> list[str]:
    """``dir()`` of a lazy package: what it holds and the public names it would import."""
    return sorted({*namespace, *public})
