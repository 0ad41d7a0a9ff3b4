"""The engine facades' lazy names: imported from their module on first use, then cached."""

from __future__ import annotations

import re
from typing import Any

import pytest

from workerkit.engines.lazy import lazy_attribute


def test_a_name_comes_from_its_home_module_and_is_cached() -> None:
    namespace: dict[str, Any] = {}
    value = lazy_attribute("workerkit.engines", {"SqlEngine": "sql.engine"}, namespace, "SqlEngine")
    from workerkit.engines.sql.engine import SqlEngine

    assert value is SqlEngine
    assert namespace == {"SqlEngine": SqlEngine}  # the next access skips __getattr__


def test_an_unknown_name_is_an_attribute_error_naming_the_package() -> None:
    message = "module 'workerkit.engines.sql' has no attribute 'x'"
    with pytest.raises(AttributeError, match=re.escape(message)):
        lazy_attribute("workerkit.engines.sql", {}, {}, "x")


def test_the_facades_answer_unknown_names_as_modules_do() -> None:
    import workerkit.engines.rq as rq_facade

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        rq_facade.NoSuchName  # noqa: B018 - the access is the test
