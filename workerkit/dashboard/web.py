"""What every dashboard page shares: the Host check, authentication, the CSRF cookie, flash
messages, rendering (a whole page, or one ``data-refresh`` element of it for ``?fragment=ID``),
the store calls in worker threads, and the 503 page while the store is unreachable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote, unquote, urlencode

import anyio.to_thread
from anyio import CapacityLimiter
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from workerkit.dashboard.auth import (
    AUTH_COOKIE,
    CSRF_COOKIE,
    Credentials,
    VerifiedLogins,
    check_allowed_hosts,
    host_allowed,
    new_csrf_token,
)
from workerkit.dashboard.history import SAMPLE_INTERVAL, History
from workerkit.dashboard.views import filters
from workerkit.errors import StoreUnavailable

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from workerkit.dashboard.model import DashboardSource
    from workerkit.scheduler.contract import SchedulerBinding

__all__ = ("FLASH_COOKIE", "Ctx", "DashboardOptions", "Handler", "HostGuard", "Web", "local_path")

log = logging.getLogger("workerkit.dashboard")

T = TypeVar("T")

FLASH_COOKIE: Final = "workerkit_dashboard_flash"
TEMPLATES: Final = Path(__file__).with_name("templates")
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class DashboardOptions:
    """How the app behaves (the ``workerkit dashboard`` flags)."""

    credentials: Credentials = field(default_factory=Credentials)
    #: Seconds between live refreshes of the ``data-refresh`` elements; 0: none.
    refresh: float = 2.0
    #: Seconds between two samples of the throughput history.
    sample_interval: float = SAMPLE_INTERVAL
    page_size: int = 50
    #: ``Host`` names served besides the loopback ones (``--host``, ``--allowed-host``).
    allowed_hosts: tuple[str, ...] = ()
    #: Every cookie with the Secure flag, also over plain HTTP (behind a TLS proxy).
    secure_cookies: bool = False


@dataclass
class Ctx:
    """One request as the pages see it: who asks, the session's CSRF token, the flash."""

    request: Request
    actor: str
    csrf: str
    new_csrf: bool
    flash: tuple[str, str] | None = None
    flash_shown: bool = False


Handler = Callable[[Request, Ctx], Awaitable[Response]]


def local_path(url: str | None, default: str) -> str:
    """``url`` when it is a path on this site (``/...``, not ``//host``), else ``default``."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return default
    return url


def _read_flash(raw: str | None) -> tuple[str, str] | None:
    if not raw:
        return None
    kind, _, text = unquote(raw).partition(":")
    return (kind if kind in ("ok", "error") else "error", text[:500])


class HostGuard:
    """400 for a request whose ``Host`` is not ours (a DNS-rebinding page), but ``/healthz``
    (kubelet's probes send the pod's address). Each refused name is logged once."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = check_allowed_hosts(allowed)
        self._logged: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        if host not in self._logged and len(self._logged) < 100:
            self._logged.add(host)
            log.warning(
                "dashboard request for host %r refused: not a loopback name, --host nor an "
                "--allowed-host",
                host,
                extra={"event": "dashboard_host_refused", "host": host},
            )
        text = (
            f"refused: this dashboard does not serve the host {host!r}; to serve it under this "
            "name, start it with --allowed-host NAME\n"
        )
        await PlainTextResponse(text, status_code=400)(scope, receive, send)


