"""`els gate`: train the harm gate on its pool alone and report it on every evaluation set (registered on the app
in els.cli.main); `els run` trains the same gate as one of its stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from els.cli.errors import at_least, load_model
from els.cli.options import Device, Dtype, Model, Overwrite, input_paths
from els.core.io import check_output_dir, save_tensors_atomic, write_atomic
from els.core.models import DEFAULT_MODEL, cache_dir
from els.training import gate as harm_gate
from els.training import pool as gate_pool


def gate_cmd(
    out: Annotated[Path, typer.Option(help="gate.safetensors and gate.json go here.")],
    model: Model = DEFAULT_MODEL,
    cache: Annotated[
        Optional[Path], typer.Option(help="Activation and embedding cache (default: the els cache's gate/).")
    ] = None,
    harm_data: Annotated[str, typer.Option(help="The pool: comma-separated [KIND=]SET\\[#N] specs.")] = ",".join(
        gate_pool.DEFAULT_POOL
    ),
    eval_specs: Annotated[
        str, typer.Option("--eval", help="Evaluation specs, reported on and deduplicated against.")
    ] = ",".join(gate_pool.DEFAULT_EVAL),
    exclude: Annotated[str, typer.Option(help="Specs only deduplicated against.")] = ",".join(
        gate_pool.DEFAULT_EXCLUDE
    ),
    alpaca_heldout: Annotated[int, typer.Option(help="Alpaca prompts outside the pool to report on (0: none).")] = 200,
    frame_max: Annotated[int, typer.Option(help="Framed prompts per kind.")] = gate_pool.DEFAULT_FRAMED,
    batch_size: int = 16,
    device: Device = None,
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Train and report the harm gate on a pool of prompt sets (what `els run` does, with a fuller report)."""
    at_least(0, alpaca_heldout=alpaca_heldout, frame_max=frame_max)
    at_least(1, batch_size=batch_size)
    inputs = input_paths(model, [s for arg in (harm_data, eval_specs, exclude) for s in arg.split(",") if s])
    try:  # before any work
        check_output_dir("--out", out, inputs, ("gate.safetensors", "gate.json"), overwrite)
        if cache is not None:
            check_output_dir("--cache", cache, inputs, (), overwrite=True)  # a cache: only never an input
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    pool, evals, excluded = (
        [gate_pool.load_spec(s) for s in arg.split(",") if s] for arg in (harm_data, eval_specs, exclude)
    )
    # Alpaca's held-out sample is disjoint from the pool's already: not deduplicated against, so the pool, and
    # the gate, are exactly those of `els run` with the same --harm-data.
    heldout = [gate_pool.alpaca_heldout(pool, alpaca_heldout)] if alpaca_heldout else []
    lm = load_model(model, device=device, dtype=dtype)
    gate, report = harm_gate.fit_gate(
        lm,
        pool,
        evals,
        cache or cache_dir() / "gate",
        frame_max=frame_max,
        exclude=excluded,
        report_only=heldout,
        batch_size=batch_size,
    )
    probabilities = harm_gate.gate_probabilities(lm, gate, harm_gate.SPOT_CHECKS)
    report["spot_checks"] = {prompt: round(p, 4) for prompt, p in zip(harm_gate.SPOT_CHECKS, probabilities)}
    save_tensors_atomic(gate.to_tensors(), out / "gate.safetensors")
    write_atomic(out / "gate.json", json.dumps(report, indent=2) + "\n")
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "search"}, indent=2))
