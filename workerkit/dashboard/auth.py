"""Who may use the dashboard, and that an action came from its own page (CSRF).

Pure functions on header and cookie values (the app calls them): a bearer token (the
``Authorization`` header, or a cookie the login form sets), HTTP basic auth against a file of
``user:password`` lines (the password plain or a ``pbkdf2_sha256$...`` hash made by
:func:`hash_password`), and the CSRF check: a random per-session token in a cookie (SameSite
Strict, HttpOnly) echoed in every form, and the ``Origin`` header, when sent, naming this host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from workerkit.errors import ConfigurationError

__all__ = (
    "AUTH_COOKIE",
    "CSRF_COOKIE",
    "Credentials",
    "check_password",
    "csrf_ok",
    "hash_password",
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
        if not self.required:
            return "local"
        scheme, _, value = (authorization or "").partition(" ")
        if self.token is not None:
            if scheme.lower() == "bearer" and self.token_ok(value.strip()):
                return "token"
            if auth_cookie and hmac.compare_digest(auth_cookie, self.cookie_value()):
                return "token"
        if self.users and scheme.lower() == "basic":
            return self._basic_user(value.strip())
        return None

    def _basic_user(self, encoded: str) -> str | None:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        stored = self.users.get(user)
        if not sep or stored is None or not check_password(password, stored):
            return None
        return user


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
