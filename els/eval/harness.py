"""Evaluation harness: the base model and each method on the same prompts, greedy, in one run.

    els eval --model default --steer runs/default/artefact --benchmarks xstest-safe,jbb --limit 40 --out runs/eval

Every answer is cached in OUT/completions/METHOD/BENCHMARK.jsonl under a key of (model fingerprint, method
config, prompt, generation settings), one line per answer, appended and fsynced batch by batch: a rerun
generates nothing it already has, and an interrupted run loses at most the batch in flight. Judge verdicts
are added to the same lines once a file's answers exist, so a failing judge never costs an answer.
The metrics go to OUT/summary.json (`els.eval.summary.Summary`); `els.eval.report` writes report.md and the
plots from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from els.core.executor import Executor
from els.core.io import read_json_object, write_atomic
from els.core.models import LoadedModel
from els.data.capability import load_mmlu
from els.data.prompts import load_benchmark
from els.data.promptset import KINDS, Kind, PromptSet
from els.eval.baselines import register_baselines
from els.eval.cache import CompletionFile, digest, method_config
from els.eval.comparison import gate_probabilities, gated_verdicts, mcnemar, rate
from els.eval.methods import COMPOSED, Method
from els.eval.quality import kl_to_base, mc_accuracy, repeated_ngram_share
from els.eval.runner import Generation, Log, Runner, measure_speed
from els.eval.summary import (
    Benchmark,
    Capability,
    EvalTimings,
    Example,
    GenerationInfo,
    JudgeId,
    MethodRate,
    Overall,
    PairedRate,
    Quality,
    RunInfo,
    Speed,
    Summary,
)
from els.judges.model import Judge, get_judge
from els.steering.gate import HarmGate

# The harness evaluates whatever methods `els eval --methods` names, the fitted baselines among them.
register_baselines()


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
    quality_tokens: int = 128  # long enough for an answer to start repeating itself
    capability_n: int = 0  # MMLU questions for multiple-choice accuracy (0: skip)
    speed_n: int = 8  # 0: skip the speed measure
    speed_batch: int | None = None  # the larger batch; default the generation batch size


def _kind(ps: PromptSet) -> Kind:
    if ps.kind is None:
        raise ValueError(f"prompt set {ps.name!r} needs a kind (benign or harmful) to be evaluated")
    return ps.kind


def _verdicts(store: CompletionFile, keys: Sequence[str], judge: str) -> list[bool]:
    return [bool(store.rows[k]["verdicts"][judge]["refused"]) for k in keys]


def evaluate(
    lm: LoadedModel,
    methods: list[Method],
    sets: list[PromptSet],
    out: Path,
    cfg: EvalConfig,
    judges: list[Judge] | None = None,
    progress: bool = True,
    log: Log = print,
    executor: Executor | None = None,
    gate: tuple[HarmGate, float] | None = None,
    kl_gated: bool = True,
) -> Summary:
    """Run every method on every set, judge, measure quality and speed; return the summary (also written to
    OUT/summary.json). `judges` default to `get_judge` of `cfg.judges`, sharing `lm` where it is the judge model.
    `executor` generates the answers (default: here; `els.parallel.ray_executor.RayExecutor`: on Ray workers);
    judging, KL and speed run here on `lm`. With `gate` (a harm gate and its threshold), each method of
    `COMPOSED` whose two parts are among the methods is reported too (els.eval.comparison), and KL to base is
    measured on the harmless prompts it passes (`kl_gated`: ELS runs behind that gate; else on all of them);
    every method gets exact McNemar tests against base per set and pooled (`paired`)."""
    out = Path(out)
    t_start = time.perf_counter()
    judges = judges or [get_judge(name, lm) for name in cfg.judges]
    headline = judges[0].name
    runner = Runner(lm, methods, out, cfg.generation, progress, log, executor)
    timings: dict[str, float] = {}
    benchmarks: dict[str, Benchmark] = {}
    stores: dict[tuple[str, str], tuple[CompletionFile, list[str]]] = {}

    t = time.perf_counter()
    pairs = [(m, ps) for ps in sets for m in methods]
    for (m, ps), done in zip(pairs, runner.complete_all(pairs)):
        stores[m.name, ps.name] = done
    timings["generate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for (m_name, ps_name), (store, keys) in stores.items():
        log(f"judging {m_name} on {ps_name}") if progress else None
        runner.judge(store, keys, judges)
    timings["judge_s"] = time.perf_counter() - t

    verdicts = {(m.name, ps.name): _verdicts(*stores[m.name, ps.name], headline) for ps in sets for m in methods}
    names = [m.name for m in methods]
    composed = {name: pair for name, pair in COMPOSED.items() if gate is not None and set(pair) <= set(names)}
    for ps in sets if composed else []:
        assert gate is not None
        p = gate_probabilities(lm, gate[0], ps.prompts, out / "gate")
        for name, (passed, flagged) in composed.items():
            verdicts[name, ps.name] = gated_verdicts(p, gate[1], verdicts[flagged, ps.name], verdicts[passed, ps.name])
    names += list(composed)
    base_name = methods[0].name
    for ps in sets:
        per_method: dict[str, MethodRate] = {}
        for name in names:
            refused = verdicts[name, ps.name]
            res = MethodRate(
                **rate(refused).model_dump(), paired={base_name: mcnemar(refused, verdicts[base_name, ps.name])}
            )
            if ps.categories:
                res.categories = {
                    c: rate([r for r, rc in zip(refused, ps.categories) if rc == c]) for c in sorted(set(ps.categories))
                }
            if ps.kind == "benign":
                res.compliance = 1 - res.refusal_rate
            per_method[name] = res
            if (name, ps.name) not in stores:
                continue
            store, keys = stores[name, ps.name]
            model_judged = [store.rows[k]["verdicts"][headline] for k in keys]
            if any("fallback" in v for v in model_judged):
                res.judge_fallbacks = sum(bool(v.get("fallback")) for v in model_judged)
            res.other_judges = {j.name: sum(_verdicts(store, keys, j.name)) / len(keys) for j in judges[1:]}
            res.mean_tokens = sum(store.rows[k]["n_tokens"] for k in keys) / len(keys)
        benchmarks[ps.name] = Benchmark(kind=_kind(ps), n=len(ps), methods=per_method)

    by_kind: dict[str, dict[str, PairedRate]] = {}
    for kind in KINDS:
        kind_sets = [ps.name for ps in sets if ps.kind == kind]
        if kind_sets:
            pooled = {name: [r for s in kind_sets for r in verdicts[name, s]] for name in names}
            by_kind[kind] = {
                name: PairedRate(**rate(v).model_dump(), paired={base_name: mcnemar(v, pooled[base_name])})
                for name, v in pooled.items()
            }

    t = time.perf_counter()
    quality, capability = _quality(
        lm, methods, runner, stores, sets, headline, cfg, out, log, gate if kl_gated else None
    )
    timings["quality_s"] = time.perf_counter() - t
    t = time.perf_counter()
    speed: dict[str, list[Speed]] = {}
    if cfg.speed_n > 0:
        sp = load_benchmark(cfg.quality_set, cfg.speed_n, cfg.seed + 1).prompts
        sizes = sorted({1, min(cfg.speed_batch or cfg.generation.batch_size, len(sp))})
        log(f"timing {len(sp)} prompts at batch {' and '.join(map(str, sizes))}") if progress else None
        speed = measure_speed(lm, methods, sp, sizes, cfg.generation.max_new_tokens)
    timings["speed_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    summary = Summary(
        model=lm.name,
        model_fingerprint=runner.model_fp,
        judge=headline,
        judges=[JudgeId(name=j.name, version=getattr(j, "version", "")) for j in judges],
        generation=GenerationInfo(
            **cfg.generation.key(),
            batch_size=cfg.generation.batch_size,
            greedy=True,
            dtype=str(lm.model.dtype).removeprefix("torch."),
            device=str(lm.model.device),
            limit=cfg.limit,
            seed=cfg.seed,
        ),
        methods={m.name: method_config(m) for m in methods},
        benchmarks=benchmarks,
        overall=Overall(**by_kind),
        quality=quality,
        **({"capability": capability} if capability else {}),  # absent from the file when not measured
        speed=speed,
        run=RunInfo(generated=runner.generated, timings_s=EvalTimings(**{k: round(v, 1) for k, v in timings.items()})),
        examples=_examples(methods, sets, stores, headline),
    )
    summary.write(out / "summary.json")
    return summary


def _quality(
    lm: LoadedModel,
    methods: list[Method],
    runner: Runner,
    stores: dict,
    sets: list[PromptSet],
    headline: str,
    cfg: EvalConfig,
    out: Path,
    log: Log,
    gate: tuple[HarmGate, float] | None,
) -> tuple[dict[str, Quality], dict[str, Capability]]:
    """Per method, on `cfg.quality_tokens`-token answers to harmless prompts (`cfg.quality_set` sample): KL to
    base on the prompts the harm gate passes (the ones ELS steers towards answering; all without a gate), the
    share of answers unchanged from base and of repeated 4-grams; the unchanged share on benign benchmark
    prompts that base answered; and multiple-choice accuracy on `cfg.capability_n` MMLU questions."""
    base = methods[0]
    quality: dict[str, Quality] = {}
    capability: dict[str, Capability] = {}
    qs = load_benchmark(cfg.quality_set, cfg.quality_n, cfg.seed) if cfg.quality_n > 0 else None
    long = Runner(
        lm,
        methods,
        out,
        Generation(cfg.quality_tokens, cfg.generation.batch_size),
        runner.progress,
        runner.log,
        runner.executor,
    )
    qstores = dict(zip([m.name for m in methods], long.complete_all([(m, qs) for m in methods]))) if qs else {}
    passed = list(range(len(qs))) if qs else []
    if qs is not None and gate is not None:
        p = gate_probabilities(lm, gate[0], qs.prompts, out / "gate")
        passed = [i for i, x in enumerate(p) if x < gate[1]]
    questions = load_mmlu(cfg.capability_n, cfg.seed) if cfg.capability_n > 0 else []
    cache_path = out / "quality_cache.json"
    cache = read_json_object(cache_path, "a quality cache") if cache_path.exists() else {}
    for m in methods:
        harmless: dict[str, Any] = {}  # only with a harmless set: absent from the summary without one
        if qs is not None:
            (bstore, bkeys), (mstore, mkeys) = qstores[base.name], qstores[m.name]
            base_rows, m_rows = [bstore.rows[k] for k in bkeys], [mstore.rows[k] for k in mkeys]
            harmless["unchanged_share"] = sum(a["answer"] == b["answer"] for a, b in zip(base_rows, m_rows)) / len(qs)
            harmless["repeated_4gram"] = repeated_ngram_share([r["tokens"] for r in m_rows])
            harmless["quality_set"], harmless["quality_n"] = qs.name, len(qs)
            harmless["quality_tokens"], harmless["kl_prompts"] = cfg.quality_tokens, len(passed)
            key = digest(
                [
                    runner.model_fp,
                    runner.method_digest[base.name],
                    runner.method_digest[m.name],
                    long.gen.key(),
                    [bkeys[i] for i in passed],
                ]
            )
            if m is base:
                harmless["kl_mean"], harmless["kl_tokens"] = 0.0, sum(len(base_rows[i]["tokens"]) for i in passed)
            elif cache.get(m.name, {}).get("key") == key:
                harmless["kl_mean"], harmless["kl_tokens"] = cache[m.name]["kl_mean"], cache[m.name]["kl_tokens"]
            else:
                log(f"KL of {m.name} to base on {len(passed)} gate-passed {qs.name} prompts")
                kl, n = kl_to_base(
                    lm, base, m, [qs.prompts[i] for i in passed], [base_rows[i]["tokens"] for i in passed]
                )
                harmless["kl_mean"], harmless["kl_tokens"] = kl, n
                cache[m.name] = {"key": key, "kl_mean": kl, "kl_tokens": n}
                write_atomic(cache_path, json.dumps(cache, indent=2))
        if questions:
            key = digest([runner.model_fp, runner.method_digest[m.name], "mmlu", cfg.capability_n, cfg.seed])
            if cache.get(f"capability/{m.name}", {}).get("key") != key:
                log(f"capability of {m.name}: {len(questions)} MMLU questions")
                cache[f"capability/{m.name}"] = {"key": key, "accuracy": mc_accuracy(lm, m, questions)}
                write_atomic(cache_path, json.dumps(cache, indent=2))
            capability[m.name] = Capability(
                set="mmlu", n=len(questions), accuracy=cache[f"capability/{m.name}"]["accuracy"]
            )
        same, n = 0, 0
        for ps in sets:
            if ps.kind != "benign":
                continue
            (bstore, bkeys), (mstore, mkeys) = stores[base.name, ps.name], stores[m.name, ps.name]
            for bk, mk in zip(bkeys, mkeys):
                if not bstore.rows[bk]["verdicts"][headline]["refused"]:
                    n += 1
                    same += bstore.rows[bk]["answer"] == mstore.rows[mk]["answer"]
        quality[m.name] = Quality(
            **harmless, unchanged_share_benign_answered=same / n if n else None, benign_answered_n=n
        )
    runner.generated += long.generated
    return quality, capability


def _examples(
    methods: list[Method], sets: list[PromptSet], stores: dict, headline: str, per_kind: int = 3
) -> dict[str, dict[str, list[Example]]]:
    """A few prompts per set kind where a method's verdict differs from base's, for the report."""
    base = methods[0]
    out: dict[str, dict[str, list[Example]]] = {}
    for m in methods[1:]:
        found: dict[str, list[Example]] = {k: [] for k in KINDS}
        for ps in sets:
            (bstore, bkeys), (mstore, mkeys) = stores[base.name, ps.name], stores[m.name, ps.name]
            for bk, mk in zip(bkeys, mkeys):
                b, r = bstore.rows[bk], mstore.rows[mk]
                if (
                    b["verdicts"][headline]["refused"] != r["verdicts"][headline]["refused"]
                    and len(found[_kind(ps)]) < per_kind
                ):
                    found[_kind(ps)].append(
                        Example.model_validate(
                            {
                                "set": ps.name,
                                "prompt": b["prompt"],
                                base.name: b["answer"],
                                m.name: r["answer"],
                                "base_refused": b["verdicts"][headline]["refused"],
                            }
                        )
                    )
        out[m.name] = found
    return out
