"""`els serve` against clients that hold connections (issue 24): idle and slow clients are disconnected within
the read timeout while /health keeps answering, idle sockets up to the connection limit leave /health
answering and those past it are answered 503 at once with one log line (but for a few that ask for /health),
running out of file descriptors logs one line per interval, the open-files limit is raised to hold the
connections, and a shutdown interrupts a long prefill between layers. Loopback only; every loop is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import logging
import resource
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from els.serve.app import Limits, create_app
from els.serve.connections import FILES_KEPT, HEALTH_RESERVE, fit_open_files, quiet_accept_errors, timely_protocol

from helpers import tiny_model

MODEL = "tiny-qwen2"
LIMITS = Limits(max_prompt_tokens=100, max_tokens=8, max_body_bytes=64 * 1024, max_batch=4, batch_window_ms=0)
READ_TIMEOUT = 1.0
LIMIT = 64


@contextlib.contextmanager
def _serving(read_timeout: float):
    """create_app on a free loopback port with this read timeout, keep-alive 1 s and `LIMIT` connections at most,
    as `els serve` runs it; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(tiny_model("qwen2"), None, LIMITS),
        log_level="warning",
        http=timely_protocol(read_timeout, LIMIT),
        timeout_keep_alive=1,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server():
    with _serving(READ_TIMEOUT) as port:
        yield port


@pytest.fixture(scope="module")
def patient_server():
    """Idle sockets stay for 10 s here, so that a test can hold them while it looks."""
    with _serving(10.0) as port:
        yield port


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (it may answer first, e.g. a 400 nobody reads)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def _trickle(port: int, head: bytes, then: bytes, closed: dict, name: str) -> None:
    """Send `head`, then `then` a byte every 0.2 s (at most 10 s); record when the server closed us."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        for byte in then:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            if _closed_within(s, 0.2) or time.monotonic() - start > 10:
                break
        closed[name] = time.monotonic() - start if _closed_within(s, 0.5) else None


def test_idle_and_slow_clients_are_closed_within_the_read_timeout(server):
    post = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    clients = {f"idle {i}": (b"", b"") for i in range(5)}
    clients |= {f"slow header {i}": (b"GET /health HTTP/1.1\r\n", b"x-slow: " + b"a" * 100) for i in range(5)}
    clients |= {f"slow body {i}": (post + b"content-length: 200\r\n\r\n", b"{" + b" " * 199) for i in range(5)}
    closed: dict = {}
    idle = [socket.create_connection(("127.0.0.1", server)) for _ in range(5)]
    threads = [
        threading.Thread(target=_trickle, args=(server, *v, closed, k))
        for k, v in clients.items()
        if not k.startswith("idle")
    ]
    for t in threads:
        t.start()
    start = time.monotonic()
    try:
        while time.monotonic() - start < 1.5 * READ_TIMEOUT:  # /health answers while they are held
            assert httpx.get(f"http://127.0.0.1:{server}/health", timeout=2).status_code == 200
            time.sleep(0.1)
        for i, s in enumerate(idle):
            closed[f"idle {i}"] = 0.0 if _closed_within(s, READ_TIMEOUT + 1) else None
    finally:
        for s in idle:
            s.close()
    for t in threads:
        t.join(15)
    assert set(closed) == set(clients)
    still_open = [k for k, took in closed.items() if took is None or took > READ_TIMEOUT + 1.5]
    assert not still_open, closed


def test_a_kept_alive_connection_serves_again_and_is_closed_when_idle(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    try:
        for _ in range(2):  # two requests on one connection: the read deadline is re-armed for the second
            conn.request("GET", "/health")
            assert conn.getresponse().read().startswith(b'{"status":"ok"')
            time.sleep(0.5 * READ_TIMEOUT)
        assert _closed_within(conn.sock, 3)  # keep-alive 1 s
    finally:
        conn.close()


def test_running_out_of_file_descriptors_logs_once_per_interval(caplog):
    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop, interval=60)
        with caplog.at_level(logging.ERROR):
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
    finally:
        loop.close()
    records = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    assert len(records) == 1 and not records[0].exc_info


def test_a_shutdown_interrupts_a_long_prefill_between_layers():
    lm = tiny_model("qwen2")
    for block in lm.blocks:  # a slow prefill: 3 layers of 2 s each
        block.register_forward_pre_hook(lambda module, args: time.sleep(2.0))
    app = create_app(lm, None, LIMITS)
    with TestClient(app) as client:
        answer: dict = {}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        t = threading.Thread(target=lambda: answer.update(r=client.post("/v1/chat/completions", json=body)))
        t.start()
        time.sleep(2.5)  # inside the prefill's second layer: 3.5 s of it left
        start = time.monotonic()
        app.state.engine.abort()  # what SIGTERM calls
        t.join(10)
        took = time.monotonic() - start
    assert answer["r"].status_code == 503 and answer["r"].json()["error"]["code"] == "shutting_down", answer
    assert took < 2.5, f"answered {took:.1f} s after the shutdown began: the prefill was not interrupted"


def _health(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code


def test_health_answers_while_idle_sockets_below_the_limit_are_held(patient_server):
    idle = [socket.create_connection(("127.0.0.1", patient_server)) for _ in range(50)]
    try:
        time.sleep(0.3)  # all accepted
        for _ in range(10):
            start = time.monotonic()
            assert _health(patient_server) == 200
            assert time.monotonic() - start < 1.0
        assert not any(_closed_within(s, 0.01) for s in idle)  # held, not dropped to make room
    finally:
        for s in idle:
            s.close()


def _answer(port: int, request: bytes) -> tuple[bytes, float]:
    """What the server sends back to `request` on a new connection until it closes it, and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        start = time.monotonic()
        s.sendall(request)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        return answer, time.monotonic() - start


POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_past_the_limit_requests_get_503_at_once_and_health_still_answers(patient_server, caplog):
    held = [socket.create_connection(("127.0.0.1", patient_server)) for _ in range(LIMIT)]
    time.sleep(0.3)  # all accepted: the server is full
    try:
        with caplog.at_level(logging.INFO):
            for request in (POST, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /v1/models HTTP/1.1\r\n\r\n"):
                answer, took = _answer(patient_server, request)
                assert answer.startswith(b"HTTP/1.1 503 ") and b'"code": "overloaded"' in answer, answer
                assert took < 1.0
            for _ in range(10):
                answer, took = _answer(patient_server, HEALTH)
                assert answer.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in answer, answer
                assert took < 1.0
            assert _health(patient_server) == 200  # a client that keeps its connection alive
            # the reserve is bounded: past it, a connection is answered 503 before it sends anything
            reserve = [socket.create_connection(("127.0.0.1", patient_server)) for _ in range(HEALTH_RESERVE)]
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", patient_server), timeout=2) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
            for s in reserve:
                s.close()
        assert not any(_closed_within(s, 0.01) for s in held)  # the admitted ones are kept
    finally:
        for s in held:
            s.close()
    refusals = [r for r in caplog.records if "over --limit-concurrency" in r.getMessage()]
    assert len(refusals) <= 1 and not any(r.exc_info for r in caplog.records), caplog.text
    assert "Traceback" not in caplog.text and "Exceeded concurrency limit" not in caplog.text
    time.sleep(0.3)  # the held ones' closes reach the server
    assert _health(patient_server) == 200


def test_the_open_files_limit_is_raised_to_hold_the_connections():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200
    if hard != resource.RLIM_INFINITY and hard < want + FILES_KEPT:
        pytest.skip(f"hard open-files limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        fit_open_files(want)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= want + HEALTH_RESERVE + FILES_KEPT
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(ValueError, match="limit-concurrency"):
                fit_open_files(hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
