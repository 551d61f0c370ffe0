"""A TCP proxy for tests: 127.0.0.1:<free port> in front of a server, which a test can cut,
hang and restore (tests/test_db_outage.py puts it in front of PostgreSQL).

- :meth:`TcpProxy.cut`: every open connection is closed and new ones are accepted and closed
  at once (the database went away);
- :meth:`TcpProxy.hang`: connections stay open and new ones are accepted, but no byte is
  forwarded either way (a frozen server, a network that drops packets);
- :meth:`TcpProxy.restore`: forward again (bytes held during a hang are passed on).

One thread accepts; one thread per connection pumps both directions.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

OPEN, CUT, HUNG = "open", "cut", "hung"


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = OPEN
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        """Close every open connection and refuse new ones (accepted and closed)."""
        self.mode = CUT
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            _close(*pair)

    def hang(self) -> None:
        """Keep every connection open but forward nothing."""
        self.mode = HUNG

    def restore(self) -> None:
        self.mode = OPEN

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._listener.close()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == CUT:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        client, server = pair
        other = {client: server, server: client}
        try:
            while not self._stop.is_set():
                if self.mode == HUNG:
                    self._stop.wait(0.02)
                    continue
                if self.mode == CUT:
                    return
                readable, _, _ = select.select([client, server], [], [], 0.05)
                for sock in readable:
                    if self.mode != OPEN:
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    other[sock].sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._pairs.discard(pair)
            _close(client, server)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
