"""Connections that slow, idle or numerous clients cannot use to starve the server (`els serve`).

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`) and answers 503 to requests
past `limit_concurrency`, but its h11 protocol waits for ever for a request's headers and body, and keeps
every connection it accepts: a client that connects and sends nothing, or a byte every few seconds, holds
its socket, and enough of them run the process out of file descriptors. `TimelyH11Protocol` gives every
request a deadline for its headers and body together, and answers a connection past the limit 503 and
closes it at once, so the sockets held stay under the limit; a few past it (`HEALTH_RESERVE`) may still ask
`GET /health`, so a full server reports its state. `fit_open_files` makes sure the open-files limit has room
for them all. The protocol keeps the limit itself: uvicorn's own `limit_concurrency` would count those
`/health` connections and answer them 503 (with a warning line each). When accept() does run out of
descriptors, asyncio logs a traceback per attempt (hundreds of thousands a minute); `quiet_accept_errors` logs
one line per interval instead.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from els.serve.protocol import ApiError

log = logging.getLogger("els.serve.connections")
READ_TIMEOUT_S = 5.0  # a request's headers and body arrive within this, or its connection is closed
KEEP_ALIVE_S = 5.0  # an idle kept-alive connection is closed after this
LIMIT_CONCURRENCY = 256  # connections at once; past it, a new one is answered 503 and closed
HEALTH_RESERVE = 8  # connections past the limit that are read, and answered only if they ask GET /health
_HEALTH = b"GET /health"
FILES_KEPT = 256  # open files beside the connections: the model's, the logs', the event loop's, the worker's
ACCEPT_ERROR_LOG_S = 10.0  # at most one log line per this many seconds while accept() lacks descriptors
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BUSY = json.dumps(
    ApiError(503, "too many connections, retry later", type="server_error", code="overloaded").body()
).encode()
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


class _Throttled:
    """Counts an event and logs it at most once per `interval` seconds, with how often it happened: a client
    can cause it at will, and one line per event would fill the disk."""

    def __init__(self, interval: float, level: int, message: str):
        self.interval, self.level, self.message, self.last, self.count = interval, level, message, -float("inf"), 0

    def __call__(self, *args: object) -> None:
        self.count += 1
        if (now := time.monotonic()) - self.last >= self.interval:
            log.log(self.level, self.message, *args, self.count)
            self.last, self.count = now, 0


class TimelyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline (`read_timeout`) from a request's first byte (or, for a new
    connection, from the connection) to the end of its body; a client that misses it is disconnected. A
    connection past `max_connections` is answered 503 and closed before it is read, unless it is one of the
    `HEALTH_RESERVE` after them: those are read, and served while each request is a `GET /health`."""

    read_timeout = READ_TIMEOUT_S
    max_connections = LIMIT_CONCURRENCY
    refused = _Throttled(
        ACCEPT_ERROR_LOG_S,
        logging.WARNING,
        "connections over --limit-concurrency answered 503 (%d times since the last report)",
    )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        over = len(self.connections) - self.max_connections
        self._reserved = over > 0  # past the limit: served only while it asks for /health
        self._head = b""  # a reserved connection's request start, held until it shows what it asks for
        if over > HEALTH_RESERVE:
            self._refuse()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        starting = self.cycle is None or self.cycle.response_complete
        if self._deadline is None and starting:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        if self._reserved and (starting or self._head):
            self._head += data
            if (health := _asks_health(self._head)) is None:
                return
            if not health:
                self._refuse()
                return
            data, self._head = self._head, b""
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            self._disarm()  # the request is read: answering it may take as long as generation takes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _refuse(self) -> None:
        self._disarm()
        self.connections.discard(self)  # the admitted ones' requests must not be refused for it
        self.transport.write(_REFUSAL)
        self.transport.close()
        self.refused()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            # The app, if it is reading the body, sees the disconnect (a 400 nobody reads, no traceback).
            self.transport.close()


def _asks_health(head: bytes) -> bool | None:
    """Whether a request that starts with these bytes is a `GET /health`; None while too few have come to tell."""
    if len(head) <= len(_HEALTH):
        return None if _HEALTH.startswith(head) else False
    return head.startswith(_HEALTH) and head[len(_HEALTH) : len(_HEALTH) + 1] in (b" ", b"?")


def timely_protocol(read_timeout: float, max_connections: int = LIMIT_CONCURRENCY) -> type[TimelyH11Protocol]:
    """The protocol class with this deadline and limit (uvicorn takes a class, not an instance)."""
    return type(
        "TimelyH11Protocol", (TimelyH11Protocol,), {"read_timeout": read_timeout, "max_connections": max_connections}
    )


def fit_open_files(connections: int) -> None:
    """Raises the soft open-files limit to hold `connections` sockets, the `/health` reserve and `FILES_KEPT`
    files beside them (as far as the hard limit allows); ValueError if the hard limit is too low."""
    need = connections + HEALTH_RESERVE + FILES_KEPT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(
                f"--limit-concurrency {connections} needs {need} open files ({FILES_KEPT} kept for the model, "
                f"logs and the server), and the hard limit (ulimit -Hn) is {hard}: lower --limit-concurrency"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = ACCEPT_ERROR_LOG_S) -> None:
    """Log accept() running out of file descriptors once per `interval` (with how often), not per attempt;
    asyncio itself retries the accept a moment later. Other errors go to the handler in place."""
    previous = loop.get_exception_handler()
    report = _Throttled(
        interval,
        logging.ERROR,
        "cannot accept connections: %s (%d times since the last report); lower --limit-concurrency or raise "
        "the open-files limit (ulimit -n)",
    )

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        e = context.get("exception")
        if not (isinstance(e, OSError) and e.errno in _OUT_OF_DESCRIPTORS):
            if previous:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        report(e)

    loop.set_exception_handler(handler)


def serve(
    app: Any,
    host: str,
    port: int,
    *,
    read_timeout: float = READ_TIMEOUT_S,
    keep_alive: float = KEEP_ALIVE_S,
    limit_concurrency: int = LIMIT_CONCURRENCY,
) -> None:
    """uvicorn.run with the deadlines and the connection limit above (`fit_open_files` first)."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=timely_protocol(read_timeout, limit_concurrency),
        timeout_keep_alive=math.ceil(keep_alive),
    )
