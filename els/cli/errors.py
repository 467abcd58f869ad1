"""One-line errors for the `els` command line.

A bad flag, file or artefact ends the command with `error: ...` on one line naming the flag or file, exit code 2,
no traceback; `els --debug COMMAND` prints the traceback first. Commands check their numbers with `at_least`
before they load or write anything, so a mistyped flag leaves no output folder to refuse the corrected rerun.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from typer.core import TyperGroup

from els.core import models

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException  # type: ignore[assignment]

DTYPES = ("auto", "float32", "bfloat16", "float16")
# What a user can cause: a bad flag (click's usage errors), a bad value or a missing or unreadable file.
USER_ERRORS = (ClickException, ValueError, OSError)


def one_line(e: BaseException) -> str:
    if isinstance(e, typer.BadParameter) and e.param is None and e.param_hint is None:
        msg = e.message  # raised by our own checks, which name the flag themselves
    else:
        msg = e.format_message() if isinstance(e, ClickException) else str(e) or type(e).__name__
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


class ErrorsGroup(TyperGroup):
    """The app's group: a user error in any command becomes one line and exit code 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if ctx.params.get("debug"):
                cause = e.__cause__ or e.__context__ if isinstance(e, ClickException) else None
                traceback.print_exception(cause or e)
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(2) from None


def debug_option(
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of an error.")] = False,
) -> None:
    pass  # read by ErrorsGroup.invoke from the context


def at_least(low: int, **flags: int | None) -> None:
    """Refuse any flag (by parameter name) below `low`; None means unset."""
    for name, value in flags.items():
        if value is not None and value < low:
            raise typer.BadParameter(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def within(low: float, high: float, **flags: float | None) -> None:
    """Refuse any flag (by parameter name) outside [low, high], NaN included; None means unset."""
    for name, value in flags.items():
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"--{name.replace('_', '-')} must be within [{low:g}, {high:g}], got {value}")


def check_device(device: str | None) -> None:
    """Refuse a device torch does not know or this machine lacks, before a model is loaded onto it."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise typer.BadParameter(
            f"--device {device}: no such CUDA device on this machine ({torch.cuda.device_count()} visible)"
        )
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise typer.BadParameter(f"--device {device}: MPS is not available on this machine")
    if d.type not in ("cpu", "cuda", "mps"):
        raise typer.BadParameter(f"--device {device}: only cpu, cuda and mps are supported")


def check_dtype(dtype: Any) -> None:
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def load_model(name: str = models.DEFAULT_MODEL, **kwargs: Any) -> models.LoadedModel:
    """els.core.models.load_model with a one-line error naming --model, --device or --dtype."""
    check_dtype(kwargs.get("dtype", "auto"))
    check_device(kwargs.get("device"))
    try:
        return models.load_model(name, **kwargs)
    except (OSError, ValueError) as e:
        if name == models.DEFAULT_MODEL or name.endswith(".gguf") or Path(name).exists():
            raise ValueError(f"--model {name}: {one_line(e)}") from e
        raise ValueError(
            f"--model {name}: no such model locally or on the Hugging Face hub (or the hub is unreachable: offline?)"
        ) from e
