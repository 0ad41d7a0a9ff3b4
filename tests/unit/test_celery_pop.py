"""The reliable pop's start check and its crash recovery's guard (engines/celery/pop.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from workerkit.engines.celery.pop import recover_in_flight, require_lmove
from workerkit.errors import ConfigurationError


class _Server:
    """A client whose INFO answers one version, and whose other commands fail."""

    def __init__(self, version: str) -> None:
        self.version = version

    def execute_command(self, *args: Any) -> Any:
        if args[0] == "INFO":
            return {"redis_version": self.version}
        raise ConnectionError("Redis went away")


@pytest.mark.parametrize("version", ["5.0.7", "6.0.16"])
def test_a_redis_without_lmove_is_refused_naming_the_requirement(version: str) -> None:
    with pytest.raises(ConfigurationError, match=r"Redis 6\.2 or newer") as refused:
        require_lmove(_Server(version))
    assert version in str(refused.value)


@pytest.mark.parametrize("version", ["6.2.0", "7.2.4", "10.0.0"])
def test_a_redis_with_lmove_is_accepted(version: str) -> None:
    require_lmove(_Server(version))


def test_a_failing_in_flight_recovery_is_logged_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="workerkit.engines.celery"):
        assert recover_in_flight(_Server("6.0.0"), "", 3.0) == 0
    assert [r.event for r in caplog.records] == ["pop_recovery_failed"]  # type: ignore[attr-defined]
