"""A TCP proxy that can hold every byte in flight: a network partition that heals.

While :meth:`partition` is on, nothing is forwarded either way (the bytes wait in the proxy, as
in the network's buffers and retransmissions) and :attr:`held` is set once something waits;
:meth:`heal` delivers what waited, in order, and forwards again. Connections stay open.

    with PausingProxy(server.port) as proxy:
        ... a client on 127.0.0.1:proxy.port ...
        proxy.partition(); assert proxy.held.wait(10); proxy.heal()
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ("PausingProxy",)

HOST = "127.0.0.1"


class PausingProxy:
    """Forwards 127.0.0.1:``port`` (a free one) to 127.0.0.1:``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server((HOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._open = threading.Event()  # set: forwarding
        self._open.set()
        self.held = threading.Event()  # set once a byte waited in a partition
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="pausing-proxy", daemon=True).start()

    def partition(self) -> None:
        self.held.clear()
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._open.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> PausingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection((HOST, self.target_port))
            self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._open.is_set():
                    self.held.set()
                    self._open.wait()
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
