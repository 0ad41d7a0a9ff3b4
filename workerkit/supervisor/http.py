"""The supervisor's HTTP endpoints: ``/livez``, ``/readyz``, ``/startupz`` and ``/metrics``.

A small HTTP/1.1 server on the supervisor's anyio loop, with per-connection deadlines, capped
request heads and shedding of the oldest connection. What each probe answers and the limits:
docs/reference/probes.md; why our own parser: docs/contributing/architecture.md.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
import anyio.to_thread
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = (
    "LOOP_STALL_TIMEOUT",
    "Health",
    "HttpServer",
    "Probe",
    "parse_request",
    "render_response",
)

log = logging.getLogger(__name__)

#: The supervisor's ticker runs every 0.1 s; a tick older than this means its loop is wedged.
LOOP_STALL_TIMEOUT: Final = 5.0
#: Everything a connection does, from its accept to the end of the answer, happens in this time.
REQUEST_TIMEOUT: Final = 5.0
#: The largest request line (414 beyond) and request head (431 beyond) the server reads.
MAX_REQUEST_LINE: Final = 4096
MAX_HEAD_BYTES: Final = 8192
#: Connections held at once (~10 KB each), at most half the soft RLIMIT_NOFILE; one more closes
#: the oldest, so slow clients cannot hold every slot.
MAX_CONNECTIONS: Final = 1024
#: /metrics renderings at once; more scrapes wait for a turn (within their own deadline).
METRICS_RENDERERS: Final = 1
#: After a refusal, how long to read what the client still sends, and the quiet that ends it.
LINGER: Final = 1.0
LINGER_QUIET: Final = 0.2
#: The pause before accepting again when accept fails (out of file descriptors).
ACCEPT_RETRY: Final = 0.1
#: At most one ``http_connections_shed`` warning in this time.
SHED_LOG_INTERVAL: Final = 60.0


@dataclass(frozen=True)
class Probe:
    """A probe's answer: pass or fail, and one line saying why."""

    ok: bool
    reason: str

    @property
    def status(self) -> int:
        return 200 if self.ok else 503


class Health:
    """What the probes look at, kept up to date by the supervisor's loop.

    Times are ``time.monotonic()`` seconds (wall-clock jumps must not fail a probe).
    """

    def __init__(
        self,
        liveness_timeout: float,
        *,
        store_stale_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.liveness_timeout = liveness_timeout
        #: A store report older than this no longer counts for readiness. The worker reports
        #: store health much more often than its liveness threshold, so the same bound is used.
        self.store_stale_after = (
            liveness_timeout if store_stale_after is None else store_stale_after
        )
        self.clock = clock
        self.state = "starting"
        self.stopping_reason: str | None = None  # "SIGTERM", "worker stopping", ...
        self.worker_ready_at: float | None = None
        self.last_tick: float | None = None
        self.last_heartbeat: float | None = None
        self.store_ok: bool | None = None
        self.store_reason = ""
        self.store_reported_at: float | None = None

    # --- updates ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.last_tick = now

    def worker_ready(self, now: float) -> None:
        if self.worker_ready_at is None:
            self.worker_ready_at = now
        # Readiness is the start of the heartbeat clock: a worker that never beats after it,
        # fails liveness after the threshold.
        if self.last_heartbeat is None:
            self.last_heartbeat = now

    def signal_received(self, name: str) -> None:
        """A stop signal arrived: not ready from now on (the machine confirms it right after)."""
        if self.state in ("starting", "ready"):
            self.state = "draining"
            self.stopping_reason = name

    def heartbeat(self, now: float) -> None:
        self.last_heartbeat = now

    def store_health(self, ok: bool, reason: str, now: float) -> None:
        self.store_ok = ok
        self.store_reason = reason
        self.store_reported_at = now

    # --- the probes ---------------------------------------------------------------------------

    def livez(self, now: float | None = None) -> Probe:
        """The supervisor's loop ticks and, once ready, the worker's heartbeat is fresh.

        Never looks at the store: a broker outage must not make the kubelet restart workers.
        """
        now = self.clock() if now is None else now
        if self.last_tick is not None and now - self.last_tick > LOOP_STALL_TIMEOUT:
            return Probe(False, f"supervisor loop stalled for {now - self.last_tick:.1f}s")
        if self.state in ("draining", "releasing", "stopped"):
            # The worker stops heartbeating once it stops fetching, and the supervisor's own
            # deadlines (not the kubelet's restart) bound the drain: stay alive through it.
            return Probe(True, f"ok: {self.state}")
        if self.worker_ready_at is not None and self.last_heartbeat is not None:
            age = now - self.last_heartbeat
            if age > self.liveness_timeout:
                return Probe(
                    False,
                    f"worker heartbeat is {age:.1f}s old "
                    f"(liveness_timeout {self.liveness_timeout:g}s)",
                )
        return Probe(True, "ok")

    def readyz(self, now: float | None = None) -> Probe:
        """Ready, not draining, and the store was reachable at the worker's last report."""
        now = self.clock() if now is None else now
        if self.state in ("draining", "releasing"):
            reason = self.stopping_reason or "shutdown"
            return Probe(False, f"{self.state} since {reason}")
        if self.state == "stopped":
            return Probe(False, "stopped")
        if self.state != "ready":
            return Probe(False, "starting: the worker is not ready yet" + self._store_trouble())
        if self.store_ok is None or self.store_reported_at is None:
            return Probe(False, "store health not reported yet")
        if not self.store_ok:
            return Probe(False, f"store unreachable: {self.store_reason}")
        age = now - self.store_reported_at
        if age > self.store_stale_after:
            return Probe(False, f"store health report is stale ({age:.0f}s old)")
        return Probe(True, "ok")

    def startupz(self, now: float | None = None) -> Probe:
        """The worker became ready once (it stays started while it drains)."""
        del now
        if self.worker_ready_at is not None:
            return Probe(True, "ok")
        if self.state in ("draining", "releasing", "stopped"):
            return Probe(False, f"stopping before the worker was ready ({self.state})")
        return Probe(False, "starting: waiting for the worker to be ready" + self._store_trouble())

    def _store_trouble(self) -> str:
        """Why the store is not usable (its last report), for the probes of a starting worker."""
        if self.store_ok is False and self.store_reason:
            return f"; store unreachable: {self.store_reason}"
        return ""


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/(\d)\.(\d)")
_HEADER_LINE: Final = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")


def render_response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head: bool = False,
    headers: tuple[str, ...] = (),
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *headers,
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head else body)


