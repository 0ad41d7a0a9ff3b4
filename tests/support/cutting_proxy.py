"""A TCP proxy in front of a real redis-server that cuts the connections at one chosen command:
a network fault placed exactly (a request that never reaches Redis, or a reply lost after the
command ran), followed by a short outage during which new connections are closed at once.

    with CuttingProxy(server.port) as proxy:
        proxy.cut_at(b"successful_job_count", deliver=True, outage=1.0)
        ... a client on proxy.url(0) ...
        assert proxy.cut.wait(10)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ("CuttingProxy",)

HOST = "127.0.0.1"


class CuttingProxy:
    """Forwards 127.0.0.1:``port`` (a free one) to the Redis on ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._deliver = False
        self._outage = 0.0
        self._on_cut: Callable[[], None] | None = None
        self._closed_until = 0.0
        self._sockets: list[socket.socket] = []
        self._stopped = False
        self.cut = threading.Event()  # set once the chosen command was met
        self.sent = threading.Event()  # set once the chosen command went to Redis (deliver)
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    def cut_at(
        self,
        marker: bytes,
        *,
        deliver: bool,
        outage: float,
        on_cut: Callable[[], None] | None = None,
    ) -> None:
        """At the first request that contains ``marker``: when ``deliver``, send it to Redis and
        drop its reply (the command ran, the client never hears it), else drop the request;
        then close every connection, and refuse new ones for ``outage`` seconds. ``on_cut``
        runs as the outage begins."""
        with self._lock:
            self._marker, self._deliver, self._outage, self._on_cut = (
                marker,
                deliver,
                outage,
                on_cut,
            )

    def close(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_all()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._closed_until:
                client.close()  # Redis "unreachable": the connection is closed at once
                continue
            try:
                server = socket.create_connection((HOST, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            dropping = threading.Event()
            replied = threading.Event()  # the first reply dropped after the cut's request
            threading.Thread(
                target=self._requests, args=(client, server, dropping, replied), daemon=True
            ).start()
            threading.Thread(
                target=self._replies, args=(server, client, dropping, replied), daemon=True
            ).start()

    def _requests(
        self,
        client: socket.socket,
        server: socket.socket,
        dropping: threading.Event,
        replied: threading.Event,
    ) -> None:
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            with self._lock:
                hit = self._marker is not None and self._marker in data
                if hit:
                    self._marker = None
                deliver, outage, on_cut = self._deliver, self._outage, self._on_cut
            if hit:
                dropping.set()
                if deliver:
                    with contextlib.suppress(OSError):
                        server.sendall(data)
                    self.sent.set()
                    # Redis has run it once its reply comes back (dropped by _replies).
                    replied.wait(10)
                self._closed_until = time.monotonic() + outage
                self._close_all()
                self.cut.set()
                if on_cut is not None:
                    on_cut()
                return
            try:
                server.sendall(data)
            except OSError:
                break
        self._close_pair(client, server)

    def _replies(
        self,
        server: socket.socket,
        client: socket.socket,
        dropping: threading.Event,
        replied: threading.Event,
    ) -> None:
        while True:
            try:
                data = server.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if dropping.is_set():
                replied.set()
                continue
            try:
                client.sendall(data)
            except OSError:
                break
        self._close_pair(client, server)

    def _close_pair(self, *pair: socket.socket) -> None:
        for each in pair:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                each.close()

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        self._close_pair(*sockets)
