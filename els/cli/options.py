"""What the `els` commands share: the recipe's defaults shown as options, option types, parsing, Ray workers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from els.core.executor import Executor
from els.core.models import DEFAULT_MODEL, LoadedModel, model_path
from els.data.prompts import load_prompts, spec_files
from els.data.promptset import Kind, PromptSet
from els.parallel.ray_executor import RayMissing, import_ray, make_executor
from els.steering.artefact import LAYER_RULES
from els.steering.settings import FLAGGED_MODES, SteerSettings
from els.training import recipe
from els.training.energy import TrainConfig

console = Console()

# The recipe's defaults live in the library (els.training.recipe.Recipe); the options show them.
DEFAULT_BENIGN = list(recipe.DEFAULT_BENIGN)
DEFAULT_HARMFUL = list(recipe.DEFAULT_HARMFUL)
DEFAULT_JUDGE = recipe.DEFAULT_COLLECT_JUDGE
TRAIN_DEFAULTS = TrainConfig()
DEFAULT_CONTRAST = TRAIN_DEFAULTS.contrast
DEFAULT_WIDTHS = ",".join(map(str, TRAIN_DEFAULTS.widths))

Model = Annotated[str, typer.Option("--model", "-m", help="HF id, local dir, .gguf file or 'default'.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: cpu).")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on CPU), float32, bfloat16, float16.")]
DeviceMap = Annotated[Optional[str], typer.Option(help="'auto' to spread a large model over devices.")]
Benign = Annotated[list[str], typer.Option(help="Benign prompt sets (repeatable).")]
Harmful = Annotated[list[str], typer.Option(help="Harmful prompt sets (repeatable).")]
Limit = Annotated[Optional[int], typer.Option(help="Seeded sample of N prompts per class.")]
LayerRule = Annotated[
    str,
    typer.Option(
        help=f"How the N steered layers are chosen: {', '.join(LAYER_RULES)} (see els.steering.artefact.steer_layers)."
    ),
]
Contrast = Annotated[
    str,
    typer.Option(
        help="States the energy contrasts: four-state (the paper: helpful and "
        "safe refusal vs false refusal and jailbreak) or benign (helpful vs "
        "false refusal; pair it with --harm-gate)."
    ),
]
HarmData = Annotated[
    str,
    typer.Option(
        help="The harm gate's pool: comma-separated [KIND=]SET[#N] specs, prompt-only "
        "forward passes (els.training.pool); 'none': a probe on the collection's "
        "own prompts."
    ),
]
DEFAULT_HARM_DATA = ",".join(recipe.Recipe().harm_data)
Ray = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Generate on Ray workers in a local Ray cluster started here (pip install 'els[ray]'; see docs/scale.md).",
    ),
]
RayAddress = Annotated[
    Optional[str],
    typer.Option(help="Join this Ray cluster instead (auto, HOST:PORT, ray://HOST:10001); implies --ray."),
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Write into an existing folder that holds other "
        "files (they are kept: only this command's own files are replaced; an "
        "input is never written).",
    ),
]
Workers = Annotated[
    Optional[int],
    typer.Option(
        help="Ray workers, each loading the model once (default: one per "
        "GPU, else 1; on CPUs each gets an equal share of the threads)."
    ),
]


def parse_ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


def parse_widths(text: str) -> tuple[int, ...]:
    widths = parse_ints(text, "widths")
    if not widths or min(widths) < 1:
        raise typer.BadParameter("widths must be positive")
    return widths


def need_ray(ray: bool, ray_address: Optional[str], workers: Optional[int]) -> None:
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
def ray_executor(
    lm: LoadedModel,
    ray: bool,
    ray_address: Optional[str],
    workers: Optional[int],
    device: Optional[str],
    dtype: str,
    device_map: Optional[str],
) -> Iterator[Executor]:
    """Where batches are generated: here, or on Ray workers (els.parallel.ray_executor), closed after the block."""
    try:
        ex = make_executor(lm, ray, ray_address, workers, device=device, dtype=dtype, device_map=device_map)
        ex.__enter__()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        yield ex
    finally:
        ex.__exit__(None, None, None)


def prompt_sets(specs: list[str], kind: Kind, limit: Optional[int], seed: int) -> list[PromptSet]:
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


# The steering settings as flags: the fields of SteerSettings under the same names, on every command that steers
# (`els train` writes them into the artefact; generate, eval and serve override the artefact's). Unset: the
# artefact's value (for `els train`, the recipe's). A gate is turned off with `off`.
_D = SteerSettings()
STEER_OPTIONS: dict[str, Any] = {
    "eta": Annotated[
        Optional[float], typer.Option(help=f"Step size, a fraction of the layer's mean hidden norm (recipe: {_D.eta}).")
    ],
    "steps": Annotated[Optional[int], typer.Option(help=f"Gradient steps K per steered pass (recipe: {_D.steps}).")],
    "energy_gate": Annotated[
        Optional[str],
        typer.Option(
            "--energy-gate",
            "--gate",
            help="Step a row only while its energy exceeds the layer's offset by this; off: always (recipe: off).",
        ),
    ],
    "harm_gate": Annotated[
        Optional[str],
        typer.Option(
            help="p(harmful) at which the harm gate flags a prompt; off: no gate (recipe: the pool's threshold)."
        ),
    ],
    "flagged": Annotated[
        Optional[str], typer.Option(help=f"Flagged prompts: {' or '.join(FLAGGED_MODES)} (recipe: {_D.flagged}).")
    ],
    "refuse_eta": Annotated[
        Optional[float], typer.Option(help=f"Step size towards refusal for flagged prompts (recipe: {_D.refuse_eta}).")
    ],
    "refuse_gate": Annotated[
        Optional[str],
        typer.Option(
            help="p(harmful) from which a flagged prompt is steered towards refusal (below it: left alone); "
            f"off: every flagged prompt (recipe: {_D.refuse_gate})."
        ),
    ],
    "positions": Annotated[
        Optional[str],
        typer.Option(
            help=f"prompt: step the last prompt token only; last: every new token too (recipe: {_D.positions})."
        ),
    ],
    "project": Annotated[
        Optional[bool], typer.Option(help="Keep steps orthogonal to the harm probe's direction (recipe: off).")
    ],
}


def _gate_value(name: str, text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"--{name.replace('_', '-')} must be a number or 'off', got {text!r}") from None


def steer_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the steering flags (STEER_OPTIONS); it receives the ones given as `steer: dict`, checked
    against SteerSettings before any work (so a bad value is one line before the model loads)."""

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in STEER_OPTIONS}
        steer = {k: v for k, v in given.items() if v is not None}
        for name in ("energy_gate", "harm_gate", "refuse_gate"):
            if name in steer:
                steer[name] = _gate_value(name, steer[name])
        for name, value in steer.items():  # one at a time, so the error names its flag
            try:
                SteerSettings().override(**{name: value})
            except ValueError as e:
                raise typer.BadParameter(f"--{name.replace('_', '-')}: {e}") from None
        command(**kwargs, steer=steer)

    params = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "steer"]
    params += [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=t)
        for k, t in STEER_OPTIONS.items()
    ]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return wrapper


def input_paths(
    model: str | None = None, specs: Iterable[str] = (), paths: Iterable[Path | None] = (), judges: Iterable[str] = ()
) -> list[Path]:
    """What a command reads, for els.core.io.check_output_*: the given paths, the local copies of --model and of
    the model judges' models (`model:NAME`), and the files named in prompt-set specs, those that exist."""
    models = [model] if model is not None else []
    models += [name.partition(":")[2] or DEFAULT_MODEL for name in judges if name.partition(":")[0] == "model"]
    found = [Path(p) for p in paths if p is not None] + [model_path(m) for m in models]
    return [p for p in found if p.exists()] + spec_files(specs)
