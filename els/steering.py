"""Steer generation: move the last position's residual stream down the energy gradient at chosen layers.

    art = Artefact.load("runs/default/artefact")
    with steer(model, art):
        model.generate(...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from els.artefact import Artefact
from els.energy import EnergyMember
from els.generation import add_pre_hooks
from els.models import block_input, decoder_blocks, with_block_input
from els.settings import RowValue, SteerSettings

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
                 positions: str | Sequence[str] | None = None, energy_dtype: torch.dtype = torch.float32,
                 check: bool = True):
        if check:
            artefact.check_model(model)
        self.model, self.artefact = model, artefact
        self.layers = sorted(layers) if layers is not None else artefact.layers
        self.settings = (settings or artefact.settings).override(eta=eta, steps=steps, threshold=threshold, gate=gate,
                                                                 harm_gate=harm_gate, positions=positions)
        self.energy_dtype = energy_dtype
        self.stats: dict[int, LayerStats] = {}
        self._rows: dict[tuple, tuple] = {}
        # [B] rows the harm gate lets through, set at the prefill, one copy per device: under a device_map
        # the steered layers may sit on different devices.
        self._allowed: dict[torch.device, torch.Tensor] = {}
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
            probe = None
            if self.settings.harm_gated and layer == self.layers[0]:
                probe = (self.artefact.probe_weight[member].to(device), self.artefact.probe_bias[member].to(device))
            self.stats[layer] = LayerStats()
            hook = self._make_hook(energy, m["hidden_norm"][str(layer)], m["gate_offset"][str(layer)],
                                   self.stats[layer], probe)
            hooks.append((blocks[layer], hook))
        self._handles += add_pre_hooks(hooks)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _make_hook(self, energy: EnergyMember, scale: float, offset: float, stats: LayerStats,
                   probe: tuple[torch.Tensor, torch.Tensor] | None):
        def hook(module, args, kwargs):
            h = block_input(args, kwargs)
            # The prefill sees the whole prompt; each decode step after it sees one new token.
            prefill = h.shape[1] > 1 or stats.rows_taken is None or stats.rows_taken.shape[0] != h.shape[0]
            if not prefill and self.settings.positions == "prompt":
                return None  # nothing to do per new token: skip even the energy
            if prefill and probe is not None:
                p_harm = torch.sigmoid(h[:, -1].float() @ probe[0] + probe[1])
                self._allowed = {p_harm.device: p_harm < self._settings(h.shape[0], p_harm.device)[3]}
            x, before, after, taken, skipped = self.descend(energy, h[:, -1], scale, offset, prefill=prefill)
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

    @torch.inference_mode()
    def descend(self, energy: EnergyMember, h: torch.Tensor, scale: float, offset: float, prefill: bool = True):
        """K normalised gradient steps on rows h [B, d]. Returns the new rows, the energies before and (at the
        prefill) after, and the steps taken and skipped by the gates per row ([B]).

        Gating is by masks, so there is no host sync per step; one check per call skips all the work when
        the gates close every row (the common case for benign tokens)."""
        batch = h.shape[0]
        x = h.float()
        eta, steps, threshold, _, every = self._settings(batch, x.device)
        eta = eta * scale
        gate = None if threshold is None else threshold + offset
        allowed = self._allowed_on(x.device)
        if not prefill and every is not None:  # a new token: rows steered at the prompt only are left alone,
            allowed = every if allowed is None else allowed & every
            steps = steps * every  # and owe no steps, so none count as skipped
        k_max = self.settings.max_steps
        taken = torch.zeros(batch, dtype=torch.long, device=x.device)
        e, g = self._energy_grad(energy, x)
        before = e
        open_rows = allowed if allowed is not None else torch.ones(batch, dtype=torch.bool, device=x.device)
        if gate is not None:
            open_rows = open_rows & (e > gate)
        if (gate is not None or allowed is not None) and not bool(open_rows.any()):
            return x, before, (before if prefill else None), taken, steps - taken
        for k in range(k_max):
            if k:
                e, g = self._energy_grad(energy, x)
            active = k < steps
            if allowed is not None:
                active = active & allowed
            if gate is not None:
                active = active & (e > gate)
            x = x - torch.where(active, eta / (g.norm(dim=-1) + 1e-8), 0.0)[:, None] * g
            taken = taken + active
        after = energy(x.to(energy.dtype)).float() if prefill else None
        return x, before, after, taken, steps - taken

    def _settings(self, batch: int, device: torch.device) -> tuple:
        """`SteerSettings.rows`, made once per batch size and device: building them on every call would copy
        host values to the device, a synchronisation per layer and token on a GPU."""
        key = (batch, device)
        if key not in self._rows:
            self._rows[key] = self.settings.rows(batch, device)
        return self._rows[key]

    def _allowed_on(self, device: torch.device) -> torch.Tensor | None:
        if not self._allowed:
            return None
        if device not in self._allowed:
            self._allowed[device] = next(iter(self._allowed.values())).to(device)
        return self._allowed[device]

    def _energy_grad(self, energy: EnergyMember, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, g = energy.energy_and_grad(x.to(energy.dtype))
        return e.float(), g.float()

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


def steer(model: nn.Module, artefact: Artefact | str | Path, **settings) -> Steering:
    """`with steer(model, artefact, eta=..., steps=...): model.generate(...)`."""
    if not isinstance(artefact, Artefact):
        artefact = Artefact.load(artefact)
    return Steering(model, artefact, **settings)
