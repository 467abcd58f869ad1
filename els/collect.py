"""Generate answers, judge them, label the four states and record the residual stream at the last prompt token."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from els.data import Kind, PromptSet
from els.judges import Judge
from els.models import LoadedModel, block_input, chat_texts, config_fingerprint, user_conversations

STATES = ("helpful", "false_refusal", "safe_refusal", "jailbreak")
GOOD_STATES = ("helpful", "safe_refusal")
# 64 tokens hold the opening where refusals show ("I'm sorry, but...", "As an AI... However, here is"),
# and keep collection affordable on a CPU (about 85 generated tokens/s here).
DEFAULT_MAX_NEW_TOKENS = 64


def state_of(kind: Kind, refused: bool) -> str:
    if kind == "benign":
        return "false_refusal" if refused else "helpful"
    return "safe_refusal" if refused else "jailbreak"


def write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@contextmanager
def record_last_token(blocks: torch.nn.ModuleList) -> Iterator[list[torch.Tensor | None]]:
    """Record each block's input at position -1 on its first call (the prefill), in float32 on the CPU."""
    captured: list[torch.Tensor | None] = [None] * len(blocks)

    def make_hook(i: int):
        def hook(module, args, kwargs):
            if captured[i] is None:
                captured[i] = block_input(args, kwargs)[:, -1].float().cpu()

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def length_batches(texts: list[str], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into fixed-size batches of similar length, so padding is small and runs reproduce."""
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def generate_batch(lm: LoadedModel, texts: list[str], max_new_tokens: int, *, record: bool = False,
                   **sampling) -> tuple[list[str], torch.Tensor | None]:
    """Greedy (or sampled) answers for chat-templated texts; with `record`, activations [B, L, d]."""
    tok = lm.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.model.device)
    kwargs = {"do_sample": False, **sampling}
    if not kwargs["do_sample"]:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with record_last_token(lm.blocks) if record else _nothing() as captured:
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    acts = torch.stack(captured, dim=1) if record else None
    return [a.strip() for a in answers], acts


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def generate(lm: LoadedModel, prompts: list[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             batch_size: int = 16, system: str | None = None, progress: bool = False) -> list[str]:
    """Answers to single-turn prompts, batched by length; returned in the prompts' order."""
    texts = chat_texts(lm.tokenizer, user_conversations(prompts, system))
    lengths = [len(ids) for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    answers: list[str] = [""] * len(prompts)
    for idx in tqdm(length_batches(texts, lengths, batch_size), disable=not progress, desc="generate"):
        out, _ = generate_batch(lm, [texts[i] for i in idx], max_new_tokens)
        for i, a in zip(idx, out):
            answers[i] = a
    return answers


@dataclass
class Record:
    prompt: str
    kind: Kind
    source: str
    answer: str
    refused: bool
    state: str


@dataclass
class Collection:
    records: list[Record]
    activations: torch.Tensor  # [N, L, d] float32, rows aligned with records
    meta: dict

    @property
    def states(self) -> list[str]:
        return [r.state for r in self.records]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.state == s for r in self.records) for s in STATES}


def _meta(lm: LoadedModel, sets: list[PromptSet], max_new_tokens: int, batch_size: int, judge: Judge,
          system: str | None) -> dict:
    return {
        "model": lm.name,
        "model_fingerprint": config_fingerprint(lm.model),
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "sets": {ps.name: {"kind": ps.kind, "n": len(ps), "sha256": ps.content_hash()} for ps in sets},
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "judge": judge.name,
        "system": system,
    }


def collect(lm: LoadedModel, sets: list[PromptSet], out: Path, *, judge: Judge,
            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16, system: str | None = None,
            progress: bool = True) -> Collection:
    """Run, judge and record every prompt of `sets` into `out`; resumes an interrupted run batch by batch.

    Each finished batch is written atomically to `out/batches/`, so a crash loses at most the batch in
    flight. When all are done they are merged into `out/states.safetensors` and `out/states.jsonl`.
    """
    out = Path(out)
    for ps in sets:
        if ps.kind is None:
            raise ValueError(f"prompt set {ps.name!r} needs a kind (benign or harmful)")
        if not len(ps):
            raise ValueError(f"prompt set {ps.name!r} is empty")
    meta = _meta(lm, sets, max_new_tokens, batch_size, judge, system)
    meta_path = out / "collect.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise ValueError(
                f"{out} holds a collection made with other settings ({_diff(old, meta)}); use another --out or delete it"
            )
        if (out / "states.jsonl").exists():
            return load_collection(out)
    else:
        write_atomic(meta_path, json.dumps(meta, indent=2))

    items = [(p, ps.kind, ps.name) for ps in sets for p in ps.prompts]
    texts = chat_texts(lm.tokenizer, user_conversations([p for p, _, _ in items], system))
    lengths = [len(ids) for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    batches = length_batches(texts, lengths, batch_size)
    shard_dir = out / "batches"
    for b, idx in enumerate(tqdm(batches, desc="collect", disable=not progress)):
        shard = shard_dir / f"{b:05d}.safetensors"
        if shard.exists():
            continue
        answers, acts = generate_batch(lm, [texts[i] for i in idx], max_new_tokens, record=True)
        refused = judge([items[i][0] for i in idx], answers)
        rows = [
            asdict(Record(items[i][0], items[i][1], items[i][2], a, r, state_of(items[i][1], r)))
            | {"index": i}
            for i, a, r in zip(idx, answers, refused)
        ]
        write_atomic(shard_dir / f"{b:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        # The tensor file is written last: its presence marks the batch as complete.
        _save_atomic({"activations": acts.contiguous()}, shard)

    rows, acts = [], []
    for b in range(len(batches)):
        rows += [json.loads(line) for line in (shard_dir / f"{b:05d}.jsonl").read_text().splitlines()]
        acts.append(load_file(shard_dir / f"{b:05d}.safetensors")["activations"])
    order = sorted(range(len(rows)), key=lambda k: rows[k]["index"])
    activations = torch.cat(acts)[order]
    records = [Record(**{k: v for k, v in rows[k].items() if k != "index"}) for k in order]
    _save_atomic({"activations": activations.contiguous()}, out / "states.safetensors")
    write_atomic(out / "states.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in records))
    shutil.rmtree(shard_dir)
    return Collection(records, activations, meta)


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in new if old.get(k) != new.get(k))


def load_collection(path: Path) -> Collection:
    path = Path(path)
    if not (path / "states.jsonl").exists():
        raise FileNotFoundError(f"{path} holds no finished collection (states.jsonl); run `els collect` first")
    records = [Record(**json.loads(line)) for line in (path / "states.jsonl").read_text().splitlines()]
    activations = load_file(path / "states.safetensors")["activations"]
    if activations.shape[0] != len(records):
        raise ValueError(f"{path}: {activations.shape[0]} activation rows for {len(records)} records")
    return Collection(records, activations, json.loads((path / "collect.json").read_text()))

