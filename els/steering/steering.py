"""Steer generation: move the last position's residual stream down the energy gradient at chosen layers.

    art = Artefact.load("runs/default/artefact")
    with steer(model, art):
        model.generate(...)
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from els.core.hooks import add_pre_hooks
from els.core.models import block_input, decoder_blocks, with_block_input
from els.steering.artefact import Artefact
from els.steering.energy import EnergyMember
from els.steering.gate import GateState, read_gate
from els.steering.settings import RowValue, SteerSettings


@dataclass
class LayerStats:
    """What steering did at one layer. Per-row values are of the latest generate call (reset at each
    prefill); the totals add up every call since attach."""

    energy_before: torch.Tensor | None = None  # [B] last prompt token, before steering
    energy_after: torch.Tensor | None = None  # [B] and after
    rows_taken: torch.Tensor | None = None  # [B] steps taken per row
    rows_skipped: torch.Tensor | None = None  # [B] steps the gates skipped per row
    steps_taken: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    steps_skipped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))


class Steering:
    """Forward pre-hooks that take K normalised energy-gradient steps at position -1 of every forward pass.

    What to do is a `SteerSettings` (eta, steps, the energy gate's threshold, the harm gate, positions):
    the artefact's own, or `settings`, with any of the keyword values overriding it (see
    `SteerSettings.override`; `gate=False` turns the energy gate off). `layers` overrides the artefact's.
    Use as a context manager, or attach()/remove().
    """

    def __init__(self, model: nn.Module, artefact: Artefact, *, layers: Sequence[int] | None = None,
                 settings: SteerSettings | None = None, eta: RowValue = None, steps: RowValue = None,
                 threshold: RowValue = None, gate: bool | None = None, harm_gate: RowValue = None,
                 positions: str | Sequence[str] | None = None, project: bool | None = None,
                 energy_dtype: torch.dtype = torch.float32,
                 check: bool = True):
        if check:
            artefact.check_model(model)
        self.model, self.artefact = model, artefact
        self.layers = sorted(layers) if layers is not None else artefact.layers
        self.settings = (settings or artefact.settings).override(
            eta=eta, steps=steps, threshold=threshold, gate=gate, harm_gate=harm_gate, positions=positions,
            project=project)
        self.energy_dtype = energy_dtype
        self.stats: dict[int, LayerStats] = {}
        self._rows: dict[tuple, tuple] = {}
        self._gate: GateState | None = None  # set at each prefill by the harm gate's pre-pass
        # The gate's [B] mask, one copy per device: under a device_map the steered layers may sit on
        # different devices. Keyed by the mask it copies, so a new prefill's mask replaces the copies.
        self._allowed: dict[torch.device, torch.Tensor] = {}
        self._allowed_of: torch.Tensor | None = None
        self._exit = ExitStack()
        self._handles: list = []

    def attach(self) -> Steering:
        blocks = decoder_blocks(self.model)
        m = self.artefact.manifest
        hooks = []
        for layer in self.layers:
            if not 0 <= layer < len(blocks):
                raise ValueError(f"layer {layer} out of range for a model with {len(blocks)} layers")
            member = self.artefact.member_index(layer)
            device = next(blocks[layer].parameters()).device
            energy = self.artefact.energy.member(member, device, self.energy_dtype)
            direction = self.artefact.gate.direction(layer) if self.settings.project else None
            if self.settings.project and direction is None:
                raise ValueError(f"project=True needs a harm-probe direction at layer {layer}; the artefact has none")
            self.stats[layer] = LayerStats()
            hook = self._make_hook(energy, m["hidden_norm"][str(layer)], m["gate_offset"][str(layer)],
                                   self.stats[layer], None if direction is None else direction.to(device))
            hooks.append((blocks[layer], hook))
        if self.settings.harm_gated:
            self._gate = self._exit.enter_context(
                read_gate(self.model, self.artefact.gate, lambda batch, device: self._settings(batch, device)[3]))
        self._handles += add_pre_hooks(hooks)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exit.close()
        self._gate = None

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _make_hook(self, energy: EnergyMember, scale: float, offset: float, stats: LayerStats,
                   direction: torch.Tensor | None):
        def hook(module, args, kwargs):
            if self._gate is not None and self._gate.busy:
                return None  # the harm gate's pre-pass reads the unsteered model
            h = block_input(args, kwargs)
            # The prefill sees the whole prompt; each decode step after it sees one new token.
            prefill = h.shape[1] > 1 or stats.rows_taken is None or stats.rows_taken.shape[0] != h.shape[0]
            if not prefill and self.settings.positions == "prompt":
                return None  # nothing to do per new token: skip even the energy
            x, before, after, taken, skipped = self.descend(energy, h[:, -1], scale, offset, prefill=prefill,
                                                            direction=direction)
            if prefill:
                stats.energy_before, stats.energy_after = before, after
                stats.rows_taken, stats.rows_skipped = taken, skipped
            else:
                stats.rows_taken, stats.rows_skipped = stats.rows_taken + taken, stats.rows_skipped + skipped
            stats.steps_taken = stats.steps_taken + taken.sum()
            stats.steps_skipped = stats.steps_skipped + skipped.sum()
            h = h.clone()
            h[:, -1] = x.to(h.dtype)
            return with_block_input(args, kwargs, h)

        return hook

    def descend(self, energy: EnergyMember, h: torch.Tensor, scale: float, offset: float, prefill: bool = True,
                direction: torch.Tensor | None = None):
        """`descend_rows` on rows h [B, d] with this steering's per-row settings, gates and positions."""
        eta, steps, threshold, _, every = self._settings(h.shape[0], h.device)
        allowed = self._allowed_on(h.device)
        if not prefill and every is not None:  # a new token: rows steered at the prompt only are left alone,
            allowed = every if allowed is None else allowed & every
            steps = steps * every  # and owe no steps, so none count as skipped
        return descend_rows(energy, h, eta * scale, steps, self.settings.max_steps,
                            threshold=None if threshold is None else threshold + offset, allowed=allowed,
                            direction=direction, with_after=prefill)

    def _settings(self, batch: int, device: torch.device) -> tuple:
        """`SteerSettings.rows`, made once per batch size and device: building them on every call would copy
        host values to the device, a synchronisation per layer and token on a GPU."""
        key = (batch, device)
        if key not in self._rows:
            self._rows[key] = self.settings.rows(batch, device)
        return self._rows[key]

    def _allowed_on(self, device: torch.device) -> torch.Tensor | None:
        allowed = None if self._gate is None else self._gate.allowed
        if allowed is None:
            return None
        if allowed is not self._allowed_of:
            self._allowed, self._allowed_of = {allowed.device: allowed}, allowed
        if device not in self._allowed:
            self._allowed[device] = allowed.to(device)
        return self._allowed[device]

    def report(self) -> dict:
        """Per-layer diagnostics as plain numbers (this is where the host sync happens)."""
        out = {}
        for layer, s in self.stats.items():
            out[layer] = {
                "energy_before": None if s.energy_before is None else s.energy_before.tolist(),
                "energy_after": None if s.energy_after is None else s.energy_after.tolist(),
                "steps_taken": int(s.steps_taken),
                "steps_skipped": int(s.steps_skipped),
            }
        return out


