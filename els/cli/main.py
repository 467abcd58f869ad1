"""The `els` command line: run the pipeline and generate with and without steering here; the measuring and
serving commands live in els.cli.eval, `els judge-check` in els.cli.judge_check, `els gate` in els.cli.gate, the
options they share in els.cli.options."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from els.cli import eval as cli_eval
from els.cli import gate as cli_gate
from els.cli import judge_check as cli_judge_check
from els.cli.errors import ErrorsGroup, at_least, check_device, check_dtype, debug_option, load_model
from els.cli.options import (
    DEFAULT_BENIGN,
    DEFAULT_CONTRAST,
    DEFAULT_HARM_DATA,
    DEFAULT_HARMFUL,
    DEFAULT_JUDGE,
    DEFAULT_WIDTHS,
    STEER_OPTIONS,
    TRAIN_DEFAULTS,
    Benign,
    Contrast,
    Device,
    DeviceMap,
    Dtype,
    HarmData,
    Harmful,
    LayerRule,
    Limit,
    Model,
    Overwrite,
    Ray,
    RayAddress,
    Workers,
    console,
    input_paths,
    need_ray,
    parse_ints,
    parse_widths,
    prompt_sets,
    ray_executor,
    steer_options,
)
from els.core.executor import Executor
from els.core.generation import DEFAULT_MAX_NEW_TOKENS, generate, generate_batch, prompt_texts
from els.core.io import check_output_dir, write_atomic
from els.core.models import DEFAULT_MODEL, LoadedModel
from els.data.promptset import PromptSet
from els.judges.model import JUDGES, get_judge
from els.steering.artefact import DEFAULT_LAYER_RULE, DEFAULT_TOP_N, LAYER_RULES, MANIFEST, WEIGHTS, Artefact
from els.steering.energy import CONTRASTS
from els.steering.gate import HarmGate
from els.steering.steering import Steering
from els.training import recipe
from els.training.collect import COLLECTION_FILES, Collection, check_fits, collect, load_collection
from els.training.energy import TrainConfig
from els.training.timings import Timings

SIDES = {
    "answer": "steered towards answering",
    "refuse": "steered towards refusing",
    "unsure": "flagged, under refuse_gate: left unsteered",
    "leave": "flagged, left unsteered",
    "off": "unsteered",
}

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Energy Landscape Steering for chat LLMs.", cls=ErrorsGroup
)
app.callback()(debug_option)
# What `els run` writes in its OUT (a rerun finds only these there)
RUN_FILES = ("collect", "artefact", "validation.json", "timings.json")


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
    overwrite: Overwrite = False,
) -> None:
    """Generate, judge and record the four states (an interrupted collection in OUT resumes)."""
    at_least(1, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    check_output_dir("--out", out, input_paths(model, benign + harmful, judges=[judge]), COLLECTION_FILES, overwrite)
    need_ray(ray, ray_address, workers)
    sets = prompt_sets(benign, "benign", limit, seed) + prompt_sets(harmful, "harmful", limit, seed)
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map)
    with ray_executor(lm, ray, ray_address, workers, device, dtype, device_map) as ex:
        _collect(lm, out, sets, max_new_tokens, batch_size, judge, system, ex)


def _collect(
    lm: LoadedModel,
    out: Path,
    sets: list[PromptSet],
    max_new_tokens: int,
    batch_size: int,
    judge: str,
    system: Optional[str],
    executor: Executor | None = None,
) -> Collection:
    try:
        col = collect(
            lm,
            sets,
            out,
            judge=get_judge(judge),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            system=system,
            executor=executor,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    console.print(f"states: {col.counts()}")
    return col


@app.command("train")
@steer_options
def train_cmd(
    ctx: typer.Context,
    states: Annotated[Path, typer.Argument(help="A directory written by `els collect`.")],
    out: Annotated[Path, typer.Option(help="Artefact directory to write.")],
    top_n: Annotated[int, typer.Option(help="Steer the N layers of best validation AUC.")] = DEFAULT_TOP_N,
    layer_rule: LayerRule = DEFAULT_LAYER_RULE,
    contrast: Contrast = DEFAULT_CONTRAST,
    widths: Annotated[
        str, typer.Option(help="Energy MLP widths, e.g. 2048,1024,1024,512 as in the paper.")
    ] = DEFAULT_WIDTHS,
    epochs: int = TRAIN_DEFAULTS.epochs,
    seed: int = 0,
    harm_data: HarmData = DEFAULT_HARM_DATA,
    model: Model = DEFAULT_MODEL,
    device: Device = None,
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    steer: Optional[dict] = None,
) -> None:
    """Train the compliance and safety energies and the harm gate and write the steering artefact (the gate's
    forward passes need the collection's model). The steering flags set the artefact's settings."""
    how = _recipe(widths, epochs, seed, contrast, top_n, layer_rule, steer or {}, harm_data)
    check_dtype(dtype)  # checked even when no model loads: a mistyped flag is never silently ignored
    check_device(device)
    check_output_dir("--out", out, input_paths(model, how.harm_specs, [states]), (MANIFEST, WEIGHTS), overwrite)
    col = load_collection(states)
    sets = recipe.harm_sets(how)
    # A --model given on its own is loaded too, to check that the activations are its own.
    source = ctx.get_parameter_source("model")
    named = source is not None and source.name != "DEFAULT"
    lm = load_model(model, device=device, dtype=dtype) if sets is not None or named else None
    if lm is not None:
        check_fits(col, lm, states)
    _train(col, out, how, recipe.fit_harm_gate(lm, how, sets=sets, collection=col) if lm is not None else None)


def _recipe(
    widths: str, epochs: int, seed: int, contrast: str, top_n: int, layer_rule: str, steer: dict, harm_data: str
) -> recipe.Recipe:
    at_least(1, top_n=top_n, epochs=epochs)
    if layer_rule not in LAYER_RULES:
        raise typer.BadParameter(f"--layer-rule must be one of {', '.join(LAYER_RULES)}, got {layer_rule!r}")
    if contrast not in CONTRASTS:
        raise typer.BadParameter(f"--contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    cfg = TrainConfig(parse_widths(widths), epochs=epochs, seed=seed, contrast=contrast)
    pool = () if harm_data.strip().lower() == "none" else tuple(s.strip() for s in harm_data.split(",") if s.strip())
    # An explicit --harm-gate wins over the threshold chosen on the pool (steer_options has checked the values).
    return recipe.Recipe(
        cfg,
        recipe.Recipe().settings.override(**steer),
        layer_rule=layer_rule,
        top_n=top_n,
        harm_data=pool,
        pool_threshold="harm_gate" not in steer,
    )


def _train(col: Collection, out: Path, how: recipe.Recipe, gate: HarmGate | None) -> Artefact:
    try:
        art = recipe.fit(col, how, gate)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    art.save(out)
    auc, train_auc = art.manifest.auc(), art.manifest.train_auc()
    assert train_auc is not None, "make_artefact records the training AUC"
    table = Table("layer", "val AUC", "train AUC", "steered", title="energy models")
    for layer in art.manifest.trained_layers:
        table.add_row(str(layer), f"{auc[layer]:.3f}", f"{train_auc[layer]:.3f}", "*" if layer in art.layers else "")
    console.print(table)
    st = art.settings
    g = art.gate.report.get("gate", art.gate.report)
    console.print(
        f"harm gate: layer {art.gate.layer}, threshold {art.gate.threshold:.3f}"
        + (
            f", validation macro AUROC {g['val_macro_auroc']:.3f}"
            if "val_macro_auroc" in g
            else " (probe on the collection's prompts)"
        )
    )
    console.print(
        f"artefact written to {out} (layers {art.layers}, eta {st.eta}, K {st.steps}, "
        f"positions {st.positions}, harm gate {_p(st.harm_gate)}, flagged prompts: {st.flagged} "
        f"(eta {st.refuse_eta}, from p(harmful) {_p(st.refuse_gate)}), project {st.project})"
    )
    return art


def _p(value: float | None) -> str:
    return "off" if value is None else f"{value:.3f}"


def run_cmd(steer: dict, **options: Any) -> None:
    """The whole pipeline: collect states, train energies and the harm gate, write OUT/artefact (els.json).
    Its options are those of `els collect` and `els train` (see `_run_signature`)."""
    o = SimpleNamespace(**options)
    how = _recipe(o.widths, o.epochs, o.seed, o.contrast, o.top_n, o.layer_rule, steer, o.harm_data)
    at_least(1, limit=o.limit, max_new_tokens=o.max_new_tokens, batch_size=o.batch_size)
    inputs = input_paths(o.model, o.benign + o.harmful + list(how.harm_specs), judges=[o.judge])
    check_output_dir("--out", o.out, inputs, RUN_FILES, o.overwrite)
    for sub, owns in (("collect", COLLECTION_FILES), ("artefact", (MANIFEST, WEIGHTS))):
        check_output_dir("--out", o.out / sub, inputs, owns, o.overwrite)
    need_ray(o.ray, o.ray_address, o.workers)
    times = Timings()
    # Every input is read before the model loads: a missing one costs seconds, not a collection.
    with _timed(times, "inputs_s"):
        sets = prompt_sets(o.benign, "benign", o.limit, o.seed) + prompt_sets(o.harmful, "harmful", o.limit, o.seed)
        pool = recipe.harm_sets(how)
    with _timed(times, "load_s"):
        lm = load_model(o.model, device=o.device, dtype=o.dtype, device_map=o.device_map)
    with (
        _timed(times, "collect_s"),
        ray_executor(lm, o.ray, o.ray_address, o.workers, o.device, o.dtype, o.device_map) as ex,
    ):
        col = _collect(lm, o.out / "collect", sets, o.max_new_tokens, o.batch_size, o.judge, o.system, ex)
    with _timed(times, "gate_s"):
        gate = recipe.fit_harm_gate(lm, how, sets=pool, collection=col)
    with _timed(times, "train_s"):
        art = _train(col, o.out / "artefact", how, gate)
    with _timed(times, "validate_s"):
        rows = recipe.held_out(col, how.train)
        check = recipe.validate(lm, art, col, rows, get_judge(o.judge), max_new_tokens=o.max_new_tokens)
    write_atomic(o.out / "validation.json", json.dumps(check, indent=2))
    times.write(o.out / "timings.json")
    console.print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.stages().items()))
    table = Table(
        "", "benign compliance", "harmful refusal", title=f"held-out prompts of the collection (judge {o.judge})"
    )
    for name, r in check.items():
        table.add_row(
            name,
            *(
                f"{r[k]:.2f} (n={r[n]})" if k in r else "-"
                for k, n in (("benign_compliance", "benign_n"), ("harmful_refusal", "harmful_n"))
            ),
        )
    console.print(table)


@contextmanager
def _timed(times: Timings, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    setattr(times, stage, time.perf_counter() - start)


def _run_signature() -> inspect.Signature:
    """`els run` takes every option of `els collect` and of `els train` (declared once, there), with its own
    OUT; typer reads the options from this signature."""
    out = inspect.Parameter(
        "out",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[
            Path, typer.Option(help="Run directory: collect/ (states) and artefact/ are written here.")
        ],
    )
    params = {"out": out}
    for command in (collect_cmd, train_cmd):
        for p in inspect.signature(command, eval_str=True).parameters.values():
            if p.name not in ("ctx", "out", "states", "steer", *STEER_OPTIONS):
                params.setdefault(p.name, p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return inspect.Signature(list(params.values()))


run_cmd.__signature__ = _run_signature()  # type: ignore[attr-defined]
app.command("run")(steer_options(run_cmd))


@app.command("generate")
@steer_options
def generate_cmd(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to answer.")],
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[Optional[Path], typer.Option("--steer", help="Artefact directory.")] = None,
    compare: Annotated[bool, typer.Option(help="Print the unsteered answer too (needs --steer).")] = False,
    layers: Annotated[Optional[str], typer.Option(help="Override the steered layers, e.g. 21,22,23.")] = None,
    max_new_tokens: int = 128,
    system: Optional[str] = None,
    device: Device = None,
    dtype: Dtype = "auto",
    steer: Optional[dict] = None,
) -> None:
    """Answer prompts, steered with --steer (the steering flags override the artefact's settings); --compare
    prints `base:` and `els:` answers, and each steered answer says which side the harm gate sent it."""
    if compare and steer_dir is None:
        raise typer.BadParameter("--compare needs --steer")
    at_least(1, max_new_tokens=max_new_tokens)
    art = Artefact.load(steer_dir) if steer_dir is not None else None  # fails before the model loads
    lm = load_model(model, device=device, dtype=dtype)
    base = generate(lm, prompts, max_new_tokens=max_new_tokens, system=system) if compare or not steer_dir else None
    steered = None
    if art is not None:
        try:
            chosen = None if layers is None else parse_ints(layers, "--layers")
            with Steering(lm.model, art, layers=chosen, **(steer or {})) as s:
                # one batch in the prompts' order, so the gate's reading of each row is that prompt's
                texts, _ = prompt_texts(lm, prompts, system)
                steered = generate_batch(lm, texts, max_new_tokens).texts
                sides = s.sides()
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            console.print(f"[bold]prompt:[/bold] {prompt}", highlight=False)
        if base is not None:
            console.print(f"[bold]base:[/bold] {base[i]}" if compare else base[i], highlight=False)
        if steered is not None:
            if compare:
                side, p = sides[i]
                st = s.settings
                gate = "" if p is None else f"p(harmful) {p:.3f}, threshold {st.harm_gate:.3f}: "
                what = SIDES[side]
                if side == "unsure":
                    what = what.replace("refuse_gate", f"refuse_gate {st.refuse_gate:.3f}")
                console.print(f"[dim]harm gate: {gate}{what}[/dim]", highlight=False)
            console.print(f"[bold]els:[/bold] {steered[i]}" if compare else steered[i], highlight=False)


# After the pipeline's commands, so `els --help` lists them in the order of use.
for _name, _command in (
    ("tune", cli_eval.tune_cmd),
    ("serve", cli_eval.serve_cmd),
    ("eval", cli_eval.eval_cmd),
    ("judge-check", cli_judge_check.judge_check_cmd),
    ("gate", cli_gate.gate_cmd),
):
    app.command(_name)(_command)
