"""Steering settings: one frozen, checked object that every surface builds (library, CLI, server, artefact, tune).

`SteerSettings` holds one value per field for a whole generate call. The server batches requests with
different settings; `RowSettings.stack` turns one `SteerSettings` per row into the per-row tensors the hooks
read, so batching never leaks into the public type.

Spellings shared by every surface: a field's name is the same as a keyword (`steer(..., eta=0.3)`), a CLI
flag (`--eta 0.3`), a request field (`"els": {"eta": 0.3}`) and a manifest key (`steer.eta`). A gate is off
when its value is None: `harm_gate=None`, `--harm-gate off`, `"harm_gate": null`, `"energy_gate": null`,
`refuse_gate=None`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

import torch

Positions = Literal["last", "prompt"]
Flagged = Literal["refuse", "leave"]
POSITIONS: tuple[str, ...] = get_args(Positions)
FLAGGED_MODES: tuple[str, ...] = get_args(Flagged)
# Bounds a real artefact stays far inside: eta is a fraction of the layer's mean hidden norm per step, and past
# a few norms the model only babbles; more steps than this cost time and change nothing a test could see.
MAX_ETA = 4.0
MAX_STEPS = 32
MAX_ENERGY_GATE = 1e6
# Older spellings still read from manifests, flags and requests: `threshold` was the energy gate's name.
ALIASES = {"threshold": "energy_gate"}


@dataclass(frozen=True)
class SteerSettings:
    """How to steer.

    - `eta`: step size, a fraction of the layer's mean hidden norm; `steps`: K gradient steps per pass.
    - `energy_gate`: a row is stepped only while its energy exceeds the layer's calibrated offset plus this;
      None: always stepped.
    - `harm_gate`: a probability. At the prefill the artefact's harm probe reads each prompt
      (els.steering.gate); a row it rates harmful with at least this probability is *flagged*. None: no gate,
      every row descends the compliance energy.
    - `flagged`: what happens to flagged rows. "refuse" descends the safety energy (safe refusal low,
      jailbreak high) with step `refuse_eta`; "leave" generates them unsteered.
    - `refuse_gate`: with "refuse", a flagged row descends the safety energy only when its p(harmful) is at
      least this; flagged rows below it are left unsteered. Benign prompts that sound harmful mostly sit
      just above the harm gate, harmful ones near 1, so pushing only the sure ones towards refusal spares
      the former. None: every flagged row.
    - `positions`: "prompt" steps only the last prompt token at the prefill, so the answer is decoded by the
      unchanged model from a steered start; "last" steps position -1 of every forward pass (the paper).
    - `project`: keep each step orthogonal to the harm probe's direction at the steered layer.

    The defaults are the recipe `els run` writes into an artefact (the harm gate's threshold is then the one
    chosen on its pool's validation split); docs/results.md says how each was chosen.
    """

    eta: float = 0.5
    steps: int = 3
    energy_gate: float | None = None
    harm_gate: float | None = 0.5
    flagged: Flagged = "refuse"
    refuse_eta: float = 0.5
    refuse_gate: float | None = 0.98
    positions: Positions = "prompt"
    project: bool = False

    def __post_init__(self) -> None:
        for name, hi in (("eta", MAX_ETA), ("refuse_eta", MAX_ETA)):
            _number(name, getattr(self, name), 0.0, hi)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be a whole number in [0, {MAX_STEPS}], got {self.steps!r}")
        if self.energy_gate is not None:
            _number("energy_gate", self.energy_gate, -MAX_ENERGY_GATE, MAX_ENERGY_GATE)
        for name in ("harm_gate", "refuse_gate"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0.0, 1.0)
        if self.flagged not in FLAGGED_MODES:
            raise ValueError(f"flagged must be one of {FLAGGED_MODES}, got {self.flagged!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not isinstance(self.project, bool):
            raise ValueError(f"project must be true or false, got {self.project!r}")

    def override(self, **changes: Any) -> SteerSettings:
        """These settings with the given fields replaced (checked again). Only the fields named change, so
        `harm_gate=None` turns the harm gate off while leaving it out keeps it."""
        return replace(self, **canonical(changes))

    @classmethod
    def from_manifest(cls, steer: Mapping[str, Any]) -> SteerSettings:
        """The settings an artefact's `steer` section holds. Sections written before two-sided steering have
        no safety energy, so their flagged rows are left alone (`flagged="leave"`); sections written before
        `refuse_gate` steered every flagged row towards refusal."""
        known = canonical({k: v for k, v in steer.items() if k in FIELDS or k in ALIASES})
        if "energy_gate" not in known and steer.get("gate") is not None:  # the energy gate's name before format 1.1
            known["energy_gate"] = steer["gate"]
        known.setdefault("flagged", "leave")
        known.setdefault("positions", "last")
        known.setdefault("refuse_eta", known.get("eta", cls.refuse_eta))
        known.setdefault("refuse_gate", None)  # sections before it steered every flagged row
        return cls(**known)

    def manifest(self) -> dict[str, Any]:
        return asdict(self)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SteerSettings))


def canonical(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Field names from any surface's spelling; an unknown name is a one-line error naming the known ones."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            raise ValueError(f"unknown steering setting {key!r}; known: {', '.join(FIELDS)}")
        out[name] = value
    return out


def _number(name: str, value: Any, lo: float, hi: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class RowSettings:
    """One `SteerSettings` per batch row as tensors on a device: what the hooks read. A row given as None
    (a server request with steering off) takes no step and is never refused."""

    eta: torch.Tensor  # [B] float32
    steps: torch.Tensor  # [B] long
    energy_gate: torch.Tensor | None  # [B] float32 (+inf: no step), None: no row is energy-gated
    harm_gate: torch.Tensor | None  # [B] float32 (2.0: never flagged), None: no row is harm-gated
    refuse_eta: torch.Tensor  # [B] float32
    # [B] float32: the p(harmful) from which a flagged row descends the safety energy (0: every flagged row;
    # +inf: none, for rows that are not harm-gated or leave flagged rows alone)
    refuse_gate: torch.Tensor
    every: torch.Tensor | None  # [B] bool: stepped at every new token; None: no row is
    max_steps: int

    @classmethod
    def stack(cls, rows: Sequence[SteerSettings | None], device: torch.device) -> RowSettings:
        live = [r for r in rows if r is not None]

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        energy_gated = any(r.energy_gate is not None for r in live)
        harm_gated = any(r.harm_gate is not None for r in live)
        every = any(r.positions == "last" for r in live)
        return cls(
            eta=col([r.eta if r else 0.0 for r in rows], torch.float32),
            steps=col([r.steps if r else 0 for r in rows], torch.long),
            energy_gate=col(
                [-math.inf if r and r.energy_gate is None else r.energy_gate if r else math.inf for r in rows],
                torch.float32,
            )
            if energy_gated
            else None,
            harm_gate=col([2.0 if not r or r.harm_gate is None else r.harm_gate for r in rows], torch.float32)
            if harm_gated
            else None,
            refuse_eta=col([r.refuse_eta if r else 0.0 for r in rows], torch.float32),
            refuse_gate=col(
                [
                    r.refuse_gate or 0.0 if r and r.harm_gate is not None and r.flagged == "refuse" else math.inf
                    for r in rows
                ],
                torch.float32,
            ),
            every=col([bool(r and r.positions == "last") for r in rows], torch.bool) if every else None,
            max_steps=max((r.steps for r in live), default=0),
        )
