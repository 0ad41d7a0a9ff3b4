"""The probes (each state, each reason) and the HTTP server that serves them."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from workerkit.supervisor.http import LOOP_STALL_TIMEOUT, Health, HttpServer, Probe
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


def test_server_drops_a_request_head_that_is_too_large() -> None:
    clock = Clock()
    health = healthy(clock)

    async def check(port: int) -> None:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /livez HTTP/1.1\r\nX: " + b"a" * 20000)

            async def read_until_closed() -> None:
                while True:
                    assert not await stream.receive(), "no response to an oversized head"

            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await read_until_closed()

    serve(health, check)