class Web:
    """The shared machinery; the pages (app.py) and the actions (actions.py) use it."""

    def __init__(self, source: DashboardSource, options: DashboardOptions) -> None:
        self.source = source
        self.options = options
        self.history = History()
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(("html",)),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals.update(filters())
        self.env.filters.update(filters())
        self._binding: SchedulerBinding | None = None
        self._binding_read = False
        self.logins = VerifiedLogins()
        self._hashing: CapacityLimiter | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking source call, in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))

    async def binding(self) -> SchedulerBinding | None:
        """The app's scheduler binding (read once, kept), None when it declares no schedules."""
        if not self._binding_read:
            self._binding = await self.call(self.source.scheduler)
            self._binding_read = True
        return self._binding

    async def authenticate(self, request: Request) -> str | None:
        """The request's actor (:meth:`Credentials.actor`). A basic-auth header verified in the
        last minutes is not hashed again; one that is hashes in a worker thread (at most 2 at
        a time: a flood of wrong passwords does not take the threads the store calls need)."""
        credentials = self.options.credentials
        authorization = request.headers.get("authorization")
        actor = credentials.cheap_actor(authorization, request.cookies.get(AUTH_COOKIE))
        if actor is not None or authorization is None or not credentials.is_basic(authorization):
            return actor
        actor = self.logins.get(authorization)
        if actor is not None:
            return actor
        if self._hashing is None:
            self._hashing = CapacityLimiter(2)
        actor = await anyio.to_thread.run_sync(
            credentials.basic_user, authorization, limiter=self._hashing
        )
        if actor is not None:
            self.logins.put(authorization, actor)
        return actor

    def secure(self, request: Request) -> bool:
        """Whether cookies get the Secure flag: ``--secure-cookies``, or an HTTPS request."""
        return self.options.secure_cookies or request.url.scheme == "https"

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind authentication, with the CSRF cookie, the flash, the 503 page."""

        async def endpoint(request: Request) -> Response:
            actor = await self.authenticate(request)
            csrf = request.cookies.get(CSRF_COOKIE)
            ctx = Ctx(request, actor or "", csrf or new_csrf_token(), csrf is None)
            ctx.flash = _read_flash(request.cookies.get(FLASH_COOKIE))
            if actor is None:
                response = self.unauthorized(ctx)
            else:
                try:
                    response = await handler(request, ctx)
                except StoreUnavailable as exc:
                    response = self.render(
                        ctx, "unavailable.html", status=503, whole=True, error=str(exc)
                    )
            return self.finish(ctx, response)

        return endpoint

    def unauthorized(self, ctx: Ctx) -> Response:
        credentials = self.options.credentials
        request = ctx.request
        if request.query_params.get("fragment") or credentials.token is None:
            response: Response = Response("authentication required\n", status_code=401)
        else:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = self.render(ctx, "login.html", status=401, next=target, error=None)
        if credentials.users:
            response.headers["WWW-Authenticate"] = 'Basic realm="workerkit dashboard"'
        return response

    def finish(self, ctx: Ctx, response: Response) -> Response:
        secure = self.secure(ctx.request)
        if ctx.new_csrf:
            response.set_cookie(
                CSRF_COOKIE, ctx.csrf, httponly=True, samesite="strict", secure=secure, path="/"
            )
        if ctx.flash_shown:
            response.delete_cookie(
                FLASH_COOKIE, path="/", samesite="strict", httponly=True, secure=secure
            )
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def render(
        self, ctx: Ctx, name: str, *, status: int = 200, whole: bool = False, **values: Any
    ) -> Response:
        """The page ``name``, or with ``?fragment=ID`` only its block ``ID`` (404 if none);
        ``whole``: the page even for a fragment (an error page that replaces any page)."""
        request = ctx.request
        template = self.env.get_template(name)
        context = {
            "ctx": ctx,
            "engine": self.source.engine,
            "refresh": self.options.refresh,
            "token_auth": self.options.credentials.token is not None,
            "path": request.url.path,
            "here": _here(request),
            "flash": None,
            **values,
        }
        fragment = request.query_params.get("fragment")
        if fragment is not None and not whole:
            block = template.blocks.get(fragment) if fragment.isidentifier() else None
            if block is None:
                return Response(f"no fragment {fragment!r} on this page\n", status_code=404)
            html = "".join(block(template.new_context(context)))
            return HTMLResponse(html, status_code=status)
        if context["flash"] is None and ctx.flash is not None:
            context["flash"] = ctx.flash
            ctx.flash_shown = True
        return HTMLResponse(template.render(context), status_code=status)

    def message(self, ctx: Ctx, status: int, text: str, *, back: str = "/") -> Response:
        """A page that only says ``text`` (as an error flash) with a link back."""
        return self.render(
            ctx, "message.html", status=status, whole=True, flash=("error", text), back=back
        )

    def redirect(self, ctx: Ctx, url: str, flash: tuple[str, str] | None = None) -> Response:
        response = RedirectResponse(url, status_code=303)
        if flash is not None:
            response.set_cookie(
                FLASH_COOKIE,
                quote(f"{flash[0]}:{flash[1]}"),
                httponly=True,
                samesite="strict",
                secure=self.secure(ctx.request),
                path="/",
                max_age=60,
            )
        return response


def _here(request: Request) -> str:
    """This page's path and query, without ``fragment`` (what an action's form comes back to)."""
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "fragment"]
    if not params:
        return request.url.path
    return f"{request.url.path}?{urlencode(params)}"
