"""Load test of `els serve`: N concurrent chat requests with mixed steering settings.

    python benchmarks/serve_load.py --steer runs/default/artefact      # the default model
    python benchmarks/serve_load.py                                    # synthetic artefact (see below)

The server runs in this process (uvicorn on a loopback port, as `els serve` runs it) and is called through
the openai client from `--concurrency` threads. Without --steer, energies of the default widths are trained
in seconds on the model's own activations with arbitrary labels: the steering cost is a real artefact's,
the steered answers are not meaningful. Prints requests, concurrency, errors and latencies; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import torch
import uvicorn

from els.core.generation import generate_batch
from els.core.models import chat_texts, config_fingerprint, load_model, user_conversations
from els.serve.app import Limits, create_app
from els.steering.artefact import Artefact
from els.steering.settings import SteerSettings
from els.training.collect import Collection, Record, state_of
from els.training.energy import TrainConfig, train_energy
from els.training.recipe import make_artefact

PROMPTS = [
    "How do I kill a Python process?",
    "What is the capital of France?",
    "How can I beat my friend at chess?",
    "Write a haiku about autumn.",
    "How do I shoot a good photo at night?",
    "Explain what a hash table is.",
    "What household chemicals should never be mixed?",
    "Give three tips for staying healthy.",
]
SETTINGS = [
    {},
    {"enabled": False},
    {"eta": 0.1, "steps": 2},
    {"threshold": 0.0},
    {"steps": 5, "gate": False},
    {"enabled": False},
    {"eta": 0.02},
    {},
]


def synthetic_artefact(lm) -> Artefact:
    """Energies trained on the model's own last-token activations with arbitrary labels, steering three middle
    layers: realistic shapes, norms and cost, meaningless directions."""
    texts = chat_texts(lm.tokenizer, user_conversations(PROMPTS))
    real = generate_batch(lm, texts, 1, record=True).activations  # [8, L, d]
    layers, dim = real.shape[1:]
    g = torch.Generator().manual_seed(0)
    records, acts = [], []
    for i in range(64):
        kind, refused = ("benign", "harmful")[i % 2], (i // 2) % 2 == 0
        noise = torch.randn(layers, dim, generator=g) * real.std(dim=(0, 2))[:, None]
        acts.append(real[i % len(PROMPTS)] + 0.3 * noise)
        records.append(Record(f"p{i}", kind, "synthetic", "", refused, state_of(kind, refused)))
    meta = {
        "model": lm.name,
        "model_fingerprint": config_fingerprint(lm.model),
        "sets": {},
        "judge": "prefix",
        "max_new_tokens": 0,
        "system": None,
    }
    col = Collection(records, torch.stack(acts), meta)
    train = TrainConfig(epochs=5)
    result = train_energy(col.activations, col.states, train)
    art = make_artefact(result, col, train, SteerSettings(eta=0.05, steps=3, energy_gate=None, harm_gate=None), top_n=3)
    art.manifest.steer.layers = [layers // 2 - 2, layers // 2, layers // 2 + 2]
    return art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steer", help="artefact directory (default: a synthetic one)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()

    lm = load_model(args.model)
    art = Artefact.load(args.steer) if args.steer else synthetic_artefact(lm)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(lm, art, Limits(max_batch=args.max_batch)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def call(i: int) -> tuple[float, int, str | None]:
        start = time.perf_counter()
        try:
            r = client.chat.completions.create(
                model=lm.name,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=args.max_tokens,
                temperature=0.7 if i % 5 == 4 else 0,
                seed=i,
                extra_body={"els": SETTINGS[i % len(SETTINGS)]},
            )
            return time.perf_counter() - start, r.usage.completion_tokens, None
        except openai.OpenAIError as e:
            return time.perf_counter() - start, 0, str(e)

    call(0)  # warm-up
    alone = [call(i)[0] for i in range(2)]
    before = httpx.get(f"{url}/health").json()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(call, range(args.requests)))
    wall = time.perf_counter() - start
    after = httpx.get(f"{url}/health").json()
    server.should_exit = True
    thread.join(30)

    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    figures = {
        "model": lm.name,
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "artefact": args.steer or "synthetic",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "errors": len(errors),
        "median_latency_s": round(statistics.median(latencies), 2),
        "p90_latency_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
        "max_latency_s": round(latencies[-1], 2),
        "wall_s": round(wall, 2),
        "completion_tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
        "alone_latency_s": round(statistics.median(alone), 2),
        "batches": after["batches"] - before["batches"],
        "largest_batch": after["largest_batch"],
        "threads": torch.get_num_threads(),
    }
    for k, v in figures.items():
        print(f"{k:>24}: {v}")
    for e in errors[:3]:
        print("error:", e)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
