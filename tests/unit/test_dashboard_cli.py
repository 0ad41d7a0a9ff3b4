"""``workerkit dashboard``: refuses an open non-loopback bind, reads its own WORKERKIT_DASHBOARD_*
variables (which the settings loader accepts), and opens its source lazily while the store is
down."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.support.dashboard_memory import MemoryDashboardSource
from workerkit.cli import main
from workerkit.dashboard import cli as dashboard_cli
from workerkit.dashboard.auth import check_allowed_hosts
from workerkit.dashboard.cli import ENV_VARS, allowed_hosts, is_loopback
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


def test_the_host_names_to_serve() -> None:
    assert allowed_hosts("127.0.0.1", ()) == ["127.0.0.1"]
    assert allowed_hosts("10.1.2.3", ["jobs.example.com"]) == ["10.1.2.3", "jobs.example.com"]
    # 0.0.0.0 is no name a client sends; the variable's value is comma-separated.
    assert allowed_hosts("0.0.0.0", ["a.example, b.example", "c.example"]) == [
        "a.example",
        "b.example",
        "c.example",
    ]
    assert check_allowed_hosts(["Jobs.Example.com", "[::1]", "*.ops.example"]) == (
        "jobs.example.com",
        "::1",
        "*.ops.example",
    )


@pytest.mark.parametrize("name", ["https://jobs.example.com", "jobs.example.com:443", "a/b"])
def test_an_allowed_host_that_is_not_a_name_is_refused(name: str) -> None:
    result = CliRunner().invoke(main, ["dashboard", "sql", "--allowed-host", name])
    assert result.exit_code == CONFIG_ERROR, result.output
    assert "--allowed-host" in result.output
    assert "without scheme, port or path" in result.output


def test_the_new_flags_and_their_variables_reach_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(dashboard_cli, "serve", lambda engine, settings, **own: seen.update(own))
    env = {
        "WORKERKIT_DASHBOARD_ALLOWED_HOSTS": "a.example,b.example",
        "WORKERKIT_DASHBOARD_SECURE_COOKIES": "1",
    }
    result = CliRunner().invoke(main, ["dashboard", "rq"], env=env)
    assert result.exit_code == 0, result.output
    assert seen["allowed_host"] == ("a.example,b.example",)
    assert seen["secure_cookies"] is True
    result = CliRunner().invoke(main, ["dashboard", "rq", "--allowed-host", "c.example"])
    assert seen["allowed_host"] == ("c.example",)
    assert seen["secure_cookies"] is False