def _refusal(status: int) -> bytes:
    """The response that refuses a request with ``status`` (4xx or 505)."""
    headers = ("Allow: GET, HEAD",) if status == 405 else ()
    body = _REASONS.get(status, "bad request").lower().encode() + b"\n"
    return render_response(status, body, headers=headers)


def _head_status(buffer: bytes | bytearray) -> int | None:
    """The status refusing a head still being received, or None while it may yet be fine.

    A request line longer than MAX_REQUEST_LINE is 414, a head longer than MAX_HEAD_BYTES 431:
    the server stops reading there, so a client can never make it hold more.
    """
    line_end = buffer.find(b"\n")
    if (line_end < 0 and len(buffer) > MAX_REQUEST_LINE) or line_end > MAX_REQUEST_LINE:
        return 414
    if len(buffer) > MAX_HEAD_BYTES:
        return 431
    return None


def parse_request(head: bytes) -> tuple[str, str] | int:
    """``(method, path)`` of a complete request head (without its blank line), or a status.

    The grammar is RFC 9112's for what probes and Prometheus send: an origin-form target,
    HTTP/1.x, ``name: value`` header lines (CRLF or bare LF). Anything else is refused, never
    guessed at: 400, 405 for a method other than GET and HEAD, 505 for another HTTP version.
    """
    if (status := _head_status(head)) is not None:
        return status
    request_line, *header_lines = head.split(b"\n")
    match = _REQUEST_LINE.fullmatch(request_line.removesuffix(b"\r"))
    if match is None:
        return 400
    method, target, major, _minor = match.groups()
    if major != b"1":
        return 505
    if not all(_HEADER_LINE.fullmatch(line.removesuffix(b"\r")) for line in header_lines):
        return 400
    if method not in (b"GET", b"HEAD"):
        return 405
    return method.decode("ascii"), target.split(b"?", 1)[0].decode("ascii")


