"""workerkit.engines: an engine by name (every extra is installed in the test
environment), or a configuration error that says what to do."""

from __future__ import annotations

import pytest

from workerkit.engines import ENGINE_CLASSES, get_engine
from workerkit.errors import ConfigurationError, EngineUnavailable


@pytest.mark.parametrize("name", sorted(ENGINE_CLASSES))
def test_each_engine_is_found_by_its_name(name: str) -> None:
    assert get_engine(name).name == name


def test_an_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(
        EngineUnavailable, match="unknown engine 'kafka'; expected one of sql, rq, celery"
    ):
        get_engine("kafka")
    assert issubclass(EngineUnavailable, ConfigurationError)  # the CLI exits CONFIG_ERROR
