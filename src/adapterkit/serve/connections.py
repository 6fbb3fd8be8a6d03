"""Slow and idle clients: a deadline on reading each request, and a cap on open connections.

uvicorn times out an idle keep-alive connection, but not one that is still sending its request:
a client that sends half its headers, or a ``Content-Length`` larger than the body it sends,
holds its connection (and a file descriptor) for ever, and a few hundred of them exhaust the
process's descriptors (every later connection then fails). So the server's HTTP protocol is
uvicorn's own with two additions (``guarded``):

* **read deadline**: each request, headers and body, must arrive within ``read_timeout`` seconds
  of the connection opening (or of the previous answer on a keep-alive connection); else the
  connection is closed. Time the app spends answering does not count.
* **connection cap**: past ``max_connections`` open connections, a new connection closes the
  oldest connection that is still sending its request (a slow client, or an idle keep-alive
  one); when every connection has a request under way, the new one gets a 503 and is closed.
  ``max_connections=0`` takes the descriptor limit (``RLIMIT_NOFILE``) less 64, at most 1000.

``uvicorn_config(app, config)`` is how ``serve`` (and the tests) start uvicorn with it.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .config import ServeConfig

#: descriptors kept for the process's own files (model, tokenizer, logs) under the cap
_RESERVED_FDS = 64
_DEFAULT_CAP = 1000
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"content-length: 69\r\n\r\n"
         b'{"detail":"The server has too many open connections; retry shortly."}')


def connection_cap(config: ServeConfig) -> int:
    """``config.max_connections``, or (0) the descriptor limit less ``_RESERVED_FDS``, at most 1000."""
    if config.max_connections:
        return config.max_connections
    try:
        import resource  # noqa: PLC0415 - POSIX only (absent on Windows)

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return _DEFAULT_CAP
    if soft == resource.RLIM_INFINITY:
        return _DEFAULT_CAP
    return max(8, min(_DEFAULT_CAP, soft - _RESERVED_FDS))


class _Guard:
    """The additions to a uvicorn HTTP protocol class (mixed in before it)."""

    read_timeout: float
    max_connections: int

    def connection_made(self, transport: Any) -> None:
        self._deadline: Optional[Any] = None
        self.waiting_since: Optional[float] = None
        super().connection_made(transport)
        self._arm()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        if not getattr(self, "pipeline", None):  # a pipelined request already read is not waited for
            self._arm()
        super().on_response_complete()

    def _request_read(self) -> None:
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self.waiting_since = time.monotonic()
        self._deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self.waiting_since = None, None

    def _expire(self) -> None:
        """The request did not arrive in time: close (the app, if it was reading the body, sees
        the client leave)."""
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        waiting = [c for c in self.connections
                   if c is not self and getattr(c, "waiting_since", None) is not None and not c.transport.is_closing()]
        if waiting:
            min(waiting, key=lambda c: c.waiting_since)._expire()
        else:
            self._disarm()
            self.transport.write(_BUSY)
            self.transport.close()


class _HttpToolsGuard(_Guard):
    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._request_read()


class _H11Guard(_Guard):
    def handle_events(self) -> None:
        super().handle_events()
        import h11  # noqa: PLC0415 - optional dependency: the serve extra (uvicorn)

        if self.conn.their_state is h11.DONE:
            self._request_read()


def guarded(read_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the read deadline and
    the connection cap."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base  # noqa: PLC0415 - optional dependency: the serve extra (uvicorn)

        guard: type = _HttpToolsGuard
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # noqa: PLC0415 - optional dependency: the serve extra (uvicorn)

        guard = _H11Guard
    return type(f"Guarded{base.__name__}", (guard, base),
                {"read_timeout": read_timeout, "max_connections": max_connections})


def uvicorn_config(app: Any, config: ServeConfig, **options: Any):
    """The ``uvicorn.Config`` that serves ``app`` on ``config.host:config.port`` with the guards."""
    import uvicorn  # noqa: PLC0415 - optional dependency: the serve extra (uvicorn)

    settings = {"host": config.host, "port": config.port, "log_level": "info",
                "http": guarded(config.read_timeout, connection_cap(config)), **options}
    return uvicorn.Config(app, **settings)


__all__ = ["connection_cap", "guarded", "uvicorn_config"]