def _within_file_limit(connections: int) -> int:
    """``connections``, or half the soft RLIMIT_NOFILE if lower (so that accepts do not fail)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(1, min(connections, soft // 2))


class HttpServer:
    """The probes and /metrics on ``host:port``. Use as ``async with HttpServer(...) as server``.

    ``server.port`` is the bound port (useful with port 0 in tests); ``server.shed`` counts the
    connections closed to make room for newer ones.
    """

    def __init__(
        self,
        health: Health,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.health = health
        self.registry = registry
        self.host = host
        self.port = port
        self.max_connections = _within_file_limit(max_connections)
        self.request_timeout = request_timeout
        self.shed = 0
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        #: The open connections, oldest first, each by the cancel scope that bounds it.
        self._open: dict[anyio.CancelScope, None] = {}
        self._metrics_limiter = anyio.CapacityLimiter(METRICS_RENDERERS)
        self._shed_logged = 0
        self._shed_logged_at: float | None = None

    async def __aenter__(self) -> HttpServer:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        self._listener = listener
        # One listener per address family; with a given port they all share it, with port 0
        # the first one's is the one to report.
        local_port = anyio.abc.SocketAttribute.local_port
        self.port = int(listener.listeners[0].extra(local_port))  # noqa: S610 - anyio, not Django
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        for one in listener.listeners:
            assert isinstance(one, anyio.abc.SocketListener)
            self._task_group.start_soon(self._accept, one, name="workerkit-http")
        log.info(
            "HTTP probes listening",
            extra={"event": "http_listening", "host": self.host, "port": self.port},
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task_group is not None
        assert self._listener is not None
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        finally:
            await self._listener.aclose()

    async def _accept(self, listener: anyio.abc.SocketListener) -> None:
        assert self._task_group is not None
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of file descriptors (EMFILE) or a connection reset before it was
                # accepted: the listener is fine, try again shortly instead of dying.
                log.warning(
                    "cannot accept an HTTP connection",
                    extra={"event": "http_accept_failed", "error": str(exc)},
                )
                await anyio.sleep(ACCEPT_RETRY)
                continue
            # The deadline runs from here, whatever the client does or does not send.
            scope = anyio.CancelScope(deadline=anyio.current_time() + self.request_timeout)
            self._open[scope] = None
            if len(self._open) > self.max_connections:
                self._shed_oldest()
            self._task_group.start_soon(self._handle, stream, scope)

    def _shed_oldest(self) -> None:
        """Close the oldest connection: a fresh probe is served, a slow client waits no more."""
        oldest = next(iter(self._open))
        del self._open[oldest]
        oldest.cancel()
        self.shed += 1
        now = anyio.current_time()
        if self._shed_logged_at is None or now - self._shed_logged_at >= SHED_LOG_INTERVAL:
            log.warning(
                "too many HTTP connections: closing the oldest",
                extra={
                    "event": "http_connections_shed",
                    "shed": self.shed - self._shed_logged,
                    "max_connections": self.max_connections,
                },
            )
            self._shed_logged, self._shed_logged_at = self.shed, now

    async def _handle(self, stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await self._converse(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:  # a bug here must not take the probes down with it
            log.exception("HTTP request failed", extra={"event": "http_request_failed"})
        finally:
            self._open.pop(scope, None)
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    async def _converse(self, stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        searched = 0  # a client sending a byte at a time must not make the search quadratic
        while (end := _HEAD_END.search(buffer, max(0, searched - 3))) is None:
            if (status := _head_status(buffer)) is not None:
                await self._refuse(stream, status)
                return
            searched = len(buffer)
            try:
                buffer += await stream.receive(MAX_HEAD_BYTES + 1 - len(buffer))
            except anyio.EndOfStream:
                return
        request = parse_request(bytes(buffer[: end.start()]))
        if isinstance(request, int):
            await self._refuse(stream, request)
            return
        await stream.send(await self.respond(*request))

    async def _refuse(self, stream: anyio.abc.SocketStream, status: int) -> None:
        """Answer ``status``, then read what the client still sends for a moment before closing.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        answer before the client reads it (Apache's "lingering close" for the same reason).
        """
        await stream.send(_refusal(status))
        await stream.send_eof()
        with anyio.move_on_after(LINGER), contextlib.suppress(anyio.EndOfStream, TimeoutError):
            while True:
                with anyio.fail_after(LINGER_QUIET):
                    await stream.receive()

    async def respond(self, method: str, path: str) -> bytes:
        """The response to a GET or HEAD of ``path``."""
        is_head = method == "HEAD"
        if path == "/metrics":
            # Rendered in a thread, one at a time: scrapes never hold up the probes or the loop.
            body = await anyio.to_thread.run_sync(
                generate_latest, self.registry, limiter=self._metrics_limiter
            )
            return render_response(200, body, CONTENT_TYPE_LATEST, head=is_head)
        probes = {
            "/livez": self.health.livez,
            "/readyz": self.health.readyz,
            "/startupz": self.health.startupz,
        }
        probe = probes.get(path)
        if probe is None:
            return render_response(404, b"not found\n", head=is_head)
        answer = probe()
        return render_response(answer.status, answer.reason.encode() + b"\n", head=is_head)
