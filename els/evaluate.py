"""Evaluation harness: the base model and each method on the same prompts, greedy, in one run.

    els eval --model default --steer runs/default/artefact --benchmarks xstest-safe,jbb --limit 40 --out runs/eval

Every answer is cached in OUT/completions/METHOD/BENCHMARK.jsonl under a key of (model fingerprint, method
config, prompt, generation settings), one line per answer, appended and fsynced batch by batch: a rerun
generates nothing it already has, and an interrupted run loses at most the batch in flight. Judge verdicts
are added to the same lines once a file's answers exist, so a failing judge never costs an answer.
The metrics go to OUT/summary.json; `els.report` writes report.md and the plots from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from els.collect import length_batches, write_atomic
from els.data import PromptSet, load_prompts
from els.judges import Judge, ModelJudge, get_judge
from els.models import LoadedModel, chat_texts, config_fingerprint, user_conversations
from els.steering import Artefact, Base, Els, Method

Z95 = 1.959963984540054
KINDS = ("benign", "harmful")
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(truth: Sequence[bool], pred: Sequence[bool]) -> float:
    """Cohen's kappa of two binary raters; 1.0 when both are constant and agree, 0.0 when chance explains all."""
    n = len(truth)
    if n == 0 or n != len(pred):
        raise ValueError(f"kappa needs two equally long, non-empty label lists (got {n} and {len(pred)})")
    po = sum(t == p for t, p in zip(truth, pred)) / n
    pt, pp = sum(truth) / n, sum(pred) / n
    pe = pt * pp + (1 - pt) * (1 - pp)
    if pe == 1:
        return 1.0 if po == 1 else 0.0
    return (po - pe) / (1 - pe)


def agreement(truth: Sequence[bool], pred: Sequence[bool]) -> dict:
    """Accuracy, kappa, and precision / recall of refusal (None where undefined) against human labels."""
    tp = sum(t and p for t, p in zip(truth, pred))
    return {
        "n": len(truth),
        "accuracy": sum(t == p for t, p in zip(truth, pred)) / len(truth),
        "kappa": cohen_kappa(truth, pred),
        "precision": tp / sum(pred) if sum(pred) else None,
        "recall": tp / sum(truth) if sum(truth) else None,
    }


def rate(flags: Sequence[bool]) -> dict:
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return {"refusal_rate": k / n if n else float("nan"), "ci95": [lo, hi], "n": n, "refusals": k}


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks and methods


def load_benchmark(spec: str, limit: int | None = None, seed: int = 0) -> PromptSet:
    """A known set (`xstest-safe`, `orbench-hard@test`) or a file with its kind (`my.csv:prompt=benign`);
    a `~N` suffix (`orbench-hard~200`) samples N prompts of this set whatever `limit` says."""
    spec, _, own_limit = spec.partition("~")
    if own_limit:
        if not own_limit.isdigit():
            raise ValueError(f"benchmark {spec}~{own_limit}: the sample size after '~' must be a whole number")
        limit = int(own_limit)
    body, kind = spec, None
    if "=" in spec:
        body, _, kind = spec.rpartition("=")
        if kind not in KINDS:
            raise ValueError(f"benchmark {spec!r}: the kind after '=' must be benign or harmful, not {kind!r}")
    ps = load_prompts(body)
    if kind is not None:
        ps = ps.with_kind(kind)  # type: ignore[arg-type]
    elif ps.kind is None:
        raise ValueError(f"benchmark {spec!r} is a file: say its kind, e.g. {spec}=benign or {spec}=harmful")
    if not len(ps):
        raise ValueError(f"benchmark {spec!r} has no prompts")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        ps = ps.sample(limit, seed)
    return ps


