"""The supervisor's HTTP endpoints: ``/livez``, ``/readyz``, ``/startupz`` and ``/metrics``.

Each probe answers 200 or 503 with one line saying why, never a secret (docs/reference/probes.md).
Why a small HTTP/1.1 server on the supervisor's own anyio loop instead of ``http.server`` in a
thread: the probes read state the loop owns, so they need no locks, and a wedged loop makes them
time out, which is exactly what the kubelet should see. Only what probes and Prometheus need is
implemented: GET and HEAD, no keep-alive, small request heads, a read timeout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = (
    "LOOP_STALL_TIMEOUT",
    "Health",
    "HttpServer",
    "Probe",
    "render_response",
)

log = logging.getLogger(__name__)

#: The supervisor's ticker runs every 0.1 s; a tick older than this means its loop is wedged.
LOOP_STALL_TIMEOUT: Final = 5.0
#: How long a client may take to send its request head, and its largest size.
READ_TIMEOUT: Final = 5.0
MAX_HEAD_BYTES: Final = 8192
#: Probes served at once; a flood of connections must not starve the supervisor's loop.
MAX_CONNECTIONS: Final = 32


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


def render_response(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", *, head: bool = False
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    reasons[503] = "Service Unavailable"
    lines = [
        f"HTTP/1.1 {status} {reasons.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head else body)


class HttpServer:
    """The probes and /metrics on ``host:port``. Use as ``async with HttpServer(...) as server``.

    ``server.port`` is the bound port (useful with port 0 in tests).
    """

    def __init__(self, health: Health, registry: CollectorRegistry, host: str, port: int) -> None:
        self.health = health
        self.registry = registry
        self.host = host
        self.port = port
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._limiter = anyio.CapacityLimiter(MAX_CONNECTIONS)

    async def __aenter__(self) -> HttpServer:
        listener = await anyio.create_tcp_listener(local_host=self.host, local_port=self.port)
        self._listener = listener
        # One listener per address family; with a given port they all share it, with port 0
        # the first one's is the one to report.
        local_port = anyio.abc.SocketAttribute.local_port
        self.port = int(listener.listeners[0].extra(local_port))  # noqa: S610 - anyio, not Django
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._serve, name="workerkit-http")
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

    async def _serve(self) -> None:
        assert self._listener is not None
        await self._listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.ByteStream) -> None:
        async with self._limiter, stream:
            try:
                with anyio.fail_after(READ_TIMEOUT):
                    head = await BufferedByteReceiveStream(stream).receive_until(
                        b"\r\n\r\n", MAX_HEAD_BYTES
                    )
            except (TimeoutError, anyio.IncompleteRead, anyio.DelimiterNotFound):
                return
            except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                return
            response = self.respond(head)
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(response)

    def respond(self, head: bytes) -> bytes:
        """The response to one request head (everything before the blank line)."""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return render_response(400, b"bad request\n")
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            return render_response(405, b"method not allowed\n")
        is_head = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return render_response(
                200, generate_latest(self.registry), CONTENT_TYPE_LATEST, head=is_head
            )
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
