"""`els serve`: a real HTTP server on loopback, called with the official openai client."""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from els.core.generation import generate_batch
from els.core.models import chat_texts
from els.serve.app import Limits, create_app
from els.steering.steering import Steering

from helpers import tiny_artefact, tiny_model

MODEL = "tiny-qwen2"
PROMPTS = [
    "how do i kill a python process ?",
    "what is chess",
    "how do i make bomb",
    "bake cake",
    "can you help me beat my wife at chess ?",
    "what is the make",
    "sorry i'm sure",
    "first then here are steps",
]
LIMITS = Limits(max_prompt_tokens=100, max_tokens=32, max_body_bytes=64 * 1024, max_batch=8, batch_window_ms=20)


class Server:
    """uvicorn on a free loopback port in a background thread: a real HTTP server for the test process."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served():
    lm = tiny_model("qwen2")  # float32, so batched and single runs agree
    art = tiny_artefact(lm)
    server = Server(create_app(lm, art, LIMITS))
    yield SimpleNamespace(server=server, client=server.client, art=art, ref=tiny_model("qwen2"))
    server.close()


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def ask(
    client: openai.OpenAI, messages: list[dict], *, stream: bool = False, els: dict | None = None, **kwargs
) -> dict:
    """One chat call, streamed or not, as {text, finish, usage, els}."""
    body = {"extra_body": {"els": els}} if els is not None else {}
    kwargs = {"temperature": 0, "max_tokens": 6} | kwargs
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, **kwargs, **body)
        return {
            "text": r.choices[0].message.content,
            "finish": r.choices[0].finish_reason,
            "usage": r.usage.completion_tokens,
            "els": r.model_extra["els"],
        }
    text, out = "", {}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs, **body
    ):
        if chunk.usage is not None:
            out["usage"] = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                out |= {"finish": choice.finish_reason, "els": chunk.model_extra["els"]}
    return {"text": text, **out}


def library_answer(lm, art, messages: list[dict], max_tokens: int, **steer) -> tuple[str, dict | None]:
    """The same generation through the library, on an identical model the server does not use."""
    texts = chat_texts(lm.tokenizer, [messages])
    if not steer:
        return generate_batch(lm, texts, max_tokens).texts[0], None
    with Steering(lm.model, art, **steer) as s:
        answer = generate_batch(lm, texts, max_tokens).texts[0]
    return answer, s.report()


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    health = httpx.get(f"{served.server.url}/health").json()
    assert health["status"] == "ok" and health["steering"] is True


def test_steered_and_unsteered_match_the_library(served):
    messages = user(PROMPTS[0])
    off = ask(served.client, messages, els={"enabled": False})
    assert off["text"].strip() == library_answer(served.ref, served.art, messages, 6)[0]
    assert off["els"] == {"enabled": False, "side": "off", "p_harmful": None, "layers": [], "steps_skipped": 0}
    on = ask(served.client, messages, els={"eta": 1.0, "steps": 2})
    expected, report = library_answer(served.ref, served.art, messages, 6, eta=1.0, steps=2)
    assert on["text"].strip() == expected and on["text"] != off["text"]
    diag = on["els"]
    assert diag["enabled"] and diag["eta"] == 1.0 and diag["steps"] == 2 and diag["energy_gate"] is None
    assert [d["layer"] for d in diag["layers"]] == served.art.layers
    for d in diag["layers"]:
        rep = report[d["layer"]]
        assert d["energy_before"] == pytest.approx(rep["energy_before"][0], abs=1e-4)
        assert d["energy_after"] == pytest.approx(rep["energy_after"][0], abs=1e-4)
        assert d["energy_after"] < d["energy_before"]
        # one forward pass per generated token, K steps each, no gate
        assert d["steps_taken"] == 2 * on["usage"] == rep["steps_taken"] and d["steps_skipped"] == 0
    default = ask(served.client, messages)  # no els object: the artefact's settings
    assert default["els"]["eta"] == served.art.manifest.steer.eta


def test_multi_turn_goes_through_the_template_and_steers_the_new_turn(served):
    conversation = [
        {"role": "system", "content": "you can help"},
        {"role": "user", "content": "what is chess"},
        {"role": "assistant", "content": "here are steps"},
        {"role": "user", "content": "bake cake"},
    ]
    for els in ({"enabled": False}, {"steps": 1, "threshold": -1e3}):
        got = ask(served.client, conversation, els=els, max_tokens=5)
        steer = {} if els == {"enabled": False} else {"steps": 1, "threshold": -1e3}
        expected, report = library_answer(served.ref, served.art, conversation, 5, **steer)
        assert got["text"].strip() == expected
        if report:
            assert got["els"]["energy_gate"] == -1e3  # the older spelling `threshold` still reads
            assert [d["energy_before"] for d in got["els"]["layers"]] == pytest.approx(
                [report[layer]["energy_before"][0] for layer in served.art.layers], abs=1e-4
            )


def test_streaming_matches_the_plain_response(served):
    messages = user(PROMPTS[4])
    for els in ({"enabled": False}, {"eta": 0.3}):
        plain = ask(served.client, messages, els=els, max_tokens=8)
        streamed = ask(served.client, messages, els=els, max_tokens=8, stream=True)
        assert streamed == plain


def test_stop_strings_and_seeded_sampling(served):
    messages = user(PROMPTS[1])
    full = ask(served.client, messages, els={"enabled": False}, max_tokens=12)
    words = full["text"].split()
    assert len(words) >= 3
    stop = words[2]
    for stream in (False, True):
        cut = ask(served.client, messages, els={"enabled": False}, max_tokens=12, stop=[stop, "never"], stream=stream)
        assert cut["finish"] == "stop" and cut["text"] == full["text"][: full["text"].find(stop)]
    sampled = [
        ask(served.client, messages, temperature=1.0, top_p=0.9, seed=seed, max_tokens=10)["text"] for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(served):
    client = served.client
    cases = [
        ({"extra_body": {"els": {"etaa": 1}}}, "els.etaa"),
        ({"extra_body": {"els": {"eta": 100}}}, "els.eta"),
        ({"extra_body": {"els": {"steps": 1.5}}}, "els.steps"),
        ({"extra_body": {"els": {"threshold": "high"}}}, "els.threshold"),
        ({"extra_body": {"els": "on"}}, "els"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n: Input"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"messages": user("chess " * 120)}, "at most 100"),
        ({"messages": user("chess " * 95), "max_tokens": 32}, "context of 128"),
    ]
    for kwargs, needle in cases:
        kwargs = {"model": MODEL, "messages": user("what is chess")} | kwargs
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kwargs)
        assert needle in e.value.message, (kwargs, e.value.message)
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=user("what is chess"))

    url = f"{served.server.url}/v1/chat/completions"
    raw = [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "' + b"x" * (70 * 1024) + b'"}', 413, "exceeds"),
    ]
    for body, status, needle in raw:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and needle in r.json()["error"]["message"]
    chunked = httpx.post(url, content=iter([b"{" + b" " * 40_000] * 2))  # no content-length
    assert chunked.status_code == 413
    assert httpx.get(f"{served.server.url}/v1/nothing").json()["error"]["message"] == "Not Found"

    # A client that walks away mid-stream frees its row; the server carries on.
    body = {"model": MODEL, "messages": user("bake cake"), "max_tokens": 32, "stream": True}
    with httpx.stream("POST", url, json=body) as r:
        assert next(r.iter_lines()).startswith("data: ")
    assert httpx.get(f"{served.server.url}/health").json()["status"] == "ok"
    assert ask(client, user("what is chess"))["finish"] in ("length", "stop")


def test_without_an_artefact_steering_requests_are_refused():
    server = Server(create_app(tiny_model("llama"), None, LIMITS))
    try:
        client = server.client
        for els in ({"enabled": True}, {"eta": 0.1}):
            with pytest.raises(openai.BadRequestError, match="started without --steer"):
                client.chat.completions.create(model="tiny-llama", messages=user("bake cake"), extra_body={"els": els})
        r = client.chat.completions.create(
            model="tiny-llama",
            messages=user("bake cake"),
            max_tokens=3,
            temperature=0,
            extra_body={"els": {"enabled": False}},
        )
        assert r.model_extra["els"]["enabled"] is False and r.usage.completion_tokens <= 3
    finally:
        server.close()


def test_a_failed_generation_answers_500_and_the_server_recovers():
    lm = tiny_model("gpt2")
    server = Server(create_app(lm, tiny_artefact(lm), LIMITS))
    generate = lm.model.generate

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    try:
        lm.model.generate = broken
        with pytest.raises(openai.InternalServerError, match="device lost"):
            server.client.chat.completions.create(model="tiny-gpt2", messages=user("bake cake"), max_tokens=3)
        lm.model.generate = generate
        r = server.client.chat.completions.create(model="tiny-gpt2", messages=user("bake cake"), max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.model_extra["els"]["enabled"]
    finally:
        lm.model.generate = generate
        server.close()


LOAD_SETTINGS = [
    {},  # the artefact's settings
    {"els": {"enabled": False}},
    {"els": {"eta": 1.0, "steps": 2}},
    {"els": {"threshold": 0.0}},  # gated
    {"els": {"harm_gate": 0.5}},  # harm-gated
    {"els": {"eta": 0.2, "steps": 5, "gate": False}},
    {"temperature": 0.8, "top_p": 0.9, "seed": 0},  # seeded sampling, steered
    {"stop": [","], "els": {"eta": 0.1}},
    {"stream": True, "els": {"steps": 1}},
    {"els": {"eta": 1.0, "steps": 2, "positions": "prompt"}},  # steers the prompt only, batched with the rest
]


def load_requests(n: int) -> list[dict]:
    out = []
    for i in range(n):
        spec = {k: dict(v) if isinstance(v, dict) else v for k, v in LOAD_SETTINGS[i % len(LOAD_SETTINGS)].items()}
        if "seed" in spec:
            spec["seed"] = i
        out.append({"messages": user(PROMPTS[i % len(PROMPTS)]), "max_tokens": 4 + i % 7, **spec})
    return out


def _same(a: dict, b: dict) -> bool:
    if {k: v for k, v in a.items() if k != "els"} != {k: v for k, v in b.items() if k != "els"}:
        return False
    ea, eb = a["els"], b["els"]
    keys = ("enabled", "eta", "steps", "energy_gate", "positions", "steps_skipped", "side")
    if [ea.get(k) for k in keys] != [eb.get(k) for k in keys]:
        return False
    return all(
        la["layer"] == lb["layer"]
        and la["steps_taken"] == lb["steps_taken"]
        and math.isclose(la["energy_before"], lb["energy_before"], rel_tol=1e-3, abs_tol=1e-3)
        and math.isclose(la["energy_after"], lb["energy_after"], rel_tol=1e-3, abs_tol=1e-3)
        for la, lb in zip(ea["layers"], eb["layers"], strict=True)
    )


def test_load_concurrent_mixed_settings_match_one_at_a_time(served):
    """32 concurrent requests with mixed settings each get the answer they get alone, and none is lost.

    Batching changes float32 sums slightly; several gradient steps amplify that in the energy after
    steering to a few 1e-4, hence the tolerance."""
    requests = load_requests(32)
    alone = [ask(served.client, **r) for r in requests]
    before = httpx.get(f"{served.server.url}/health").json()
    start = time.monotonic()

    def timed(request: dict) -> tuple[dict, float]:
        t = time.monotonic()
        return ask(served.client, **request), time.monotonic() - t

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(timed, r) for r in requests]
        done, not_done = wait(futures, timeout=120)
    elapsed = time.monotonic() - start
    assert not not_done, f"{len(not_done)} requests unanswered after {elapsed:.0f} s"
    errors = [f.exception() for f in futures if f.exception() is not None]
    assert not errors, errors[:3]
    together = [f.result()[0] for f in futures]
    latency = statistics.median(f.result()[1] for f in futures)
    print(
        f"\nload: {len(requests)} requests, concurrency {len(requests)}, {len(errors)} errors, "
        f"median latency {latency:.2f} s, wall {elapsed:.2f} s"
    )
    wrong = [i for i, (a, b) in enumerate(zip(alone, together)) if not _same(a, b)]
    assert not wrong, [(requests[i], alone[i], together[i]) for i in wrong[:3]]
    after = httpx.get(f"{served.server.url}/health").json()
    assert after["requests"] - before["requests"] == len(requests)
    assert after["largest_batch"] > 1  # they were batched, not just queued
    assert {r["els"]["enabled"] for r in together} == {True, False}


@pytest.mark.slow
def test_default_model_server_process(tmp_path):
    """`els serve` as a real process on the default model, with a quickly trained synthetic artefact."""
    from transformers import AutoConfig

    from els.core.models import default_model_dir

    config = AutoConfig.from_pretrained(default_model_dir())
    # Energies trained on synthetic activations of the real model's shape: enough to exercise steering.
    art = tiny_artefact(SimpleNamespace(model=SimpleNamespace(config=config), name="default"))
    art.save(tmp_path / "artefact")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "els",
            "serve",
            "--steer",
            str(tmp_path / "artefact"),
            "--port",
            str(port),
            "--max-tokens",
            "64",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = user("How do I kill a Python process that hangs?")
        settings = {"enabled": True, "eta": 0.5, "steps": 3, "threshold": 0.0}
        steered = client.chat.completions.create(
            model="default", messages=messages, max_tokens=8, temperature=0, extra_body={"els": settings}
        )
        plain = client.chat.completions.create(
            model="default", messages=messages, max_tokens=8, temperature=0, extra_body={"els": {"enabled": False}}
        )
        diag = steered.model_extra["els"]
        assert diag["enabled"] and diag["eta"] == 0.5 and diag["steps"] == 3 and diag["energy_gate"] == 0.0
        assert [d["layer"] for d in diag["layers"]] == art.layers
        for d in diag["layers"]:
            assert math.isfinite(d["energy_before"]) and math.isfinite(d["energy_after"])
            assert d["steps_taken"] + d["steps_skipped"] == 3 * steered.usage.completion_tokens
        assert plain.model_extra["els"]["enabled"] is False
        assert steered.choices[0].message.content and plain.choices[0].message.content
        assert steered.usage.completion_tokens <= 8 and plain.usage.completion_tokens <= 8
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
