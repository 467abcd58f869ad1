"""The `els` command line: run the pipeline, generate with and without steering."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from els import recipe
from els.artefact import DEFAULT_LAYER_RULE, DEFAULT_TOP_N, LAYER_RULES, Artefact
from els.cli_errors import ErrorsGroup, at_least, debug_option, load_model
from els.collect import Collection, collect, load_collection
from els.data import load_prompts
from els.distributed import RayMissing, import_ray, make_executor
from els.energy import CONTRASTS, TrainConfig
from els.generation import DEFAULT_MAX_NEW_TOKENS, generate, write_atomic
from els.judges import JUDGES, get_judge
from els.models import DEFAULT_MODEL
from els.settings import SteerSettings
from els.steering import steer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Energy Landscape Steering for chat LLMs.",
                  cls=ErrorsGroup)
app.callback()(debug_option)
console = Console()

# The recipe's defaults live in the library (els.recipe.Recipe); the options show them.
DEFAULT_BENIGN = list(recipe.DEFAULT_BENIGN)
DEFAULT_HARMFUL = list(recipe.DEFAULT_HARMFUL)
DEFAULT_JUDGE = recipe.DEFAULT_COLLECT_JUDGE
_SETTINGS, _TRAIN = SteerSettings(), TrainConfig()
DEFAULT_CONTRAST = _TRAIN.contrast
DEFAULT_ETA, DEFAULT_STEPS, DEFAULT_POSITIONS = _SETTINGS.eta, _SETTINGS.steps, _SETTINGS.positions
DEFAULT_HARM_GATE = _SETTINGS.harm_gate
DEFAULT_WIDTHS = ",".join(map(str, _TRAIN.widths))

Model = Annotated[str, typer.Option("--model", "-m", help="HF id, local dir, .gguf file or 'default'.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cpu).")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on CPU), float32, bfloat16, float16.")]
DeviceMap = Annotated[Optional[str], typer.Option(help="'auto' to spread a large model over devices.")]
Benign = Annotated[list[str], typer.Option(help="Benign prompt sets (repeatable).")]
Harmful = Annotated[list[str], typer.Option(help="Harmful prompt sets (repeatable).")]
Limit = Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per class.")]
LayerRule = Annotated[str, typer.Option(help=f"How the N steered layers are chosen: {', '.join(LAYER_RULES)} "
                                             "(see els.steering.steer_layers).")]
Contrast = Annotated[str, typer.Option(help="States the energy contrasts: four-state (the paper: helpful and "
                                           "safe refusal vs false refusal and jailbreak) or benign (helpful vs "
                                           "false refusal; pair it with --harm-gate).")]
Positions = Annotated[str, typer.Option(help="'last': step position -1 of every forward pass (the paper); "
                                             "'prompt': only the last prompt token.")]
HarmData = Annotated[str, typer.Option(help="The harm gate's pool: comma-separated [KIND=]SET[#N] specs, prompt-only "
                                            "forward passes (els.gate_training); 'none': a probe on the collection's "
                                            "own prompts.")]
DEFAULT_HARM_DATA = ",".join(recipe.Recipe().harm_data)
Ray = Annotated[bool, typer.Option("--ray", help="Generate on Ray workers in a local Ray cluster started here "
                                                 "(pip install 'els[ray]'; see docs/scale.md).")]
RayAddress = Annotated[Optional[str], typer.Option(help="Join this Ray cluster instead (auto, HOST:PORT, "
                                                        "ray://HOST:10001); implies --ray.")]
Workers = Annotated[Optional[int], typer.Option(help="Ray workers, each loading the model once (default: one per "
                                                     "GPU, else 1; on CPUs each gets an equal share of the threads).")]


def _parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def _parse_widths(text: str) -> tuple[int, ...]:
    widths = _parse_ints(text, "widths")
    if not widths or min(widths) < 1:
        raise typer.BadParameter("widths must be positive")
    return widths


def _need_ray(ray: bool, ray_address: Optional[str], workers: Optional[int]) -> None:
    """Fail before the model loads: Ray asked for but missing (one line), or --workers without Ray."""
    if ray or ray_address:
        try:
            import_ray()
        except RayMissing as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(1) from None
    elif workers not in (None, 1):
        raise typer.BadParameter("--workers needs --ray (or --ray-address)")


@contextmanager
def _executor(lm, ray: bool, ray_address: Optional[str], workers: Optional[int], device, dtype, device_map):
    """Where batches are generated: here, or on Ray workers (els.distributed), closed after the block."""
    try:
        ex = make_executor(lm, ray, ray_address, workers, device=device, dtype=dtype, device_map=device_map)
        ex.__enter__()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        yield ex
    finally:
        ex.close()


def _sets(specs: list[str], kind: str, limit: Optional[int], seed: int):
    out = []
    for spec in specs:
        try:
            ps = load_prompts(spec).with_kind(kind)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
        out.append(ps)
    if limit is not None:  # --limit counts prompts per class, spread over that class's sets
        share = [limit // len(out) + (i < limit % len(out)) for i in range(len(out))]
        out = [ps.sample(n, seed) for ps, n in zip(out, share)]
    return out


@app.command("collect")
def collect_cmd(
    out: Annotated[Path, typer.Option(help="Directory for states.safetensors and states.jsonl.")],
    model: Model = DEFAULT_MODEL,
    benign: Benign = DEFAULT_BENIGN,
    harmful: Harmful = DEFAULT_HARMFUL,
    limit: Limit = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    judge: Annotated[str, typer.Option(help=f"Refusal judge: {', '.join(JUDGES)}.")] = DEFAULT_JUDGE,
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the template's own).")] = None,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
) -> None:
    """Generate, judge and record the four states."""
    at_least(1, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    _need_ray(ray, ray_address, workers)
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map)
    with _executor(lm, ray, ray_address, workers, device, dtype, device_map) as ex:
        _collect(lm, out, benign, harmful, limit, max_new_tokens, batch_size, judge, system, seed, ex)


def _collect(lm, out, benign, harmful, limit, max_new_tokens, batch_size, judge, system, seed,
             executor=None) -> Collection:
    sets = _sets(benign, "benign", limit, seed) + _sets(harmful, "harmful", limit, seed)
    try:
        col = collect(lm, sets, out, judge=get_judge(judge), max_new_tokens=max_new_tokens,
                      batch_size=batch_size, system=system, executor=executor)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    console.print(f"states: {col.counts()}")
    return col


@app.command("train")
def train_cmd(
    states: Annotated[Path, typer.Argument(help="A directory written by `els collect`.")],
    out: Annotated[Path, typer.Option(help="Artefact directory to write.")],
    top_n: Annotated[int, typer.Option(help="Steer the N layers of best validation AUC.")] = DEFAULT_TOP_N,
    eta: Annotated[float, typer.Option(help="Step size as a fraction of the layer's mean hidden norm.")] = DEFAULT_ETA,
    steps: Annotated[int, typer.Option(help="Gradient steps K per forward pass.")] = DEFAULT_STEPS,
    gate: Annotated[Optional[float], typer.Option(help="Gate threshold (energy above the calibrated offset); off by default.")] = None,
    harm_gate: Annotated[float, typer.Option(help="Leave prompts the harm probe rates at least this likely harmful "
                                                  "unsteered; 1 turns the gate off.")] = DEFAULT_HARM_GATE,
    layer_rule: LayerRule = DEFAULT_LAYER_RULE,
    positions: Positions = DEFAULT_POSITIONS,
    contrast: Contrast = DEFAULT_CONTRAST,
    widths: Annotated[str, typer.Option(help="Energy MLP widths, e.g. 2048,1024,1024,512 as in the paper.")] = DEFAULT_WIDTHS,
    epochs: int = _TRAIN.epochs,
    seed: int = 0,
    harm_data: HarmData = DEFAULT_HARM_DATA,
    model: Model = DEFAULT_MODEL,
    device: Device = None,
    dtype: Dtype = "auto",
) -> None:
    """Train the per-layer energy models and the harm gate and write the steering artefact (the gate's
    forward passes need the collection's model)."""
    how = _recipe(widths, epochs, seed, contrast, top_n, layer_rule, eta, steps, gate, harm_gate, positions, harm_data)
    col = load_collection(states)
    lm = load_model(model, device=device, dtype=dtype) if how.harm_data else None
    _train(col, out, how, lm)


def _recipe(widths, epochs, seed, contrast, top_n, layer_rule, eta, steps, gate, harm_gate, positions,
            harm_data) -> recipe.Recipe:
    at_least(1, top_n=top_n, epochs=epochs)
    if layer_rule not in LAYER_RULES:
        raise typer.BadParameter(f"--layer-rule must be one of {', '.join(LAYER_RULES)}, got {layer_rule!r}")
    if contrast not in CONTRASTS:
        raise typer.BadParameter(f"--contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    try:
        settings = SteerSettings(eta=eta, steps=steps, threshold=gate, harm_gate=None if harm_gate >= 1 else harm_gate,
                                 positions=positions)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    cfg = TrainConfig(_parse_widths(widths), epochs=epochs, seed=seed, contrast=contrast)
    pool = () if harm_data.strip().lower() == "none" else tuple(s.strip() for s in harm_data.split(",") if s.strip())
    return recipe.Recipe(cfg, settings, layer_rule=layer_rule, top_n=top_n, harm_data=pool)


def _train(col: Collection, out: Path, how: recipe.Recipe, lm=None) -> Artefact:
    try:
        gate = recipe.fit_harm_gate(lm, how) if lm is not None else None
        art = recipe.fit(col, how, gate)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    art.save(out)
    m = art.manifest
    table = Table("layer", "val AUC", "train AUC", "steered", title="energy models")
    for layer in m["trained_layers"]:
        table.add_row(str(layer), f"{m['layer_auc'][str(layer)]:.3f}", f"{m['layer_train_auc'][str(layer)]:.3f}",
                      "*" if layer in art.layers else "")
    console.print(table)
    st = art.settings
    g = art.gate.report.get("gate", art.gate.report)
    console.print(f"harm gate: layer {art.gate.layer}, threshold {art.gate.threshold:.3f}"
                  + (f", validation macro AUROC {g['val_macro_auroc']:.3f}" if "val_macro_auroc" in g else
                     " (probe on the collection's prompts)"))
    console.print(f"artefact written to {out} (layers {art.layers}, eta {st.eta}, K {st.steps}, "
                  f"positions {st.positions}, harm gate {st.harm_gate}, project {st.project})")
    return art


@app.command("run")
def run_cmd(
    out: Annotated[Path, typer.Option(help="Run directory: collect/ (states) and artefact/ are written here.")],
    model: Model = DEFAULT_MODEL,
    benign: Benign = DEFAULT_BENIGN,
    harmful: Harmful = DEFAULT_HARMFUL,
    limit: Limit = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    judge: str = DEFAULT_JUDGE,
    system: Optional[str] = None,
    top_n: int = DEFAULT_TOP_N,
    eta: float = DEFAULT_ETA,
    steps: int = DEFAULT_STEPS,
    gate: Optional[float] = None,
    harm_gate: float = DEFAULT_HARM_GATE,
    layer_rule: LayerRule = DEFAULT_LAYER_RULE,
    positions: Positions = DEFAULT_POSITIONS,
    contrast: Contrast = DEFAULT_CONTRAST,
    widths: str = DEFAULT_WIDTHS,
    epochs: int = _TRAIN.epochs,
    seed: int = 0,
    harm_data: HarmData = DEFAULT_HARM_DATA,
    device: Device = None,
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
) -> None:
    """The whole pipeline: collect states, train energies and the harm gate, write OUT/artefact (els.json)."""
    how = _recipe(widths, epochs, seed, contrast, top_n, layer_rule, eta, steps, gate, harm_gate, positions, harm_data)
    at_least(1, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    _need_ray(ray, ray_address, workers)
    times = {}
    t = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map)
    times["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with _executor(lm, ray, ray_address, workers, device, dtype, device_map) as ex:
        col = _collect(lm, out / "collect", benign, harmful, limit, max_new_tokens, batch_size, judge, system, seed,
                       ex)
    times["collect_s"] = time.perf_counter() - t
    t = time.perf_counter()
    art = _train(col, out / "artefact", how, lm)
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = recipe.held_out(col, how.train)
    check = recipe.validate(lm, art, col, rows, get_judge(judge), max_new_tokens=max_new_tokens)
    times["validate_s"] = time.perf_counter() - t
    write_atomic(out / "validation.json", json.dumps(check, indent=2))
    write_atomic(out / "timings.json", json.dumps({k: round(v, 1) for k, v in times.items()}, indent=2))
    console.print("stage times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items()))
    table = Table("", "benign compliance", "harmful refusal",
                  title=f"held-out prompts of the collection (judge {judge})")
    for name, r in check.items():
        table.add_row(name, *(f"{r[k]:.2f} (n={r[n]})" if k in r else "-" for k, n in
                              (("benign_compliance", "benign_n"), ("harmful_refusal", "harmful_n"))))
    console.print(table)


@app.command("generate")
def generate_cmd(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to answer.")],
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[Optional[Path], typer.Option("--steer", help="Artefact directory.")] = None,
    compare: Annotated[bool, typer.Option(help="Print the unsteered answer too (needs --steer).")] = False,
    eta: Annotated[Optional[float], typer.Option(help="Override the artefact's eta.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Override the artefact's K.")] = None,
    harm_gate: Annotated[Optional[float], typer.Option(help="Override the artefact's harm gate.")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Override the steered layers, e.g. 21,22,23.")] = None,
    positions: Annotated[Optional[str], typer.Option(help="Override the artefact's positions: last, prompt.")] = None,
    project: Annotated[Optional[bool], typer.Option(help="Override whether steps are kept orthogonal to the harm "
                                                         "probe's direction.")] = None,
    max_new_tokens: int = 128,
    system: Optional[str] = None,
    device: Device = None,
    dtype: Dtype = "auto",
) -> None:
    """Answer prompts, steered with --steer; --compare prints `base:` and `els:` answers."""
    if compare and steer_dir is None:
        raise typer.BadParameter("--compare needs --steer")
    at_least(1, max_new_tokens=max_new_tokens)
    art = Artefact.load(steer_dir) if steer_dir is not None else None  # fails before the model loads
    lm = load_model(model, device=device, dtype=dtype)
    base = generate(lm, prompts, max_new_tokens=max_new_tokens, system=system) if compare or not steer_dir else None
    steered = None
    if steer_dir is not None:
        try:
            chosen = None if layers is None else _parse_ints(layers, "--layers")
            with steer(lm.model, art, eta=eta, steps=steps, harm_gate=harm_gate, layers=chosen, positions=positions,
                       project=project):
                steered = generate(lm, prompts, max_new_tokens=max_new_tokens, system=system)
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            console.print(f"[bold]prompt:[/bold] {prompt}", highlight=False)
        if base is not None:
            console.print(f"[bold]base:[/bold] {base[i]}" if compare else base[i], highlight=False)
        if steered is not None:
            console.print(f"[bold]els:[/bold] {steered[i]}" if compare else steered[i], highlight=False)


@app.command("tune")
def tune_cmd(
    steer_dir: Annotated[Path, typer.Option("--steer", help="Artefact directory to tune.")],
    out: Annotated[Path, typer.Option(help="Study directory: study.db, pareto.json/.md/.png, answers/.")],
    model: Model = DEFAULT_MODEL,
    benign: Annotated[Optional[list[str]],
                      typer.Option(help="Benign validation sets (default: orbench-hard@val, oktest@val)")] = None,
    harmful: Annotated[Optional[list[str]],
                       typer.Option(help="Harmful validation sets (default: harmbench-val, orbench-toxic@val)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per side.")] = 32,
    trials: Annotated[int, typer.Option(help="Trials in the study in all (a resumed study runs the rest).")] = 24,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    judge: Annotated[str, typer.Option(help=f"Refusal judge: {', '.join(JUDGES)}.")] = DEFAULT_JUDGE,
    max_layers: Annotated[int, typer.Option(help="Largest number of steered layers to try.")] = 8,
    tolerance: Annotated[float, typer.Option(help="Harmful refusal the choice may lose against the base.")] = 0.03,
    max_nll_increase: Annotated[float, typer.Option(help="Answer NLL (nats/token) above the base's that counts "
                                                         "as garbled text.")] = 1.0,
    out_artefact: Annotated[Optional[Path],
                            typer.Option(help="Tuned artefact directory (default: update --steer in place).")] = None,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
) -> None:
    """Search eta, K, layers and gate with Optuna on validation prompts; write the Pareto front and the choice."""
    from els import tune as tuning  # the module pulls in optuna lazily; keep other commands' start-up light

    at_least(1, limit=limit, trials=trials, max_new_tokens=max_new_tokens, batch_size=batch_size,
             max_layers=max_layers)
    benign, harmful = benign or tuning.DEFAULT_BENIGN, harmful or tuning.DEFAULT_HARMFUL
    sets = {"benign": benign, "harmful": harmful, "limit": limit, "limit_seed": seed}
    benign_ps, harmful_ps = _sets(benign, "benign", limit, seed), _sets(harmful, "harmful", limit, seed)
    try:
        art = Artefact.load(steer_dir)
        lm = load_model(model, device=device, dtype=dtype)
        result = tuning.tune(lm, art, out, benign=[p for ps in benign_ps for p in ps.prompts],
                             harmful=[p for ps in harmful_ps for p in ps.prompts], judge=get_judge(judge), sets=sets,
                             n_trials=trials, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                             max_layers=max_layers, tolerance=tolerance, max_nll_increase=max_nll_increase)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    tuning.tuned_artefact(art, result).save(out_artefact or steer_dir)
    console.print((out / "pareto.md").read_text(), highlight=False, soft_wrap=True)
    c, b = result["chosen"], result["base"]
    if not result["chosen_beats_base"]:
        console.print("[yellow]warning:[/yellow] no trial beats the unsteered model under the rule", highlight=False)
    console.print(f"chosen trial {c['trial']}: {c['settings']} -> benign compliance {c['benign_compliance']:.3f} "
                  f"(base {b['benign_compliance']:.3f}), harmful refusal {c['harmful_refusal']:.3f} "
                  f"(base {b['harmful_refusal']:.3f}); written to {out_artefact or steer_dir} in "
                  f"{result['wall_s']:.0f} s")


@app.command("serve")
def serve_cmd(
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[Optional[Path], typer.Option("--steer", help="Artefact directory; without it, requests "
                                                      "asking for steering get 400.")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt (templated, in tokens).")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    max_body_kb: Annotated[int, typer.Option(help="Largest request body.")] = 1024,
    max_batch: Annotated[int, typer.Option(help="Most requests generated together.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="How long an idle server waits to batch a burst.")] = 5.0,
    device: Device = None,
    dtype: Dtype = "auto",
) -> None:
    """OpenAI-compatible chat server (POST /v1/chat/completions) with per-request steering."""
    import uvicorn

    from els.serve import Limits, create_app

    try:
        art = Artefact.load(steer_dir) if steer_dir is not None else None
        limits = Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                        default_max_tokens=min(256, max_tokens), max_body_bytes=max_body_kb * 1024,
                        max_batch=max_batch, batch_window_ms=batch_window_ms)
        application = create_app(load_model(model, device=device, dtype=dtype), art, limits)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    uvicorn.run(application, host=host, port=port)


@app.command("eval")
def eval_cmd(
    out: Annotated[Path, typer.Option(help="Output directory: completions/, summary.json, report.md, plots.")],
    benchmarks: Annotated[str, typer.Option(help="Comma-separated sets: xstest-safe, xstest-unsafe, orbench-hard"
                                                 "[@train|val|test], oktest, jbb, harmbench, advbench, strongreject, "
                                                 "alpaca, or PATH:COLUMN=benign|harmful.")
                          ] = "xstest-safe,xstest-unsafe",
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[Optional[Path], typer.Option("--steer", help="Artefact directory (enables method els).")
                         ] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: base,els with --steer, "
                                                        "else base); base always runs.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per benchmark.")] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    judge: Annotated[Optional[str], typer.Option(help="Judge(s), comma-separated; the first is reported: prefix, "
                                                      "substring, learned, model, model:NAME (default learned).")
                     ] = None,
    states: Annotated[Optional[Path], typer.Option(help="Collection directory for the energy histograms and fitted "
                                                       "baselines (default: the artefact's sibling collect/).")] = None,
    eta: Annotated[Optional[float], typer.Option(help="Override the artefact's eta.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Override the artefact's K.")] = None,
    quality_set: Annotated[str, typer.Option(help="Harmless set for KL and unchanged share.")] = "alpaca",
    quality_n: Annotated[int, typer.Option(help="Prompts of the harmless set (0: skip).")] = 32,
    speed_n: Annotated[int, typer.Option(help="Prompts timed per method at batch 1 and the larger batch (0: skip).")
                       ] = 8,
    speed_batch: Annotated[Optional[int], typer.Option(help="The larger timed batch (default --batch-size).")] = None,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
) -> None:
    """Compare base and methods on benchmarks: refusal rates with intervals, quality, speed, report and plots."""
    from els.data import load_benchmark
    from els.evaluate import EvalConfig, Generation, evaluate
    from els.methods import MethodContext, resolve_methods
    from els.judges import DEFAULT_EVAL_JUDGE
    from els.report import write_report

    judge_names = [j.strip() for j in (judge or DEFAULT_EVAL_JUDGE).split(",") if j.strip()]
    at_least(1, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, speed_batch=speed_batch)
    at_least(0, quality_n=quality_n, speed_n=speed_n)
    _need_ray(ray, ray_address, workers)
    try:  # everything that can be wrong with the input fails here, before any generation
        sets = [load_benchmark(spec.strip(), limit, seed) for spec in benchmarks.split(",") if spec.strip()]
        if not sets:
            raise ValueError("--benchmarks names no benchmark")
        if len({ps.name for ps in sets}) != len(sets):
            raise ValueError(f"a benchmark is named twice: {[ps.name for ps in sets]}")
        if quality_n > 0 or speed_n > 0:
            load_benchmark(quality_set, 1)
        for name in judge_names:
            if not name.startswith("model"):
                get_judge(name)
        art = Artefact.load(steer_dir) if steer_dir is not None else None
        if states is None and steer_dir is not None and (steer_dir.parent / "collect" / "states.jsonl").exists():
            states = steer_dir.parent / "collect"
        if states is not None and not (states / "states.jsonl").exists():
            raise FileNotFoundError(f"--states {states} holds no finished collection (states.jsonl)")
        settings = {k: v for k, v in (("eta", eta), ("steps", steps)) if v is not None}
        names = methods.split(",") if methods else (["base", "els"] if art is not None else ["base"])
        chosen = resolve_methods(names, MethodContext(art, states, settings))
        lm = load_model(model, device=device, dtype=dtype)
        if art is not None:
            art.check_model(lm.model)
        judges = [get_judge(name, lm) for name in judge_names]
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    cfg = EvalConfig(Generation(max_new_tokens, batch_size), judge_names, limit, seed, quality_set, quality_n,
                     speed_n, speed_batch)
    console.print(f"evaluating {', '.join(m.name for m in chosen)} on {', '.join(ps.name for ps in sets)} "
                  f"({sum(map(len, sets))} prompts per method), judge {judges[0].name}; "
                  f"answers cached in {out}/completions")
    with _executor(lm, ray, ray_address, workers, device, dtype, None) as ex:
        summary = evaluate(lm, chosen, sets, out, cfg, judges, log=console.print, executor=ex)
    plots = write_report(summary, out, art, states)
    table = Table("benchmark", "kind", "n", *[m.name for m in chosen], title=f"refusal rate (judge {summary['judge']})")
    for name, b in summary["benchmarks"].items():
        table.add_row(name, b["kind"], str(b["n"]), *[
            f"{r['refusal_rate']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"
            for r in (b["methods"][m.name] for m in chosen)])
    console.print(table)
    for m, q in summary["quality"].items():
        if m != "base":
            console.print(f"{m}: KL to base {q.get('kl_mean', float('nan')):.4f} nats/token, unchanged "
                          f"{q.get('unchanged_share', float('nan')):.2f} of harmless answers")
    for m, entries in summary["speed"].items():
        console.print(f"{m}: " + ", ".join(f"batch {e['batch']}: {e['tokens_per_s']:.1f} tok/s "
                                           f"(x{e['ratio_to_base']:.2f})" for e in entries))
    console.print(f"{summary['run']['generated']} answers generated, {summary['run']['timings_s']['total_s']:.0f} s; "
                  f"report: {out / 'report.md'}, plots: {', '.join(p.name for p in plots)}")


@app.command("judge-check")
def judge_check_cmd(
    files: Annotated[Optional[list[Path]], typer.Argument(help="Labelled CSVs (prompt, completion, final_label); "
                                                              "default: the three XSTest files.")] = None,
    judges: Annotated[str, typer.Option(help="Comma-separated judges to score.")] = "prefix,substring,learned,model",
    model_judge_limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N answers per file for model "
                                                                  "judges (slow on a CPU); 0 for all.")] = 30,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the table to this Markdown file.")] = None,
    retrain_learned: Annotated[bool, typer.Option(help="First retrain the shipped learned judge on FILES and write it "
                                                       "to els/resources.")] = False,
    seed: int = 0,
) -> None:
    """Agreement of each judge with human labels: accuracy, Cohen's kappa, refusal precision and recall."""
    from els.agreement import default_labelled_files, judge_check, judge_table
    from els.judges import read_labelled, train_learned_judge

    try:
        paths = list(files) if files else default_labelled_files()
        if retrain_learned:
            judge_dir = Path(__file__).parent / "resources"
            train_learned_judge([read_labelled(p) for p in paths]).save(judge_dir)
            console.print(f"learned judge retrained on {len(paths)} file(s), written to {judge_dir}")
        results = judge_check(paths, [j.strip() for j in judges.split(",") if j.strip()],
                              model_judge_limit=model_judge_limit or None, seed=seed, log=console.print)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    text = judge_table(results)
    console.print(text, highlight=False)
    if markdown is not None:
        write_atomic(markdown, text + "\n")