def slug(name: str) -> str:
    """A file-name-safe form of a set or method name; names with a path get a short hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._@=-]+", "_", name.rsplit("/", 1)[-1]).strip("._") or "set"
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass
class MethodContext:
    """What a method factory may use; resolved before the model is loaded."""

    artefact: Artefact | None = None
    states: Path | None = None  # a collection directory (`els collect`), for methods fitted on it
    els_settings: dict = field(default_factory=dict)


MethodFactory = Callable[[MethodContext], Method]
_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory) -> None:
    """Make `name` usable in `els eval --methods`."""
    _METHODS[name] = factory


def _els(ctx: MethodContext) -> Method:
    if ctx.artefact is None:
        raise ValueError("method 'els' needs an artefact: pass --steer DIR")
    return Els(ctx.artefact, dict(ctx.els_settings))


register_method("base", lambda ctx: Base())
register_method("els", _els)


def _plugin_methods(ctx: MethodContext) -> dict[str, Method] | None:
    """Baselines of els.baselines (`fit_baselines(collection) -> {name: Method}`), fitted on `ctx.states`;
    None when they cannot be had (no such module, or no collection to fit them on)."""
    if find_spec("els.baselines") is None:
        return None
    from els import baselines  # noqa: PLC0415  (written separately; imported only when asked for)

    fit = getattr(baselines, "fit_baselines", None)
    if fit is None or ctx.states is None:
        return None
    from els.collect import load_collection

    return dict(fit(load_collection(ctx.states)))


def resolve_methods(names: Sequence[str], ctx: MethodContext) -> list[Method]:
    """Methods by name, `base` first (always run: quality and speed are measured against it)."""
    wanted = ["base", *dict.fromkeys(n.strip() for n in names if n.strip() and n.strip() != "base")]
    plugins: dict[str, Method] | None = None
    tried = False
    methods: list[Method] = []
    for name in wanted:
        if name in _METHODS:
            methods.append(_METHODS[name](ctx))
            continue
        if not tried:
            plugins, tried = _plugin_methods(ctx), True
        if plugins is None or name not in plugins:
            known = ", ".join([*_METHODS, *(plugins or {})])
            hint = ""
            if plugins is None and find_spec("els.baselines") is not None:
                hint = " (the baselines of els.baselines are fitted on collected states: pass --states DIR)"
            raise ValueError(f"unknown method {name!r}; available: {known}{hint}")
        methods.append(plugins[name])
    if len({slug(m.name) for m in methods}) != len(methods):
        raise ValueError(f"method names must be distinct: {[m.name for m in methods]}")
    return methods


# ---------------------------------------------------------------------------------------------------------------
# Cache keys


def model_fingerprint(lm: LoadedModel) -> str:
    """Architecture, dtype, chat template and a strided sample of every weight: cheap, and a fine-tune differs."""
    h = hashlib.sha256(config_fingerprint(lm.model).encode())
    h.update(str(lm.model.dtype).encode())
    h.update((lm.tokenizer.chat_template or "").encode())
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def artefact_digest(art: Artefact) -> str:
    h = hashlib.sha256(json.dumps(art.manifest, sort_keys=True).encode())
    for name, t in sorted(art.energy.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(v: object) -> object:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return hashlib.sha256(v.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    if isinstance(v, Artefact):
        return artefact_digest(v)
    return repr(v)


def method_config(method: Method) -> dict:
    """What decides a method's answers. A method may define `config() -> dict`; dataclasses are read field by field."""
    custom = getattr(method, "config", None)
    if callable(custom):
        body = _jsonable(custom())
    elif is_dataclass(method):
        body = {f.name: _jsonable(getattr(method, f.name)) for f in fields(method)}
    else:
        body = {}
    return {"type": type(method).__qualname__, "name": method.name, "system": method.system, "config": body}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cache_key(model_fp: str, method_cfg_digest: str, prompt: str, generation: dict) -> str:
    return _digest([model_fp, method_cfg_digest, prompt, generation])[:24]


# ---------------------------------------------------------------------------------------------------------------
# Completion files


