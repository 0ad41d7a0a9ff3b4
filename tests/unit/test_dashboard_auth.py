"""Who may use the dashboard: a bearer token (header, or the login form's cookie), HTTP basic
auth (plain or hashed passwords), nobody else (401); the actor each action is logged with."""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dashboard_memory import MemoryDashboardSource, served
from tests.unit.test_dashboard_web import Client, Reply, action_form, hidden_fields
from workerkit.dashboard.app import create_app
from workerkit.dashboard.auth import (
    Credentials,
    VerifiedLogins,
    check_password,
    hash_password,
    load_credentials,
)
from workerkit.dashboard.web import DashboardOptions
from workerkit.errors import ConfigurationError

pytestmark = pytest.mark.unit

TOKEN = "0123456789abcdef-token"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def source() -> MemoryDashboardSource:
    src = MemoryDashboardSource()
    src.add("f1", state="failed", attempt=3, error="ValueError: boom")
    return src


@pytest.fixture
def token_client(source: MemoryDashboardSource) -> Iterator[Client]:
    options = DashboardOptions(credentials=Credentials(token=TOKEN))
    with served(create_app(source, options=options)) as (host, port):
        yield Client(host, port)


@pytest.fixture
def basic_client(source: MemoryDashboardSource) -> Iterator[Client]:
    users = {"ops": hash_password("s3cret", iterations=1000), "dev": "plain-pass"}
    options = DashboardOptions(credentials=Credentials(users=users))
    with served(create_app(source, options=options)) as (host, port):
        yield Client(host, port)


def test_token_in_the_authorization_header(token_client: Client) -> None:
    refused = token_client.get("/")
    assert refused.status == 401
    assert '<form id="login" method="post" action="/login">' in refused.body
    assert token_client.get("/jobs?fragment=jobs").status == 401
    assert token_client.get("/", Authorization="Bearer wrong-token-0000000").status == 401
    assert token_client.get("/", Authorization=f"Bearer {TOKEN}").status == 200
    assert token_client.get("/healthz").status == 200  # probes need no token


def test_token_login_form_sets_a_cookie(token_client: Client) -> None:
    page = token_client.get("/jobs?state=failed")
    fields = hidden_fields(page.body, "login")
    assert fields["next"] == "/jobs?state=failed"
    wrong = token_client.post("/login", {**fields, "token": "nope"})
    assert wrong.status == 401
    assert "wrong token" in wrong.body
    assert token_client.post("/login", {"token": TOKEN, "next": "/"}).status == 403  # no csrf
    done = token_client.post("/login", {**fields, "token": TOKEN})
    assert done.status == 303
    assert done.headers["location"] == "/jobs?state=failed"
    cookie = next(c for c in done.headers.get_all("set-cookie") if "auth" in c)
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert TOKEN not in cookie
    assert token_client.get("/jobs?state=failed").status == 200
    logout = token_client.get("/")
    assert token_client.post("/logout", hidden_fields(logout.body.split("<main>")[0])).status == 303
    assert token_client.get("/").status == 401


def test_login_redirects_only_within_the_site(token_client: Client) -> None:
    fields = hidden_fields(token_client.get("/login?next=//evil.example/").body, "login")
    assert fields["next"] == "/"


def test_basic_auth(basic_client: Client) -> None:
    refused = basic_client.get("/")
    assert refused.status == 401
    assert refused.headers["www-authenticate"] == 'Basic realm="workerkit dashboard"'
    assert basic_client.get("/", Authorization=_basic("ops", "wrong")).status == 401
    assert basic_client.get("/", Authorization=_basic("nobody", "s3cret")).status == 401
    assert basic_client.get("/", Authorization="Basic !!notbase64").status == 401
    assert basic_client.get("/", Authorization=_basic("ops", "s3cret")).status == 200
    assert basic_client.get("/", Authorization=_basic("dev", "plain-pass")).status == 200


