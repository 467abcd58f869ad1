"""Steering settings: one frozen object from defaults, through checks, to per-row tensors.

`Steering`, the server and `els tune` all build steering settings here, so an artefact's defaults, an
override and a request's options mean the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

POSITIONS = ("last", "prompt")
RowValue = float | int | Sequence[float] | Sequence[int] | None


def _values(v: RowValue) -> list:
    return list(v) if isinstance(v, Sequence) else [v]


@dataclass(frozen=True)
class SteerSettings:
    """How to steer; each value is one for all rows or one per batch row (the server batches requests).

    - `eta`: step size, a fraction of the layer's mean hidden norm; `steps`: K gradient steps per pass.
    - `threshold`: the energy gate. A row is stepped only while its energy exceeds the layer's calibrated
      offset plus `threshold`; None: no gate.
    - `harm_gate`: a probability. At the prefill, the harm probe of the lowest steered layer reads each
      prompt (els.steering.gate); rows it finds harmful with at least this probability are left alone for the whole
      generation. None: no harm gate.
    - `positions`: "last" steps position -1 of every forward pass, the last prompt token and then each new
      token (the paper); "prompt" steps only the last prompt token, so the rest is decoded unchanged.
    - `project`: keep each step orthogonal to the harm probe's direction at the steered layer, so steering
      cannot make a prompt look less harmful there (one value for all rows).

    The defaults are the recipe `els run` writes into an artefact (the harm gate's threshold is then the one
    chosen on its pool's validation split): eta 0.15 was the largest of 0.1 / 0.15 / 0.2 that kept harmful
    refusal on the collection's held-out prompts within 2 points of the base model's (docs/results.md).
    """

    eta: RowValue = 0.15
    steps: RowValue = 4
    threshold: RowValue = None
    harm_gate: RowValue = 0.5
    positions: str | Sequence[str] = "last"
    project: bool = False

    def __post_init__(self) -> None:
        for name in ("eta", "steps", "threshold"):
            vals = [x for x in _values(getattr(self, name)) if x is not None]
            if name != "threshold" and len(vals) != len(_values(getattr(self, name))):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)}")
            if any(not math.isfinite(float(x)) for x in vals):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
            if name != "threshold" and any(x < 0 for x in vals):
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.project, bool):
            raise ValueError(f"project must be true or false, got {self.project!r}")
        if any(x is not None and not 0.0 <= x <= 1.0 for x in _values(self.harm_gate)):
            raise ValueError(f"harm_gate is a probability in [0, 1], got {self.harm_gate}")
        asked = [self.positions] if isinstance(self.positions, str) else list(self.positions)
        if not asked or any(p not in POSITIONS for p in asked):
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not isinstance(self.positions, str) and len(set(asked)) == 1:
            # One value for all rows: new tokens then skip the hook's work entirely.
            object.__setattr__(self, "positions", asked[0])

    @classmethod
    def from_manifest(cls, steer: dict) -> SteerSettings:
        """The settings an artefact's manifest holds (older manifests name the gate threshold `gate`)."""
        return cls(eta=steer["eta"], steps=steer["steps"], threshold=steer.get("threshold", steer.get("gate")),
                   harm_gate=steer.get("harm_gate"), positions=steer.get("positions", "last"),
                   project=bool(steer.get("project", False)))

    def manifest(self) -> dict:
        return asdict(self)

    def override(self, *, eta: RowValue = None, steps: RowValue = None, threshold: RowValue = None,
                 gate: bool | None = None, harm_gate: RowValue = None,
                 positions: str | Sequence[str] | None = None, project: bool | None = None) -> SteerSettings:
        """These settings with the given values instead; None keeps the current one. An explicit `threshold`
        turns the gate on; `gate=False` turns it off, `gate=True` on (at threshold 0 if none is set)."""
        gated = (self.threshold is not None or threshold is not None) if gate is None else gate
        new_threshold = (threshold if threshold is not None else (self.threshold or 0.0)) if gated else None
        return replace(self, eta=self.eta if eta is None else eta, steps=self.steps if steps is None else steps,
                       threshold=new_threshold, harm_gate=self.harm_gate if harm_gate is None else harm_gate,
                       positions=self.positions if positions is None else positions,
                       project=self.project if project is None else project)

    @property
    def harm_gated(self) -> bool:
        return any(x is not None for x in _values(self.harm_gate))

    @property
    def max_steps(self) -> int:
        return int(max(_values(self.steps)))

    def rows(self, batch: int, device: torch.device) -> tuple:
        """Per-row eta, steps, threshold (None: no gate), harm gate (None: none) and "steered at every new
        token" (None: all rows alike) as tensors on `device`."""
        harm = None
        if self.harm_gated:
            # A row without a harm gate (None) is always let through: p < 2 holds.
            gates = _values(self.harm_gate) if isinstance(self.harm_gate, Sequence) else [self.harm_gate] * batch
            harm = _row([2.0 if x is None else x for x in gates], batch, device, torch.float32)
        every = None
        if not isinstance(self.positions, str):
            every = _row([p == "last" for p in self.positions], batch, device, torch.bool)
        threshold = None if self.threshold is None else _row(self.threshold, batch, device, torch.float32)
        return (_row(self.eta, batch, device, torch.float32), _row(self.steps, batch, device, torch.long),
                threshold, harm, every)


def _row(value: RowValue, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim and t.shape[0] != batch:
        raise ValueError(f"per-row setting has {t.shape[0]} values for a batch of {batch}")
    return t.expand(batch) if not t.ndim else t