class CompletionFile:
    """JSONL rows keyed by cache key. Appends are flushed and fsynced; a torn last line is dropped on load."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        self.dropped = 0
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            for line in lines:
                try:
                    row = json.loads(line)
                    self.rows[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.dropped += 1  # the batch being written when a run died
            if self.dropped or (lines and not path.read_bytes().endswith(b"\n")):
                self.rewrite()

    def append(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[r["key"]] = r

    def rewrite(self) -> None:
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))


# ---------------------------------------------------------------------------------------------------------------
# Generation


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


def _trim(row: list[int], eos: set[int]) -> list[int]:
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


@torch.inference_mode()
def generate_ids(lm: LoadedModel, texts: list[str], max_new_tokens: int, *, min_new_tokens: int = 0,
                 force: list[list[int]] | None = None) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """Greedy answers as token ids (trimmed after end-of-sequence); with `force`, emit those ids instead and
    return the raw next-token logits of each step ([B, V] per step)."""
    tok = lm.tokenizer
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.model.device)
    kwargs: dict = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if force is not None:
        steps = max(len(f) for f in force)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        targets = torch.tensor([f + [pad] * (steps - len(f)) for f in force])
        kwargs.update(logits_processor=LogitsProcessorList([_Force(targets, enc["input_ids"].shape[1])]),
                      output_logits=True, max_new_tokens=steps)
    else:
        kwargs.update(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None)
    out = lm.model.generate(**enc, pad_token_id=tok.pad_token_id, return_dict_in_generate=True, **kwargs)
    new = out.sequences[:, enc["input_ids"].shape[1] :].tolist()
    eos = _eos_ids(lm)
    ids = [row if min_new_tokens else _trim(row, eos) for row in new]
    return ids, (list(out.logits) if force is not None else None)


def decode(lm: LoadedModel, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass(frozen=True)
class Generation:
    """Greedy decoding settings shared by every method; `key()` is what the cache keys on."""

    max_new_tokens: int = 64
    batch_size: int = 16

    def key(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}


class Runner:
    """Generates, caches and judges the answers of several methods on one model."""

    def __init__(self, lm: LoadedModel, methods: list[Method], out: Path, generation: Generation,
                 progress: bool = True, log: Log = print):
        self.lm, self.methods, self.out, self.gen = lm, methods, Path(out), generation
        self.progress, self.log = progress, log
        self.model_fp = model_fingerprint(lm)
        self.method_digest = {m.name: _digest(method_config(m)) for m in methods}
        self.generated = 0  # answers generated in this run (the rest came from the cache)

    def path(self, method: Method, set_name: str) -> Path:
        return self.out / "completions" / slug(method.name) / f"{slug(set_name)}.jsonl"

    def keys(self, method: Method, prompts: Sequence[str]) -> list[str]:
        return [cache_key(self.model_fp, self.method_digest[method.name], p, self.gen.key()) for p in prompts]

    def complete(self, method: Method, ps: PromptSet) -> tuple[CompletionFile, list[str]]:
        """Answers of `method` to every prompt of `ps`, generating only those not cached; returns the file and
        the prompts' keys (rows are `file.rows[key]`)."""
        store = CompletionFile(self.path(method, ps.name))
        if store.dropped:
            self.log(f"{store.path}: dropped {store.dropped} torn line(s) of an interrupted run; regenerating them")
        keys = self.keys(method, ps.prompts)
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in store.rows:
                first.setdefault(k, i)
        todo = list(first.values())
        if not todo:
            return store, keys
        texts = chat_texts(self.lm.tokenizer, user_conversations([ps.prompts[i] for i in todo], method.system))
        lengths = [len(x) for x in self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        batches = length_batches(texts, lengths, self.gen.batch_size)
        bar = tqdm(total=len(todo), desc=f"{method.name} {ps.name}", disable=not self.progress, leave=False)
        for batch in batches:
            # A fresh context per generate call: a method may keep per-call state (Steering's per-row stats).
            with method.apply(self.lm.model):
                ids, _ = generate_ids(self.lm, [texts[b] for b in batch], self.gen.max_new_tokens)
            rows = []
            for b, row_ids in zip(batch, ids):
                i = todo[b]
                rows.append({"key": keys[i], "set": ps.name, "method": method.name, "prompt": ps.prompts[i],
                             "category": ps.categories[i] if ps.categories else None,
                             "answer": decode(self.lm, row_ids), "tokens": row_ids, "n_tokens": len(row_ids),
                             "batch_size": len(batch), "verdicts": {}})
            store.append(rows)
            self.generated += len(rows)
            bar.update(len(rows))
        bar.close()
        return store, keys

    def judge(self, store: CompletionFile, keys: Sequence[str], judges: Sequence[Judge], chunk: int = 64) -> None:
        """Add each judge's verdict to rows that lack it (or hold one from another version of the judge)."""
        for judge in judges:
            version = getattr(judge, "version", "")
            todo = [k for k in dict.fromkeys(keys)
                    if store.rows[k]["verdicts"].get(judge.name, {}).get("version", "") != version
                    or judge.name not in store.rows[k]["verdicts"]]
            for start in range(0, len(todo), chunk):
                part = [store.rows[k] for k in todo[start : start + chunk]]
                prompts, answers = [r["prompt"] for r in part], [r["answer"] for r in part]
                if isinstance(judge, ModelJudge):
                    verdicts = [{"refused": v.refused, "label": v.label, "fallback": v.fallback, "raw": v.raw}
                                for v in judge.classify(prompts, answers)]
                elif callable(getattr(judge, "probabilities", None)):
                    verdicts = [{"refused": p > 0.5, "p": round(p, 4)} for p in judge.probabilities(answers)]
                else:
                    verdicts = [{"refused": bool(r)} for r in judge(prompts, answers)]
                for row, v in zip(part, verdicts):
                    row["verdicts"][judge.name] = {**v, "version": version} if version else v
                store.rewrite()


# ---------------------------------------------------------------------------------------------------------------
# Quality and speed


@torch.inference_mode()
def kl_to_base(lm: LoadedModel, base: Method, method: Method, prompts: list[str], continuations: list[list[int]],
               batch_size: int = 8) -> tuple[float, int]:
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
                _, logits = generate_ids(lm, [texts[m.name][i] for i in idx], 0, force=force)
            logp[m.name] = [step.float().log_softmax(-1) for step in logits or []]
        for t, (lb, lq) in enumerate(zip(logp[base.name], logp[method.name])):
            valid = torch.tensor([t < len(f) for f in force], device=lb.device)
            kl = (lb.exp() * (lb - lq)).sum(-1)
            total += float(kl[valid].sum())
            count += int(valid.sum())
    return (total / count if count else float("nan")), count


def measure_speed(lm: LoadedModel, methods: list[Method], prompts: list[str], batch_sizes: list[int],
                  max_new_tokens: int, rounds: int = 2) -> dict[str, list[dict]]:
    """Generated tokens per second of each method on the same prompts, every row forced to `max_new_tokens`
    (end-of-sequence suppressed), so all methods do the same work. Only `generate` is timed, not attaching
    the method's hooks.

    Per batch size every method is first warmed up at that size, then timed in `rounds` rounds whose order
    alternates (base, m1, ..., then ..., m1, base), so drift in the machine's speed falls on all alike."""
    texts = {m.name: chat_texts(lm.tokenizer, user_conversations(prompts, m.system)) for m in methods}
    out: dict[str, list[dict]] = {m.name: [] for m in methods}
    for b in batch_sizes:
        spent = {m.name: [0, 0.0] for m in methods}
        for m in methods:
            with m.apply(lm.model):
                generate_ids(lm, texts[m.name][:b], 2, min_new_tokens=2)  # one-off costs of this shape
        for r in range(rounds):
            for m in methods if r % 2 == 0 else methods[::-1]:
                for start in range(0, len(prompts), b):
                    with m.apply(lm.model):  # attached once per call, as a server would; not timed
                        t0 = time.perf_counter()
                        ids, _ = generate_ids(lm, texts[m.name][start : start + b], max_new_tokens,
                                              min_new_tokens=max_new_tokens)
                        spent[m.name][1] += time.perf_counter() - t0
                    spent[m.name][0] += sum(len(row) for row in ids)
        for m in methods:
            tokens, seconds = spent[m.name]
            out[m.name].append({"batch": b, "tokens": tokens, "seconds": round(seconds, 3),
                                "tokens_per_s": tokens / seconds, "rounds": rounds})
    base = {e["batch"]: e["tokens_per_s"] for e in out[methods[0].name]}
    for entries in out.values():
        for e in entries:
            e["ratio_to_base"] = e["tokens_per_s"] / base[e["batch"]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation


@dataclass
class EvalConfig:
    generation: Generation = field(default_factory=Generation)
    judges: list[str] = field(default_factory=lambda: ["learned"])  # the first one is the headline judge
    limit: int | None = None
    seed: int = 0
    quality_set: str = "alpaca"
    quality_n: int = 32  # 0: skip the quality measures
    speed_n: int = 8  # 0: skip the speed measure
    speed_batch: int | None = None  # the larger batch; default the generation batch size


def _verdicts(store: CompletionFile, keys: Sequence[str], judge: str) -> list[bool]:
    return [bool(store.rows[k]["verdicts"][judge]["refused"]) for k in keys]


def evaluate(lm: LoadedModel, methods: list[Method], sets: list[PromptSet], out: Path, cfg: EvalConfig,
             judges: list[Judge] | None = None, progress: bool = True, log: Log = print) -> dict:
    """Run every method on every set, judge, measure quality and speed; return the summary (also written to
    OUT/summary.json). `judges` default to `get_judge` of `cfg.judges`, sharing `lm` where it is the judge model."""
    out = Path(out)
    t_start = time.perf_counter()
    judges = judges or [get_judge(name, lm) for name in cfg.judges]
    headline = judges[0].name
    runner = Runner(lm, methods, out, cfg.generation, progress, log)
    timings: dict[str, float] = {}
    benchmarks: dict[str, dict] = {}
    stores: dict[tuple[str, str], tuple[CompletionFile, list[str]]] = {}

    t = time.perf_counter()
    for ps in sets:
        for m in methods:
            stores[m.name, ps.name] = runner.complete(m, ps)
    timings["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for (m_name, ps_name), (store, keys) in stores.items():
        log(f"judging {m_name} on {ps_name}") if progress else None
        runner.judge(store, keys, judges)
    timings["judge_s"] = time.perf_counter() - t

    for ps in sets:
        entry: dict = {"kind": ps.kind, "n": len(ps), "methods": {}}
        for m in methods:
            store, keys = stores[m.name, ps.name]
            refused = _verdicts(store, keys, headline)
            res = rate(refused)
            if ps.kind == "benign":
                res["compliance"] = 1 - res["refusal_rate"]
            if ps.categories:
                res["categories"] = {c: rate([r for r, rc in zip(refused, ps.categories) if rc == c])
                                     for c in sorted(set(ps.categories))}
            model_judged = [store.rows[k]["verdicts"][headline] for k in keys]
            if any("fallback" in v for v in model_judged):
                res["judge_fallbacks"] = sum(bool(v.get("fallback")) for v in model_judged)
            res["other_judges"] = {j.name: sum(_verdicts(store, keys, j.name)) / len(keys) for j in judges[1:]}
            res["mean_tokens"] = sum(store.rows[k]["n_tokens"] for k in keys) / len(keys)
            entry["methods"][m.name] = res
        benchmarks[ps.name] = entry

    overall = {kind: {m.name: rate([r for ps in sets if ps.kind == kind
                                    for r in _verdicts(*stores[m.name, ps.name], headline)]) for m in methods}
               for kind in KINDS if any(ps.kind == kind for ps in sets)}

    t = time.perf_counter()
    quality = _quality(lm, methods, runner, stores, sets, headline, cfg, out, log)
    timings["quality_s"] = time.perf_counter() - t
    t = time.perf_counter()
    speed: dict = {}
    if cfg.speed_n > 0:
        sp = load_benchmark(cfg.quality_set, cfg.speed_n, cfg.seed + 1).prompts
        sizes = sorted({1, min(cfg.speed_batch or cfg.generation.batch_size, len(sp))})
        log(f"timing {len(sp)} prompts at batch {' and '.join(map(str, sizes))}") if progress else None
        speed = measure_speed(lm, methods, sp, sizes, cfg.generation.max_new_tokens)
    timings["speed_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    summary = {
        "model": lm.name,
        "model_fingerprint": runner.model_fp,
        "judge": headline,
        "judges": [{"name": j.name, "version": getattr(j, "version", "")} for j in judges],
        "generation": {**cfg.generation.key(), "batch_size": cfg.generation.batch_size, "greedy": True,
                       "dtype": str(lm.model.dtype).removeprefix("torch."), "device": str(lm.model.device),
                       "limit": cfg.limit, "seed": cfg.seed},
        "methods": {m.name: method_config(m) for m in methods},
        "benchmarks": benchmarks,
        "overall": overall,
        "quality": quality,
        "speed": speed,
        "run": {"generated": runner.generated, "timings_s": {k: round(v, 1) for k, v in timings.items()}},
        "examples": _examples(methods, sets, stores, headline),
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _quality(lm: LoadedModel, methods: list[Method], runner: Runner, stores: dict, sets: list[PromptSet],
             headline: str, cfg: EvalConfig, out: Path, log: Log) -> dict:
    """Per method: KL to base and the share of answers unchanged from base on harmless prompts (`alpaca`
    sample), plus the unchanged share on benign benchmark prompts that base answered."""
    base = methods[0]
    quality: dict = {}
    qs = load_benchmark(cfg.quality_set, cfg.quality_n, cfg.seed) if cfg.quality_n > 0 else None
    qstores = {m.name: runner.complete(m, qs) for m in methods} if qs is not None else {}
    cache_path = out / "quality_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for m in methods:
        entry: dict = {}
        if qs is not None:
            (bstore, bkeys), (mstore, mkeys) = qstores[base.name], qstores[m.name]
            base_rows, m_rows = [bstore.rows[k] for k in bkeys], [mstore.rows[k] for k in mkeys]
            entry["unchanged_share"] = sum(a["answer"] == b["answer"] for a, b in zip(base_rows, m_rows)) / len(qs)
            entry["quality_set"], entry["quality_n"] = qs.name, len(qs)
            key = _digest([runner.model_fp, runner.method_digest[base.name], runner.method_digest[m.name],
                           cfg.generation.key(), bkeys])
            if m is base:
                entry["kl_mean"], entry["kl_tokens"] = 0.0, sum(len(r["tokens"]) for r in base_rows)
            elif cache.get(m.name, {}).get("key") == key:
                entry["kl_mean"], entry["kl_tokens"] = cache[m.name]["kl_mean"], cache[m.name]["kl_tokens"]
            else:
                log(f"KL of {m.name} to base on {len(qs)} {qs.name} prompts")
                kl, n = kl_to_base(lm, base, m, qs.prompts, [r["tokens"] for r in base_rows])
                entry["kl_mean"], entry["kl_tokens"] = kl, n
                cache[m.name] = {"key": key, "kl_mean": kl, "kl_tokens": n}
                write_atomic(cache_path, json.dumps(cache, indent=2))
        same, n = 0, 0
        for ps in sets:
            if ps.kind != "benign":
                continue
            (bstore, bkeys), (mstore, mkeys) = stores[base.name, ps.name], stores[m.name, ps.name]
            for bk, mk in zip(bkeys, mkeys):
                if not bstore.rows[bk]["verdicts"][headline]["refused"]:
                    n += 1
                    same += bstore.rows[bk]["answer"] == mstore.rows[mk]["answer"]
        entry["unchanged_share_benign_answered"] = same / n if n else None
        entry["benign_answered_n"] = n
        quality[m.name] = entry
    return quality


def _examples(methods: list[Method], sets: list[PromptSet], stores: dict, headline: str, per_kind: int = 3) -> dict:
    """A few prompts per set kind where a method's verdict differs from base's, for the report."""
    base = methods[0]
    out: dict = {}
    for m in methods[1:]:
        found: dict[str, list[dict]] = {k: [] for k in KINDS}
        for ps in sets:
            (bstore, bkeys), (mstore, mkeys) = stores[base.name, ps.name], stores[m.name, ps.name]
            for bk, mk in zip(bkeys, mkeys):
                b, r = bstore.rows[bk], mstore.rows[mk]
                if b["verdicts"][headline]["refused"] != r["verdicts"][headline]["refused"] \
                        and len(found[ps.kind]) < per_kind:
                    found[ps.kind].append({"set": ps.name, "prompt": b["prompt"], base.name: b["answer"],
                                           m.name: r["answer"], "base_refused": b["verdicts"][headline]["refused"]})
        out[m.name] = found
    return out


# ---------------------------------------------------------------------------------------------------------------
# Judge agreement with human labels


def default_labelled_files() -> list[Path]:
    from els.data import data_dir

    files = sorted((data_dir() / "xstest" / "labelled_completions").glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no labelled completions in {data_dir() / 'xstest' / 'labelled_completions'}")
    return files


def judge_check(files: Sequence[Path], judges: Sequence[str], *, model_judge_limit: int | None = None,
                seed: int = 0, log: Log = print) -> list[dict]:
    """Agreement of each judge with the human labels, per file and pooled ("all").

    The learned judge is scored only on answers it did not learn from: for a file among its training files it
    is retrained on the other training files (leave one file out). The model judge, slow on a CPU, is scored on
    a seeded sample of `model_judge_limit` answers per file when that is set.
    """
    from els.judges import LearnedJudge, preload_embeddings, read_labelled, train_learned_judge

    sets = [read_labelled(f) for f in files]
    if "learned" in judges:
        preload_embeddings(sets)  # embeds each file once (cached on disk), not once per left-out fold
    results: list[dict] = []
    for name in judges:
        judge = get_judge(name)
        truth_all: list[bool] = []
        pred_all: list[bool] = []
        for s in sets:
            idx = list(range(len(s.answers)))
            note = ""
            scored = judge
            if isinstance(judge, ModelJudge) and model_judge_limit and model_judge_limit < len(idx):
                idx = sorted(random.Random(seed).sample(idx, model_judge_limit))
                note = f"seeded sample of {model_judge_limit}"
            if isinstance(judge, LearnedJudge) and s.sha256 in judge.trained_on:
                others = [read_labelled(f) for f in _training_files(judge, exclude=s.sha256)]
                scored = train_learned_judge(others, l2=judge.meta.get("l2", 1e-3))
                note = "left out: retrained on " + ", ".join(o.name for o in others)
            t = time.perf_counter()
            pred = scored([s.prompts[i] for i in idx], [s.answers[i] for i in idx])
            truth = [s.refused[i] for i in idx]
            row = {"judge": judge.name, "file": s.name, **agreement(truth, pred), "note": note,
                   "seconds": round(time.perf_counter() - t, 1)}
            if isinstance(judge, ModelJudge):
                row["fallbacks"] = judge.fallbacks
                judge.fallbacks = 0
            log(f"{judge.name} on {s.name}: accuracy {row['accuracy']:.3f}, kappa {row['kappa']:.3f}")
            results.append(row)
            truth_all += truth
            pred_all += pred
        results.append({"judge": judge.name, "file": "all", **agreement(truth_all, pred_all), "note": "pooled",
                        "seconds": round(sum(r["seconds"] for r in results if r["judge"] == judge.name), 1)})
    return results


def _training_files(judge: object, exclude: str) -> list[Path]:
    trained = {f["sha256"]: f["file"] for f in judge.meta.get("trained_on", [])}  # type: ignore[attr-defined]
    found = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in default_labelled_files()}
    missing = [name for sha, name in trained.items() if sha != exclude and sha not in found]
    if missing:
        raise FileNotFoundError(f"leave-one-out needs the learned judge's other training files: {', '.join(missing)}")
    return [found[sha] for sha in trained if sha != exclude]


def judge_table(results: list[dict]) -> str:
    """The agreement table in Markdown."""
    def f(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    lines = ["| judge | file | n | accuracy | kappa | refusal precision | refusal recall | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        bold = "**" if r["file"] == "all" else ""
        note = r["note"] + (f"; {r['fallbacks']} unparseable → prefix" if r.get("fallbacks") else "")
        lines.append(f"| {r['judge']} | {bold}{r['file']}{bold} | {r['n']} | {bold}{f(r['accuracy'])}{bold} | "
                     f"{f(r['kappa'])} | {f(r['precision'])} | {f(r['recall'])} | {note} |")
    return "\n".join(lines)
