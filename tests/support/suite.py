"""What the conftest hooks share: the test layers (by directory), skipping on a missing server,
and the time each layer took.

Plain functions; ``tests/conftest.py`` holds the fixtures and hooks that call them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from tests.support import servers

__all__ = (
    "LAYERS",
    "TESTS_DIR",
    "find_program_or_skip",
    "layer_durations",
    "layer_of",
    "start_or_skip",
)

TESTS_DIR = Path(__file__).resolve().parents[1]
#: The top-level test directories, each also a marker: tests/unit -> ``unit``, and so on.
LAYERS = (
    "unit",
    "integration",
    "e2e",
    "compat",
    "faults",
    "chart",
    "docs",
    "drill",
    "browser",
)

_Server = TypeVar("_Server", servers.RedisServer, servers.PostgresServer)


def layer_of(path: Path) -> str | None:
    """The layer of a test file (its top-level directory under tests/), or None."""
    try:
        layer = path.resolve().relative_to(TESTS_DIR).parts[0]
    except (ValueError, IndexError):
        return None
    return layer if layer in LAYERS else None


def _unavailable(reason: str) -> NoReturn:
    """Skip locally; fail in CI, where a missing server means the suite proves nothing."""
    if os.environ.get("CI"):
        pytest.fail(
            f"{reason}\n(CI is set, so a missing server or program is a failure)", pytrace=False
        )
    pytest.skip(reason)


def start_or_skip(start: Callable[[], _Server]) -> _Server:
    """``start()``, or skip the test (fail it when ``CI`` is set) if the server is unavailable."""
    try:
        return start()
    except servers.ServerUnavailableError as exc:
        reason = str(exc)
    _unavailable(reason)  # outside the except block: no "during handling" traceback noise


def find_program_or_skip(names: Sequence[str], install: str) -> str:
    """The path of the first of ``names`` on PATH, or skip (fail when ``CI`` is set) naming
    ``install``, the command that provides it."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    _unavailable(f"none of {', '.join(names)} is installed: {install}")


def layer_durations(
    reports: Iterable[object], rootpath: Path
) -> dict[str, tuple[int, float, float]]:
    """Per layer: (tests run, seconds in their calls, seconds in setup + call + teardown).

    ``reports`` are whatever the terminal reporter collected; only test reports count, each
    test once however many phases it reported.
    """
    tests: dict[str, set[str]] = {}
    call: dict[str, float] = {}
    total: dict[str, float] = {}
    for report in reports:
        if not isinstance(report, pytest.TestReport):
            continue
        layer = layer_of(rootpath / report.nodeid.split("::", 1)[0]) or "other"
        tests.setdefault(layer, set()).add(report.nodeid)
        total[layer] = total.get(layer, 0.0) + report.duration
        if report.when == "call":
            call[layer] = call.get(layer, 0.0) + report.duration
    order = [*LAYERS, "other"]
    return {
        layer: (len(tests[layer]), call.get(layer, 0.0), total[layer])
        for layer in sorted(tests, key=order.index)
    }
