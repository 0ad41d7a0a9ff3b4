"""Who may use the dashboard, and that an action came from its own page (CSRF).

Pure functions on header and cookie values (the app calls them): a bearer token (the
``Authorization`` header, or a cookie the login form sets), HTTP basic auth against a file of
``user:password`` lines (the password plain or a ``pbkdf2_sha256$...`` hash made by
:func:`hash_password`), and the CSRF check: a random per-session token in a cookie (SameSite
Strict, HttpOnly) echoed in every form, and the ``Origin`` header, when sent, naming this host;
which ``Host`` names are served (against DNS rebinding); verified basic-auth headers, kept a while.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from workerkit.errors import ConfigurationError

__all__ = (
    "AUTH_COOKIE",
    "CSRF_COOKIE",
    "LOOPBACK_NAMES",
    "Credentials",
    "VerifiedLogins",
    "check_allowed_hosts",
    "check_password",
    "csrf_ok",
    "hash_password",
    "host_allowed",
    "load_credentials",
    "new_csrf_token",
    "origin_ok",
)

#: The cookie the login form sets (token auth): a keyed hash of the token, never the token.
AUTH_COOKIE: Final = "workerkit_dashboard_auth"
#: The per-session CSRF token (echoed in each form's hidden ``csrf`` field).
CSRF_COOKIE: Final = "workerkit_dashboard_csrf"
_PBKDF2: Final = "pbkdf2_sha256"
_ITERATIONS: Final = 200_000
#: The ``Host`` names always served (any port): what a browser on this host or through a
#: port-forward sends.
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
_HOST_NAME: Final = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def hash_password(password: str, *, iterations: int = _ITERATIONS) -> str:
    """``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (base64) for a ``--basic-auth-file`` line."""
    salt = secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{_PBKDF2}${iterations}${salt}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """``password`` against a stored hash (:func:`hash_password`) or a plain password."""
    parts = stored.split("$")
    if len(parts) == 4 and parts[0] == _PBKDF2 and parts[1].isdigit():
        _, iterations, salt, expected = parts
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), int(iterations))
        return hmac.compare_digest(base64.b64encode(digest).decode(), expected)
    return hmac.compare_digest(password.encode(), stored.encode())


@dataclass(frozen=True)
class Credentials:
    """Who may log in: a token, basic-auth users (name -> stored password), or nobody (open)."""

    token: str | None = None
    users: dict[str, str] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return self.token is not None or bool(self.users)

    def cookie_value(self) -> str:
        """What the login cookie holds: an HMAC of the token (the token itself never leaves)."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"workerkit-dashboard-login", "sha256").hexdigest()

    def token_ok(self, given: str) -> bool:
        return self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def actor(self, authorization: str | None, auth_cookie: str | None) -> str | None:
        """The actor for the action logs (``token``, the user, ``local`` when open), or None
        when the request is not authenticated."""
        actor = self.cheap_actor(authorization, auth_cookie)
        if actor is None and self.is_basic(authorization):
            return self.basic_user(authorization or "")
        return actor

    def cheap_actor(self, authorization: str | None, auth_cookie: str | None) -> str | None:
        """:meth:`actor` without basic auth (which hashes): ``local`` when open, ``token``."""
        if not self.required:
            return "local"
        scheme, _, value = (authorization or "").partition(" ")
        if self.token is not None:
            if scheme.lower() == "bearer" and self.token_ok(value.strip()):
                return "token"
            if auth_cookie and hmac.compare_digest(auth_cookie, self.cookie_value()):
                return "token"
        return None

    def is_basic(self, authorization: str | None) -> bool:
        """Basic auth is configured and ``authorization`` is a ``Basic ...`` header."""
        scheme, _, _ = (authorization or "").partition(" ")
        return bool(self.users) and scheme.lower() == "basic"

    def basic_user(self, authorization: str) -> str | None:
        """The user of a ``Basic ...`` header, None when unknown or refused. An unknown user
        costs what a known one does (a hash of the same strength), so that the time of the
        answer does not tell which users exist."""
        try:
            encoded = authorization.partition(" ")[2].strip()
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        stored = self.users.get(user)
        if stored is None:
            check_password(password, self._decoy)
            return None
        if not check_password(password, stored) or not sep:
            return None
        return user

    @cached_property
    def _decoy(self) -> str:
        """A stored password as costly to check as the strongest of ``users``."""
        rounds = [int(p[1]) for p in (s.split("$") for s in self.users.values())
                  if len(p) == 4 and p[0] == _PBKDF2 and p[1].isdigit()]  # fmt: skip
        if not rounds:
            return secrets.token_hex(16)
        return f"{_PBKDF2}${max(rounds)}$decoy${secrets.token_hex(16)}"