@torch.inference_mode()
def descend_rows(energy: EnergyMember, h: torch.Tensor, eta: torch.Tensor, steps: torch.Tensor, max_steps: int, *,
                 threshold: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                 direction: torch.Tensor | None = None, with_after: bool = True):
    """The steering step on plain tensors, with no hooks or model: what an engine that batches requests its
    own way (vLLM's model runner) calls with per-row values gathered by row id, e.g. `eta=table[row_ids]`.

    Rows h [B, d]; per row: `eta` [B] (absolute step length), `steps` [B] (K), `threshold` [B] (absolute
    energy below which a row is not stepped; None: no energy gate), `allowed` [B] (the harm gate; None: all).
    Up to `max_steps` normalised gradient steps, each kept orthogonal to the unit `direction` [d] if given.
    Returns the new rows [B, d] (float32), the energies before and (with `with_after`) after, and the steps
    taken and skipped by the gates per row. Gating is by masks, so there is no host sync per step; one check
    per call skips all the work when the gates close every row (the common case for benign tokens)."""
    x = h.float()
    taken = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    e, g = _energy_grad(energy, x)
    before = e
    open_rows = allowed if allowed is not None else torch.ones_like(taken, dtype=torch.bool)
    if threshold is not None:
        open_rows = open_rows & (e > threshold)
    if (threshold is not None or allowed is not None) and not bool(open_rows.any()):
        return x, before, (before if with_after else None), taken, steps - taken
    for k in range(max_steps):
        if k:
            e, g = _energy_grad(energy, x)
        active = k < steps
        if allowed is not None:
            active = active & allowed
        if threshold is not None:
            active = active & (e > threshold)
        if direction is not None:
            g = g - (g @ direction)[:, None] * direction
        x = x - torch.where(active, eta / (g.norm(dim=-1) + 1e-8), 0.0)[:, None] * g
        taken = taken + active
    after = energy(x.to(energy.dtype)).float() if with_after else None
    return x, before, after, taken, steps - taken


def _energy_grad(energy: EnergyMember, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, g = energy.energy_and_grad(x.to(energy.dtype))
    return e.float(), g.float()


def steer(model: nn.Module, artefact: Artefact | str | Path, **settings) -> Steering:
    """`with steer(model, artefact, eta=..., steps=...): model.generate(...)`."""
    if not isinstance(artefact, Artefact):
        artefact = Artefact.load(artefact)
    return Steering(model, artefact, **settings)
