"""Batched generation, forward pre-hooks on decoder blocks, and atomic file writes: the helpers every stage shares.

lm = load_model("default")
with steer(lm.model, "runs/default/artefact"):
    print(generate(lm, ["How do I kill a Python process?"]))
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from tqdm import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from els.core.hooks import cache_arg, prefixed_batch, record_last_token
from els.core.models import LoadedModel, chat_texts, user_conversations

# 64 tokens hold the opening where refusals show ("I'm sorry, but...", "As an AI... However, here is"),
# and keep collection affordable on a CPU (about 85 generated tokens/s here).
DEFAULT_MAX_NEW_TOKENS = 64


def length_batches(texts: list[str], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into fixed-size batches of similar length, so padding is small and runs reproduce."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eos_ids(lm: LoadedModel) -> set[int]:
    """End-of-sequence ids: the generation config's (chat models often list several) and the tokenizer's."""
    eos = lm.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


def trim(row: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


class _Force(LogitsProcessor):
    """Make greedy decoding emit given tokens (teacher forcing through `generate`, hooks and cache included)."""

    def __init__(self, targets: torch.Tensor, prompt_len: int):
        self.targets, self.prompt_len = targets, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -float("inf"))
        forced.scatter_(1, self.targets[:, step : step + 1].to(scores.device), 0.0)
        return forced


class _VerdictFixed(StoppingCriteria):
    """Stops a row once its answer, without its newest token, has `chars` characters: a judge that reads only
    that opening (`Judge.horizon`) can no longer change its verdict. The newest token is left out because a
    multi-byte character split over tokens decodes differently once it is complete."""

    def __init__(self, lm: LoadedModel, chars: int, prompt_len: int, rows: int):
        self.tok, self.chars, self.prompt_len = lm.tokenizer, chars, prompt_len
        self.stopped_at: list[int | None] = [None] * rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        done = torch.zeros(len(new), dtype=torch.bool, device=input_ids.device)
        for i, row in enumerate(new.tolist()):
            if self.stopped_at[i] is None:  # a stopped row is not decoded again at every later step
                opening = decode_text(self.tok, row[:-1])
                if len(opening) >= self.chars:
                    self.stopped_at[i] = len(row)
            done[i] = self.stopped_at[i] is not None
        return done


@dataclass
class Generated:
    ids: list[list[int]]  # per row; trimmed after the first end-of-sequence token unless min_new_tokens was set
    texts: list[str]  # the ids decoded, special tokens dropped, stripped
    logits: list[torch.Tensor] | None = None  # with `force`: the raw next-token logits of each step, [B, V]
    activations: torch.Tensor | None = None  # with `record`: each block's input at the last prompt token [B, L, d]


@torch.inference_mode()
def generate_batch(
    lm: LoadedModel,
    texts: list[str],
    max_new_tokens: int,
    *,
    min_new_tokens: int = 0,
    force: list[list[int]] | None = None,
    record: bool = False,
    horizon: int | None = None,
    share_prefix: bool = False,
) -> Generated:
    """Greedy answers to chat-templated texts, in one `model.generate` call.

    `force` emits those ids instead (teacher forcing) and returns each step's logits; `record` also returns
    the residual stream each block received at the last prompt token; `horizon` ends each answer once it
    has that many characters (the opening a judge reads, see `Judge.horizon`), and the batch once all have.
    `share_prefix` runs the token prefix all rows share once (see `PrefixedBatch`): for a model without hooks
    only, since a hook would take that separate call for the prefill."""
    tok = lm.tokenizer
    enc: dict[str, object]
    if share_prefix:
        batch = prefixed_batch(lm, texts, lm.model)
        enc = {"input_ids": batch.input_ids, "attention_mask": batch.mask, cache_arg(lm.model): batch.cache}
    else:
        enc = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.model.device))
    prompt_len = cast(torch.Tensor, enc["input_ids"]).shape[1]
    kwargs: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if force is not None:
        steps = max(len(f) for f in force)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        targets = torch.tensor([f + [pad] * (steps - len(f)) for f in force])
        kwargs.update(
            logits_processor=LogitsProcessorList([_Force(targets, prompt_len)]),
            output_logits=True,
            max_new_tokens=steps,
        )
    else:
        kwargs.update(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None)
    stop = None
    if horizon is not None and force is None:
        stop = _VerdictFixed(lm, horizon, prompt_len, len(texts))
        kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
    with record_last_token(lm.blocks) if record else nullcontext() as captured:
        out = lm.model.generate(**enc, pad_token_id=tok.pad_token_id, return_dict_in_generate=True, **kwargs)
    new = out.sequences[:, prompt_len:].tolist()
    eos = eos_ids(lm)
    if stop is not None:
        new = [row[:n] if n is not None else row for row, n in zip(new, stop.stopped_at)]
    ids = [row if min_new_tokens else trim(row, eos) for row in new]
    return Generated(
        ids,
        [decode(lm, row) for row in ids],
        list(out.logits) if force is not None else None,
        torch.stack(cast(list[torch.Tensor], captured), dim=1) if record else None,
    )  # every block ran


def decode(lm: LoadedModel, ids: list[int]) -> str:
    return decode_text(lm.tokenizer, ids)


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # One sequence decodes to one string; transformers annotates the batched form's list too.
    return cast(str, tokenizer.decode(ids, skip_special_tokens=True)).strip()


def prompt_texts(lm: LoadedModel, prompts: list[str], system: str | None = None) -> tuple[list[str], list[int]]:
    """Single-turn prompts through the chat template, with their lengths in tokens."""
    texts = chat_texts(lm.tokenizer, user_conversations(prompts, system))
    return texts, [len(ids) for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def generate(
    lm: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    system: str | None = None,
    progress: bool = False,
    horizon: int | None = None,
) -> list[str]:
    """Greedy answers to single-turn prompts, batched by length; returned in the prompts' order (`horizon`:
    see `generate_batch`)."""
    texts, lengths = prompt_texts(lm, prompts, system)
    answers: list[str] = [""] * len(prompts)
    for idx in tqdm(length_batches(texts, lengths, batch_size), disable=not progress, desc="generate"):
        for i, a in zip(idx, generate_batch(lm, [texts[i] for i in idx], max_new_tokens, horizon=horizon).texts):
            answers[i] = a
    return answers
