"""The `els` command line: run the pipeline, generate with and without steering."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from els.collect import DEFAULT_MAX_NEW_TOKENS, Collection, collect, generate, load_collection, write_atomic
from els.data import load_prompts
from els.energy import TrainConfig, train_energy
from els.judges import JUDGES, get_judge
from els.models import DEFAULT_MODEL, load_model
from els.steering import Artefact, make_artefact, steer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Energy Landscape Steering for chat LLMs.")
console = Console()

DEFAULT_BENIGN = ["els-benign"]
DEFAULT_HARMFUL = ["els-harmful"]
DEFAULT_JUDGE = "prefix"
DEFAULT_TOP_N = 3
DEFAULT_ETA = 0.05
DEFAULT_STEPS = 3

Model = Annotated[str, typer.Option("--model", "-m", help="HF id, local dir, .gguf file or 'default'.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cpu).")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on CPU), float32, bfloat16, float16.")]
DeviceMap = Annotated[Optional[str], typer.Option(help="'auto' to spread a large model over devices.")]


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"widths must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise typer.BadParameter("widths must be positive")
    return widths


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
    benign: Annotated[list[str], typer.Option(help="Benign prompt sets (repeatable).")] = DEFAULT_BENIGN,
    harmful: Annotated[list[str], typer.Option(help="Harmful prompt sets (repeatable).")] = DEFAULT_HARMFUL,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per class.")] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    judge: Annotated[str, typer.Option(help=f"Refusal judge: {', '.join(JUDGES)}.")] = DEFAULT_JUDGE,
    system: Annotated[Optional[str], typer.Option(help="System prompt (default: the template's own).")] = None,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
) -> None:
    """Generate, judge and record the four states."""
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map)
    _collect(lm, out, benign, harmful, limit, max_new_tokens, batch_size, judge, system, seed)


def _collect(lm, out, benign, harmful, limit, max_new_tokens, batch_size, judge, system, seed) -> Collection:
    sets = _sets(benign, "benign", limit, seed) + _sets(harmful, "harmful", limit, seed)
    try:
        col = collect(lm, sets, out, judge=get_judge(judge), max_new_tokens=max_new_tokens,
                      batch_size=batch_size, system=system)
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
    widths: Annotated[str, typer.Option(help="Energy MLP widths, e.g. 2048,1024,1024,512 as in the paper.")] = "512,256",
    epochs: int = 120,
    seed: int = 0,
) -> None:
    """Train the per-layer energy models and write the steering artefact."""
    _train(load_collection(states), out, top_n, eta, steps, gate, _parse_widths(widths), epochs, seed)


def _train(col: Collection, out: Path, top_n, eta, steps, gate, widths, epochs, seed) -> Artefact:
    cfg = TrainConfig(widths=widths, epochs=epochs, seed=seed)
    num_layers = col.activations.shape[1]
    if not 1 <= top_n <= num_layers:
        raise typer.BadParameter(f"--top-n must be between 1 and {num_layers}")
    try:
        result = train_energy(col.activations, col.states, cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    art = make_artefact(result, col, trained_layers=list(range(num_layers)), top_n=top_n, eta=eta, steps=steps,
                        gate=gate, train_cfg=cfg, num_layers=num_layers)
    art.save(out)
    table = Table("layer", "val AUC", "train AUC", "best epoch", "steered", title="energy models")
    for layer in range(num_layers):
        table.add_row(str(layer), f"{result.val_auc[layer]:.3f}", f"{result.train_auc[layer]:.3f}",
                      str(result.best_epoch[layer]), "*" if layer in art.layers else "")
    console.print(table)
    console.print(f"artefact written to {out} (layers {art.layers}, eta {eta}, K {steps})")
    return art


@app.command("run")
def run_cmd(
    out: Annotated[Path, typer.Option(help="Run directory: collect/ (states) and artefact/ are written here.")],
    model: Model = DEFAULT_MODEL,
    benign: Annotated[list[str], typer.Option(help="Benign prompt sets (repeatable).")] = DEFAULT_BENIGN,
    harmful: Annotated[list[str], typer.Option(help="Harmful prompt sets (repeatable).")] = DEFAULT_HARMFUL,
    limit: Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per class.")] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 32,
    judge: str = DEFAULT_JUDGE,
    system: Optional[str] = None,
    top_n: int = DEFAULT_TOP_N,
    eta: float = DEFAULT_ETA,
    steps: int = DEFAULT_STEPS,
    gate: Optional[float] = None,
    widths: str = "512,256",
    epochs: int = 120,
    seed: int = 0,
    device: Device = None,
    dtype: Dtype = "auto",
    device_map: DeviceMap = None,
) -> None:
    """The whole pipeline: collect states, train energies, write OUT/artefact (manifest els.json)."""
    parsed_widths = _parse_widths(widths)
    times = {}
    t = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype, device_map=device_map)
    times["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    col = _collect(lm, out / "collect", benign, harmful, limit, max_new_tokens, batch_size, judge, system, seed)
    times["collect_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _train(col, out / "artefact", top_n, eta, steps, gate, parsed_widths, epochs, seed)
    times["train_s"] = time.perf_counter() - t
    write_atomic(out / "timings.json", json.dumps({k: round(v, 1) for k, v in times.items()}, indent=2))
    console.print("stage times: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items()))


@app.command("generate")
def generate_cmd(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to answer.")],
    model: Model = DEFAULT_MODEL,
    steer_dir: Annotated[Optional[Path], typer.Option("--steer", help="Artefact directory.")] = None,
    compare: Annotated[bool, typer.Option(help="Print the unsteered answer too (needs --steer).")] = False,
    eta: Optional[float] = None,
    steps: Optional[int] = None,
    max_new_tokens: int = 128,
    system: Optional[str] = None,
    device: Device = None,
    dtype: Dtype = "auto",
) -> None:
    """Answer prompts, steered with --steer; --compare prints `base:` and `els:` answers."""
    if compare and steer_dir is None:
        raise typer.BadParameter("--compare needs --steer")
    lm = load_model(model, device=device, dtype=dtype)
    base = generate(lm, prompts, max_new_tokens=max_new_tokens, system=system) if compare or not steer_dir else None
    steered = None
    if steer_dir is not None:
        try:
            art = Artefact.load(steer_dir)
            with steer(lm.model, art, eta=eta, steps=steps):
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
