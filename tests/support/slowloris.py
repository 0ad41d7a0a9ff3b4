"""Hostile HTTP clients for the probe tests, as a process of their own.

``python -m tests.support.slowloris PORT N [READERS]`` keeps N connections to 127.0.0.1:PORT open,
each having sent half a request line and nothing more, and opens a new one for every one the
server closes (a sustained flood, as an attacker would run it). READERS more connections each ask
for ``/metrics`` with a tiny receive buffer and never read the answer. It prints
``holding N`` once the first N are open, then runs until it is killed; on SIGTERM it prints
``reopened K`` (how many the server closed and the flood replaced).
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Iterator

__all__ = ("SLOW_REQUEST", "flood")

SLOW_REQUEST = b"GET /livez HT"
METRICS_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def _open(port: int, request: bytes, *, tiny_buffer: bool = False) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if tiny_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)
        sock.setblocking(False)
    except OSError:
        sock.close()
        return None
    return sock


def flood(port: int, count: int, readers: int) -> Iterator[int]:
    """Hold the connections; yield the number reopened so far after each round of closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + readers + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + readers + 1024), hard))
    selector = selectors.DefaultSelector()
    for i in range(count + readers):
        sock = None
        while sock is None:
            sock = _open(
                port, SLOW_REQUEST if i < count else METRICS_REQUEST, tiny_buffer=i >= count
            )
        selector.register(sock, selectors.EVENT_READ, data=i < count)
    print(f"holding {count}", flush=True)
    reopened = 0
    while True:
        for key, _ in selector.select(timeout=1.0):
            slow = bool(key.data)
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if not slow:
                continue  # a slow reader: it never reads
            with contextlib.suppress(BlockingIOError):
                try:
                    if sock.recv(65536):
                        continue  # an answer (408 or so): the server closes next
                except OSError:
                    pass
                selector.unregister(sock)
                sock.close()
                replacement = None
                while replacement is None:
                    replacement = _open(port, SLOW_REQUEST)
                    if replacement is None:
                        time.sleep(0.01)
                selector.register(replacement, selectors.EVENT_READ, data=True)
                reopened += 1
        yield reopened


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    readers = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    reopened = 0

    def report(signum: int, frame: object) -> None:
        print(f"reopened {reopened}", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, report)
    for reopened in flood(port, count, readers):  # noqa: B007 - read by the handler
        pass


if __name__ == "__main__":
    main()
