"""What a method costs in answer quality, against the base model on the same prompts: the KL of the next-token
distribution along base's own answers, repeated 4-grams in long answers, and multiple-choice accuracy on a
general-knowledge set (els.data.capability)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from els.core.generation import generate_batch
from els.core.models import LoadedModel, chat_texts, user_conversations
from els.data.capability import LETTERS, Question
from els.eval.methods import Method


def kl_to_base(
    lm: LoadedModel,
    base: Method,
    method: Method,
    prompts: list[str],
    continuations: list[list[int]],
    batch_size: int = 8,
) -> tuple[float, int]:
    """Mean per-token KL(base || method) of the next-token distribution along the base's own greedy
    continuations, teacher-forced through both (each with its own system prompt). Returns (mean, tokens)."""
    total, count = 0.0, 0
    texts = {m.name: chat_texts(lm.tokenizer, user_conversations(prompts, m.system)) for m in (base, method)}
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        force = [continuations[i] for i in idx]
        logp = {}
        for m in (base, method):
            with m.apply(lm.model):
                logits = generate_batch(lm, [texts[m.name][i] for i in idx], 0, force=force).logits
            logp[m.name] = [step.float().log_softmax(-1) for step in logits or []]
        for t, (lb, lq) in enumerate(zip(logp[base.name], logp[method.name])):
            valid = torch.tensor([t < len(f) for f in force], device=lb.device)
            kl = (lb.exp() * (lb - lq)).sum(-1)
            total += float(kl[valid].sum())
            count += int(valid.sum())
    return (total / count if count else float("nan")), count


def repeated_ngram_share(answers: Sequence[Sequence[int]], n: int = 4) -> float:
    """Share of the n-grams of all answers (token ids) that repeat an earlier n-gram of the same answer: 0 for
    text that never loops, towards 1 for "chess, chess, chess ..."."""
    repeats = total = 0
    for ids in answers:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(ids) - n + 1):
            gram = tuple(ids[i : i + n])
            repeats += gram in seen
            seen.add(gram)
            total += 1
    return repeats / total if total else 0.0


def letter_tokens(lm: LoadedModel) -> list[int]:
    """The token of each answer letter; ValueError where the tokenizer has no single token for one."""
    ids = [lm.tokenizer.encode(x, add_special_tokens=False) for x in LETTERS]
    if any(len(t) != 1 for t in ids):
        raise ValueError(
            f"the tokenizer of {lm.name} has no single token for each of {', '.join(LETTERS)}: the "
            "capability check reads their logits (pass --capability-n 0)"
        )
    return [t[0] for t in ids]


@torch.inference_mode()
def mc_accuracy(lm: LoadedModel, method: Method, questions: Sequence[Question], batch_size: int = 8) -> float:
    """Share of questions whose right letter has the highest logit among A-D at the first answer token, with
    the method in effect for the whole prefill (its gate and steering included)."""
    letters = letter_tokens(lm)
    texts = chat_texts(lm.tokenizer, user_conversations([q.prompt() for q in questions], method.system))
    right = 0
    for start in range(0, len(questions), batch_size):
        part = texts[start : start + batch_size]
        with method.apply(lm.model):
            logits = generate_batch(lm, part, 0, force=[[letters[0]]] * len(part)).logits
        assert logits, "a forced token gives one step of logits"
        chosen = logits[0].float()[:, letters].argmax(-1).tolist()
        right += sum(c == q.answer for c, q in zip(chosen, questions[start : start + batch_size]))
    return right / len(questions) if questions else float("nan")
