"""Connections that slow, idle or numerous clients cannot use to starve the server (`els serve`).

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`) and answers 503 past
`limit_concurrency`, but its h11 protocol waits for ever for a request's headers and body: a client that
connects and sends nothing, or a byte every few seconds, holds its socket until the process runs out of
file descriptors. `TimelyH11Protocol` gives every request a deadline for its headers and body together.
When accept() does run out of descriptors, asyncio logs a traceback per attempt (hundreds of thousands a
minute); `quiet_accept_errors` logs one line per interval instead.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("els.serve.connections")
READ_TIMEOUT_S = 5.0  # a request's headers and body arrive within this, or its connection is closed
KEEP_ALIVE_S = 5.0  # an idle kept-alive connection is closed after this
LIMIT_CONCURRENCY = 256  # connections at once; past it, new requests get 503 (uvicorn's limit_concurrency)
ACCEPT_ERROR_LOG_S = 10.0  # at most one log line per this many seconds while accept() lacks descriptors
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class TimelyH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline (`read_timeout`) from a request's first byte (or, for a new
    connection, from the connection) to the end of its body; a client that misses it is disconnected."""

    read_timeout = READ_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
            self._disarm()  # the request is read: answering it may take as long as generation takes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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


def timely_protocol(read_timeout: float) -> type[TimelyH11Protocol]:
    """The protocol class with this deadline (uvicorn takes a class, not an instance)."""
    return type("TimelyH11Protocol", (TimelyH11Protocol,), {"read_timeout": read_timeout})


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = ACCEPT_ERROR_LOG_S) -> None:
    """Log accept() running out of file descriptors once per `interval` (with how often), not per attempt;
    asyncio itself retries the accept a moment later. Other errors go to the handler in place."""
    previous = loop.get_exception_handler()
    state = {"last": -float("inf"), "count": 0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        e = context.get("exception")
        if not (isinstance(e, OSError) and e.errno in _OUT_OF_DESCRIPTORS):
            if previous:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        state["count"] += 1
        if (now := time.monotonic()) - state["last"] >= interval:
            log.error(
                "cannot accept connections: %s (%d times since the last report); lower "
                "--limit-concurrency or raise the open-files limit (ulimit -n)",
                e,
                state["count"],
            )
            state["last"], state["count"] = now, 0

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
    """uvicorn.run with the deadlines and the connection limit above."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=timely_protocol(read_timeout),
        timeout_keep_alive=math.ceil(keep_alive),
        limit_concurrency=limit_concurrency,
    )