class VerifiedLogins:
    """Basic-auth headers verified lately (``ttl`` seconds), so that a page's requests do not
    each pay for a password hash: keyed by an HMAC of the header with a secret of this process
    (the header itself is not kept), at most ``size`` of them."""

    def __init__(self, *, ttl: float = 300.0, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._secret = secrets.token_bytes(32)
        self._users: dict[bytes, tuple[str, float]] = {}

    def _key(self, authorization: str) -> bytes:
        return hmac.new(self._secret, authorization.encode(), "sha256").digest()

    def get(self, authorization: str) -> str | None:
        key = self._key(authorization)
        found = self._users.get(key)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            self._users.pop(key, None)
            return None
        return found[0]

    def put(self, authorization: str, user: str) -> None:
        now = time.monotonic()
        if len(self._users) >= self.size:
            self._users = {k: v for k, v in self._users.items() if v[1] > now}
            if len(self._users) >= self.size:
                self._users.clear()
        self._users[self._key(authorization)] = (user, now + self.ttl)


def load_credentials(token_file: str | None, basic_auth_file: str | None) -> Credentials:
    """Read ``--token-file`` (one line: the token) and ``--basic-auth-file`` (``user:password``
    lines; blank lines and ``#`` comments skipped); ConfigurationError naming the flag."""
    token = None
    if token_file:
        token = _read(token_file, "--token-file").strip()
        if len(token) < 16:
            raise ConfigurationError(
                f"--token-file {token_file}: the token is {len(token)} characters; give at "
                "least 16 (e.g. the output of `openssl rand -hex 32`)"
            )
    users: dict[str, str] = {}
    if basic_auth_file:
        for number, raw in enumerate(_read(basic_auth_file, "--basic-auth-file").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise ConfigurationError(
                    f"--basic-auth-file {basic_auth_file} line {number}: not USER:PASSWORD "
                    "(the password plain or a hash from workerkit.dashboard.auth.hash_password)"
                )
            users[user] = password
        if not users:
            raise ConfigurationError(f"--basic-auth-file {basic_auth_file}: no USER:PASSWORD line")
    return Credentials(token, users)


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{flag} {path}: cannot be read: {exc}") from None


def check_allowed_hosts(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``--allowed-host`` names, lowercased; ConfigurationError for one that is not a host
    name (a URL, a port, a path)."""
    checked = []
    for name in names:
        bare = name.strip().lower().removesuffix(".")
        bare = bare[1:-1] if bare.startswith("[") and bare.endswith("]") else bare
        if not _HOST_NAME.fullmatch(bare) and not _is_ip(bare):
            raise ConfigurationError(
                f"--allowed-host {name!r}: not a host name; give the name alone, as browsers "
                "send it in the Host header, without scheme, port or path (e.g. "
                "--allowed-host jobs.example.com, or *.example.com for its subdomains)"
            )
        checked.append(bare)
    return tuple(checked)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """The ``Host`` header names a loopback name or one of ``allowed`` (any port; ``*.NAME``
    matches NAME's subdomains)."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    name = name.removesuffix(".")
    if not name:
        return False
    for pattern in (*LOOPBACK_NAMES, *allowed):
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(cookie: str | None, field_value: str | None) -> bool:
    """The form's hidden field matches the session's cookie (both present)."""
    if not cookie or not field_value:
        return False
    return hmac.compare_digest(cookie.encode(), field_value.encode())


def origin_ok(origin: str | None, host: str | None) -> bool:
    """No ``Origin`` header (an older client), or one naming this host (the ``Host`` header)."""
    if origin is None:
        return True
    if origin == "null" or not host:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()
