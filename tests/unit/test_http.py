"""The probes (each state, each reason) and the HTTP server that serves them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from unittest.mock import ANY

import anyio
import anyio.to_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workerkit.supervisor.http import LOOP_STALL_TIMEOUT, Health, HttpServer, Probe, parse_request
from workerkit.supervisor.metrics import SupervisorMetrics

LIVENESS = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def healthy(clock: Clock) -> Health:
    health = Health(LIVENESS, clock=clock)
    health.tick(clock.now)
    health.worker_ready(clock.now)
    health.state = "ready"
    health.store_health(True, "ok", clock.now)
    return health


# --- probe logic, state by state -----------------------------------------------------------


def test_starting() -> None:
    clock = Clock()
    health = Health(LIVENESS, clock=clock)
    health.tick(clock.now)
    assert health.livez() == Probe(True, "ok")
    assert health.readyz() == Probe(False, "starting: the worker is not ready yet")
    assert health.startupz() == Probe(False, "starting: waiting for the worker to be ready")


def test_ready_and_healthy() -> None:
    clock = Clock()
    health = healthy(clock)
    assert health.livez() == Probe(True, "ok")
    assert health.readyz() == Probe(True, "ok")
    assert health.startupz() == Probe(True, "ok")


@pytest.mark.parametrize("state", ["draining", "releasing"])
def test_draining_is_not_ready_but_alive_and_started(state: str) -> None:
    clock = Clock()
    health = healthy(clock)
    health.state = state
    health.stopping_reason = "SIGTERM"
    assert health.readyz() == Probe(False, f"{state} since SIGTERM")
    assert health.livez().ok
    assert health.startupz().ok
    # The worker stops heartbeating once it stops fetching; the drain has its own deadlines.
    clock.now += 10 * LIVENESS
    health.tick(clock.now)
    assert health.livez() == Probe(True, f"ok: {state}")


def test_a_signal_fails_readiness_at_once() -> None:
    clock = Clock()
    health = healthy(clock)
    health.signal_received("SIGINT")
    assert health.readyz() == Probe(False, "draining since SIGINT")
    health.state = "releasing"
    health.signal_received("SIGTERM")  # a second signal does not rewrite the reason
    assert health.readyz() == Probe(False, "releasing since SIGINT")


def test_stopped() -> None:
    clock = Clock()
    health = healthy(clock)
    health.state = "stopped"
    assert health.readyz() == Probe(False, "stopped")
    assert health.livez().ok


def test_store_unreachable_fails_readiness_only() -> None:
    clock = Clock()
    health = healthy(clock)
    health.store_health(False, "database unreachable: connection refused", clock.now)
    assert health.readyz() == Probe(
        False, "store unreachable: database unreachable: connection refused"
    )
    assert health.livez().ok  # liveness never depends on the broker


def test_store_health_not_reported_yet() -> None:
    clock = Clock()
    health = Health(LIVENESS, clock=clock)
    health.worker_ready(clock.now)
    health.state = "ready"
    assert health.readyz() == Probe(False, "store health not reported yet")


def test_stale_store_report_fails_readiness() -> None:
    clock = Clock()
    health = healthy(clock)
    clock.now += LIVENESS + 1
    health.heartbeat(clock.now)
    health.tick(clock.now)
    probe = health.readyz()
    assert not probe.ok
    assert probe.reason.startswith("store health report is stale")


def test_heartbeat_older_than_liveness_timeout_fails_livez() -> None:
    clock = Clock()
    health = healthy(clock)
    clock.now += LIVENESS
    health.tick(clock.now)
    assert health.livez().ok  # exactly at the threshold: still alive
    clock.now += 0.5
    health.tick(clock.now)
    probe = health.livez()
    assert not probe.ok
    assert probe.reason == f"worker heartbeat is {LIVENESS + 0.5:.1f}s old (liveness_timeout 30s)"
    health.heartbeat(clock.now)
    assert health.livez().ok


def test_heartbeat_is_not_required_before_the_worker_is_ready() -> None:
    clock = Clock()
    health = Health(LIVENESS, clock=clock)
    clock.now += 10 * LIVENESS
    health.tick(clock.now)
    assert health.livez().ok


def test_stalled_supervisor_loop_fails_livez() -> None:
    clock = Clock()
    health = healthy(clock)
    clock.now += LOOP_STALL_TIMEOUT + 1
    health.heartbeat(clock.now)
    probe = health.livez()
    assert not probe.ok
    assert probe.reason.startswith("supervisor loop stalled")


def test_probe_status_codes() -> None:
    assert Probe(True, "ok").status == 200
    assert Probe(False, "no").status == 503


# --- the server -----------------------------------------------------------------------------


async def get(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


def serve(health: Health, check: Callable[[int], object]) -> None:
    metrics = SupervisorMetrics("sql")

    async def main() -> None:
        async with HttpServer(health, metrics.registry, "127.0.0.1", 0) as server:
            assert server.port > 0
            await check(server.port)  # type: ignore[misc]

    anyio.run(main)


def request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.30\r\n\r\n".encode()


def test_server_answers_each_probe_with_status_and_one_line() -> None:
    clock = Clock()
    health = healthy(clock)

    async def check(port: int) -> None:
        clock.now = health.last_tick or 0.0
        for path in ("/livez", "/readyz", "/startupz"):
            status, headers, body = await get(port, request(path))
            assert (status, body) == (200, b"ok\n"), path
            assert headers["Connection"] == "close"
            assert headers["Content-Length"] == str(len(body))
        health.state = "draining"
        health.stopping_reason = "SIGTERM"
        status, _, body = await get(port, request("/readyz?verbose=1"))
        assert (status, body) == (503, b"draining since SIGTERM\n")

    serve(health, check)


def test_server_metrics_in_prometheus_text() -> None:
    clock = Clock()
    health = healthy(clock)

    async def check(port: int) -> None:
        status, headers, body = await get(port, request("/metrics"))
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert b"workerkit_worker_state" in body
        assert b"python_gc" not in body  # not the global registry

    serve(health, check)


def test_server_rejects_other_methods_paths_and_garbage() -> None:
    clock = Clock()
    health = healthy(clock)

    async def check(port: int) -> None:
        assert (await get(port, request("/readyz", "POST")))[0] == 405
        assert (await get(port, request("/nope")))[0] == 404
        assert (await get(port, b"hello\r\n\r\n"))[0] == 400
        status, headers, body = await get(port, request("/livez", "HEAD"))
        assert (status, body) == (200, b"")
        assert headers["Content-Length"] == "3"

    serve(health, check)


async def send_and_read_all(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        answer = b""
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                answer += await stream.receive()
    return answer


def test_server_refuses_a_100_kb_header_with_431_and_a_long_request_line_with_414() -> None:
    clock = Clock()
    health = healthy(clock)

    async def check(port: int) -> None:
        big_header = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        answer = await send_and_read_all(port, big_header)
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
        answer = await send_and_read_all(port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 414 URI Too Long\r\n"), answer
        # A head just under the caps is fine.
        fits = b"GET /livez HTTP/1.1\r\nX-Fits: " + b"a" * 8000 + b"\r\n\r\n"
        assert (await send_and_read_all(port, fits)).startswith(b"HTTP/1.1 200 OK\r\n")

    serve(health, check)


def test_server_refuses_bad_requests_with_their_status() -> None:
    clock = Clock()
    health = healthy(clock)

    async def check(port: int) -> None:
        answer = await send_and_read_all(port, request("/livez", "DELETE"))
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        assert b"\r\nAllow: GET, HEAD\r\n" in answer
        answer = await send_and_read_all(port, b"GET /livez HTTP/2.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 505 ")
        for bad in (b"GET livez HTTP/1.1\r\n\r\n", b"GET /livez HTTP/1.1\r\n folded\r\n\r\n"):
            assert (await send_and_read_all(port, bad)).startswith(b"HTTP/1.1 400 "), bad
        # Bare LF line ends are accepted (RFC 9112 allows it), as are HTTP/1.0 clients.
        answer = await send_and_read_all(port, b"GET /livez HTTP/1.0\n\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nok\n")

    serve(health, check)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.builds(bytes.__add__, st.just(b"GET /"), st.binary()))
def test_any_request_head_is_answered_or_refused_never_raises(head: bytes) -> None:
    answer = parse_request(head)
    assert answer in (400, 405, 414, 431, 505) or (
        isinstance(answer, tuple) and answer[0] in ("GET", "HEAD") and answer[1].startswith("/")
    )


def test_a_silent_connection_is_closed_at_its_deadline_from_accept() -> None:
    clock = Clock()
    health = healthy(clock)

    async def main() -> None:
        registry = SupervisorMetrics("sql").registry
        async with (
            HttpServer(health, registry, "127.0.0.1", 0, request_timeout=0.5) as server,
            await anyio.connect_tcp("127.0.0.1", server.port) as stream,
        ):
            start = anyio.current_time()
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await stream.receive()
            assert anyio.current_time() - start >= 0.4

    anyio.run(main)


def test_at_the_limit_the_oldest_connection_is_closed_and_a_fresh_probe_answered() -> None:
    clock = Clock()
    health = healthy(clock)

    async def main() -> None:
        registry = SupervisorMetrics("sql").registry
        async with (
            HttpServer(health, registry, "127.0.0.1", 0, max_connections=4) as server,
            contextlib.AsyncExitStack() as stack,
        ):
            slow = []
            for _ in range(10):
                stream = await stack.enter_async_context(
                    await anyio.connect_tcp("127.0.0.1", server.port)
                )
                await stream.send(b"GET /livez HT")
                slow.append(stream)
            with anyio.fail_after(5):
                # The six oldest make room for the four newest: each is closed without an answer.
                for stream in slow[:6]:
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await stream.receive()
                assert await get(server.port, request("/livez")) == (200, ANY, b"ok\n")
            assert server.shed == 7

    anyio.run(main)


class BlockingCollector(Collector):
    """A collector that holds its scrape until released (a slow exporter, a slow client)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Iterable[Metric]:
        self.entered.set()
        self.release.wait(3)
        yield GaugeMetricFamily("slow_metric", "rendered slowly", value=1)


def test_a_scrape_in_progress_does_not_delay_the_probes() -> None:
    clock = Clock()
    health = healthy(clock)
    registry = CollectorRegistry()
    collector = BlockingCollector()

    metrics_body: list[bytes] = []

    async def main() -> None:
        async with HttpServer(health, registry, "127.0.0.1", 0) as server:
            registry.register(collector)

            async def scrape() -> None:
                metrics_body.append((await get(server.port, request("/metrics")))[2])

            async with anyio.create_task_group() as tg:
                tg.start_soon(scrape)
                await anyio.to_thread.run_sync(collector.entered.wait, 5)
                start = anyio.current_time()
                with anyio.fail_after(2):
                    for path in ("/livez", "/readyz", "/startupz"):
                        assert (await get(server.port, request(path)))[0] == 200
                assert anyio.current_time() - start < 1.0
                assert not metrics_body  # the scrape is still being rendered
                collector.release.set()
            assert b"slow_metric 1.0" in metrics_body[0]

    anyio.run(main)