def test_the_actor_is_the_basic_auth_user(
    basic_client: Client, source: MemoryDashboardSource, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workerkit.dashboard")
    basic_client.headers["Authorization"] = _basic("ops", "s3cret")
    url, fields = action_form(basic_client.get("/jobs/f1").body, "retry")
    confirm = basic_client.post(url, fields)
    assert basic_client.post(url, hidden_fields(confirm.body, "confirm")).status == 303
    actors = [r.actor for r in caplog.records if getattr(r, "event", "") == "dashboard_action"]  # type: ignore[attr-defined]
    assert actors == ["ops"]


def test_password_hashes() -> None:
    stored = hash_password("pw", iterations=1000)
    assert stored.startswith("pbkdf2_sha256$1000$")
    assert check_password("pw", stored)
    assert not check_password("pw2", stored)
    assert check_password("plain", "plain")


def test_credential_files(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    users = tmp_path / "users"
    users.write_text("# who\nops:s3cret\n\nci:" + hash_password("x", iterations=1000) + "\n")
    loaded = load_credentials(str(token), str(users))
    assert loaded.token == TOKEN
    assert set(loaded.users) == {"ops", "ci"}
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigurationError, match=r"--token-file .*at least 16"):
        load_credentials(str(short), None)
    bad = tmp_path / "bad"
    bad.write_text("no-colon\n")
    with pytest.raises(ConfigurationError, match=r"--basic-auth-file .* line 1"):
        load_credentials(None, str(bad))
    with pytest.raises(ConfigurationError, match=r"--token-file .*cannot be read"):
        load_credentials(str(tmp_path / "missing"), None)


def test_a_basic_auth_header_is_hashed_once_off_the_event_loop(
    source: MemoryDashboardSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's requests (its refreshes every 2 s) do not each pay for PBKDF2 (~64 ms at the
    default strength), and the hash runs in a worker thread, not on the server's loop."""
    users = {"ops": hash_password("s3cret", iterations=1000)}
    options = DashboardOptions(credentials=Credentials(users=users))
    hashed: list[str] = []
    real = hashlib.pbkdf2_hmac

    def counting(*args: Any, **kwargs: Any) -> bytes:
        hashed.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    with served(create_app(source, options=options)) as (host, port):
        client = Client(host, port, headers={"Authorization": _basic("ops", "s3cret")})
        for _ in range(20):
            assert client.get("/?fragment=queues").status == 200
        assert len(hashed) == 1
        assert hashed[0] != "dashboard-test-server"  # the thread running the event loop
        assert client.get("/", Authorization=_basic("ops", "wrong")).status == 401
        assert client.get("/", Authorization=_basic("ops", "wrong")).status == 401
        assert len(hashed) == 3  # refusals are not kept


def test_an_unknown_user_costs_a_hash_as_a_known_one_does(
    source: MemoryDashboardSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = {"ops": hash_password("s3cret", iterations=1000), "dev": "plain-pass"}
    options = DashboardOptions(credentials=Credentials(users=users))
    rounds: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        rounds.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    with served(create_app(source, options=options)) as (host, port):
        client = Client(host, port)
        assert client.get("/", Authorization=_basic("nobody", "s3cret")).status == 401
        assert rounds == [1000]  # as strong as the strongest stored hash
        assert client.get("/", Authorization=_basic("ops", "nope")).status == 401
        assert rounds == [1000, 1000]


def test_verified_logins_expire() -> None:
    logins = VerifiedLogins(ttl=0.0)
    logins.put("Basic b3BzOnMzY3JldA==", "ops")
    assert logins.get("Basic b3BzOnMzY3JldA==") is None
    kept = VerifiedLogins(ttl=300.0, size=2)
    for n in range(3):
        kept.put(f"Basic {n}", f"user{n}")
    assert kept.get("Basic 2") == "user2"
    assert kept.get("Basic other") is None


def test_secure_cookies_sets_the_secure_flag_on_every_cookie(
    source: MemoryDashboardSource,
) -> None:
    """Behind a proxy that terminates TLS the dashboard sees plain HTTP (uvicorn trusts
    X-Forwarded-Proto only from 127.0.0.1): --secure-cookies marks every cookie Secure."""
    options = DashboardOptions(credentials=Credentials(token=TOKEN), secure_cookies=True)
    set_cookies: list[str] = []
    with served(create_app(source, options=options)) as (host, port):
        client = Client(host, port)

        def step(reply: Reply) -> Reply:
            set_cookies.extend(reply.headers.get_all("set-cookie") or [])
            return reply

        login = step(client.get("/login?next=/jobs/f1"))
        step(client.post("/login", {**hidden_fields(login.body, "login"), "token": TOKEN}))
        url, fields = action_form(step(client.get("/jobs/f1")).body, "retry")
        confirm = step(client.post(url, fields))
        assert step(client.post(url, hidden_fields(confirm.body, "confirm"))).status == 303
        page = step(client.get("/jobs/f1"))  # shows the flash, deletes its cookie
        step(client.post("/logout", hidden_fields(page.body.split("<main>")[0])))
    names = {raw.partition("=")[0] for raw in set_cookies}
    assert names == {
        "workerkit_dashboard_csrf",
        "workerkit_dashboard_auth",
        "workerkit_dashboard_flash",
    }
    assert all("; secure" in raw.lower() for raw in set_cookies), set_cookies
    assert len(set_cookies) == 5  # csrf, auth, flash, flash deleted, auth deleted
