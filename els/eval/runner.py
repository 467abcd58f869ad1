"""Generating, caching and judging the answers of several methods on one model (`Runner`), and timing them
(`measure_speed`): the parts of `els eval` that run the model. See els.eval.harness for the cache's layout."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from els.core.executor import Batch, Executor, LocalExecutor
from els.core.generation import generate_batch, length_batches, prompt_texts
from els.core.models import LoadedModel, chat_texts, user_conversations
from els.data.promptset import PromptSet
from els.eval.cache import CompletionFile, cache_key, digest, method_config, model_fingerprint, slug
from els.eval.methods import Method
from els.eval.summary import Speed
from els.judges.model import Judge, ModelJudge

Log = Callable[[str], None]


@dataclass(frozen=True)
class Generation:
    """Greedy decoding settings shared by every method; `key()` is what the cache keys on."""

    max_new_tokens: int = 64
    batch_size: int = 16

    def key(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}


class Runner:
    """Generates, caches and judges the answers of several methods on one model."""

    def __init__(
        self,
        lm: LoadedModel,
        methods: list[Method],
        out: Path,
        generation: Generation,
        progress: bool = True,
        log: Log = print,
        executor: Executor | None = None,
    ):
        self.lm, self.methods, self.out, self.gen = lm, methods, Path(out), generation
        self.progress, self.log = progress, log
        self.executor = executor or LocalExecutor(lm, generate_batch)
        self.model_fp = model_fingerprint(lm)
        if len({slug(m.name) for m in methods}) != len(methods):
            raise ValueError(f"method names must stay distinct as file names: {[m.name for m in methods]}")
        self.method_digest = {m.name: digest(method_config(m)) for m in methods}
        self.generated = 0  # answers generated in this run (the rest came from the cache)

    def path(self, method: Method, set_name: str) -> Path:
        return self.out / "completions" / slug(method.name) / f"{slug(set_name)}.jsonl"

    def keys(self, method: Method, prompts: Sequence[str]) -> list[str]:
        return [cache_key(self.model_fp, self.method_digest[method.name], p, self.gen.key()) for p in prompts]

    def complete_all(self, pairs: Sequence[tuple[Method, PromptSet]]) -> list[tuple[CompletionFile, list[str]]]:
        """Answers of each (method, set) pair, generating only those not cached (rows are `file.rows[key]`),
        their batches handed to the executor together (so every worker stays busy) and each appended to its
        file as it finishes."""
        done: list[tuple[CompletionFile, list[str]]] = []
        batches: list[Batch] = []
        for method, ps in pairs:
            store = CompletionFile(self.path(method, ps.name))
            if store.dropped:
                self.log(f"{store.path}: dropped {store.dropped} torn line(s) of an interrupted run; regenerating them")
            keys = self.keys(method, ps.prompts)
            done.append((store, keys))
            first: dict[str, int] = {}
            for i, k in enumerate(keys):
                if k not in store.rows:
                    first.setdefault(k, i)
            todo = list(first.values())
            if not todo:
                continue
            texts, lengths = prompt_texts(self.lm, [ps.prompts[i] for i in todo], method.system)
            for chunk in length_batches(texts, lengths, self.gen.batch_size):
                batches.append(
                    Batch(
                        [texts[b] for b in chunk],
                        self.gen.max_new_tokens,
                        method=method,
                        tag=(store, keys, ps, [todo[b] for b in chunk], method.name),
                    )
                )
        desc = f"{pairs[0][0].name} {pairs[0][1].name}" if len(pairs) == 1 else "generate"
        bar = tqdm(
            total=sum(len(b.texts) for b in batches), desc=desc, disable=not self.progress or not batches, leave=False
        )
        for batch, out in self.executor.map(batches):
            store, keys, ps, rows_of, method_name = batch.tag
            rows = []
            for i, row_ids, answer in zip(rows_of, out.ids, out.texts):
                rows.append(
                    {
                        "key": keys[i],
                        "set": ps.name,
                        "method": method_name,
                        "prompt": ps.prompts[i],
                        "category": ps.categories[i] if ps.categories else None,
                        "answer": answer,
                        "tokens": row_ids,
                        "n_tokens": len(row_ids),
                        "batch_size": len(rows_of),
                        "verdicts": {},
                    }
                )
            store.append(rows)
            self.generated += len(rows)
            bar.update(len(rows))
        bar.close()
        return done

    def judge(self, store: CompletionFile, keys: Sequence[str], judges: Sequence[Judge], chunk: int = 64) -> None:
        """Add each judge's verdict to rows that lack it (or hold one from another version of the judge)."""
        for judge in judges:
            version = getattr(judge, "version", "")
            todo = [
                k
                for k in dict.fromkeys(keys)
                if store.rows[k]["verdicts"].get(judge.name, {}).get("version", "") != version
                or judge.name not in store.rows[k]["verdicts"]
            ]
            for start in range(0, len(todo), chunk):
                part = [store.rows[k] for k in todo[start : start + chunk]]
                prompts, answers = [r["prompt"] for r in part], [r["answer"] for r in part]
                if isinstance(judge, ModelJudge):
                    verdicts = [
                        {"refused": v.refused, "label": v.label, "fallback": v.fallback, "raw": v.raw}
                        for v in judge.classify(prompts, answers)
                    ]
                elif callable(probabilities := getattr(judge, "probabilities", None)):
                    verdicts = [{"refused": p > 0.5, "p": round(p, 4)} for p in probabilities(answers)]
                else:
                    verdicts = [{"refused": bool(r)} for r in judge(prompts, answers)]
                for row, v in zip(part, verdicts):
                    row["verdicts"][judge.name] = {**v, "version": version} if version else v
                store.rewrite()


