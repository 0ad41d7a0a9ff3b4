"""``workerkit dashboard``: refuses an open non-loopback bind, reads its own WORKERKIT_DASHBOARD_*
variables (which the settings loader accepts), and opens its source lazily while the store is
down."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.support.dashboard_memory import MemoryDashboardSource
from workerkit.cli import main
from workerkit.dashboard.cli import ENV_VARS, is_loopback
from workerkit.dashboard.lazy import LazySource
from workerkit.errors import StoreUnavailable
from workerkit.exitcodes import CONFIG_ERROR
from workerkit.settings import load_settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "0.0.0.0"], {}),
        (["--host", "10.1.2.3", "--port", "9000"], {}),
        ([], {"WORKERKIT_DASHBOARD_HOST": "::"}),
    ],
)
def test_a_non_loopback_host_without_auth_is_refused(args: list[str], env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["dashboard", "sql", *args], env=env)
    assert result.exit_code == CONFIG_ERROR, result.output
    assert "--host" in result.output
    assert "is not a loopback address" in result.output
    assert "--token-file" in result.output
    assert "--basic-auth-file" in result.output


def test_a_bad_token_file_is_refused_before_anything_is_served(tmp_path: object) -> None:
    result = CliRunner().invoke(
        main, ["dashboard", "rq", "--host", "0.0.0.0", "--token-file", "/nonexistent/token"]
    )
    assert result.exit_code == CONFIG_ERROR
    assert "--token-file /nonexistent/token: cannot be read" in result.output


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.0.0.2")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("dashboard.example.com")


def test_the_dashboard_variables_are_not_refused_as_unknown_settings() -> None:
    env = dict.fromkeys(ENV_VARS.values(), "1")
    load_settings({}, env=env)  # no UnknownSetting
    command = main.commands["dashboard"]
    envvars = {param.envvar for param in command.params if getattr(param, "envvar", None)}
    assert set(ENV_VARS.values()) <= envvars


def test_the_source_is_opened_on_first_use_and_again_after_a_failed_open() -> None:
    attempts: list[str] = []
    real = MemoryDashboardSource()

    def open_source() -> MemoryDashboardSource:
        attempts.append("open")
        if len(attempts) == 1:
            raise StoreUnavailable("database is starting up")
        return real

    lazy = LazySource("sql", open_source)
    with pytest.raises(StoreUnavailable):
        lazy.queues()
    assert lazy.queues() == []
    assert lazy.clock() > 0
    assert attempts == ["open", "open"]
    lazy.close()