@torch.inference_mode()
def measure_speed(
    lm: LoadedModel,
    methods: list[Method],
    prompts: list[str],
    batch_sizes: list[int],
    max_new_tokens: int,
    rounds: int = 2,
) -> dict[str, list[Speed]]:
    """Generated tokens per second of each method on the same prompts, every row forced to `max_new_tokens`
    (end-of-sequence suppressed), so all methods do the same work. Only `generate` is timed, not attaching
    the method's hooks.

    Per batch size every method is first warmed up at that size, then timed in `rounds` rounds whose order
    alternates (base, m1, ..., then ..., m1, base), so drift in the machine's speed falls on all alike."""
    texts = {m.name: chat_texts(lm.tokenizer, user_conversations(prompts, m.system)) for m in methods}
    out: dict[str, list[Speed]] = {m.name: [] for m in methods}
    for b in batch_sizes:
        tokens = {m.name: 0 for m in methods}
        seconds = {m.name: 0.0 for m in methods}
        for m in methods:
            with m.apply(lm.model):
                generate_batch(lm, texts[m.name][:b], 2, min_new_tokens=2)  # one-off costs of this shape
        for r in range(rounds):
            for m in methods if r % 2 == 0 else methods[::-1]:
                for start in range(0, len(prompts), b):
                    with m.apply(lm.model):  # attached once per call, as a server would; not timed
                        t0 = time.perf_counter()
                        ids = generate_batch(
                            lm, texts[m.name][start : start + b], max_new_tokens, min_new_tokens=max_new_tokens
                        ).ids
                        seconds[m.name] += time.perf_counter() - t0
                    tokens[m.name] += sum(len(row) for row in ids)
        base_rate = tokens[methods[0].name] / seconds[methods[0].name]
        for m in methods:
            per_s = tokens[m.name] / seconds[m.name]
            out[m.name].append(
                Speed(
                    batch=b,
                    tokens=tokens[m.name],
                    seconds=round(seconds[m.name], 3),
                    tokens_per_s=per_s,
                    rounds=rounds,
                    ratio_to_base=per_s / base_rate,
                )
            )
    return out
