"""Steer generation: move the last prompt position's residual stream down an energy gradient at chosen layers.

    art = Artefact.load("runs/default/artefact")
    with steer(model, art):
        model.generate(...)

Two-sided: at each prefill the artefact's harm gate reads every row. A row it passes descends the compliance
energy (helpful low, false refusal high); a row it flags descends the safety energy (safe refusal low,
jailbreak high) when the settings say `flagged="refuse"` and its p(harmful) reaches `refuse_gate`, or is left
alone (`"leave"`, or below `refuse_gate`: `sides()` says which).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from els.core.hooks import PreHook, add_pre_hooks
from els.core.models import block_input, decoder_blocks, with_block_input
from els.steering.artefact import Artefact
from els.steering.energy import EnergyMember
from els.steering.gate import GateState, read_gate
from els.steering.settings import RowSettings, SteerSettings

Side = Literal["answer", "refuse", "unsure", "leave", "off"]
# `descend_rows`: new rows [B, d], energies before and after (None without `with_after`), steps taken and skipped
Descent = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


@dataclass
class LayerStats:
    """What steering did at one layer. Per-row values are of the latest generate call (reset at each
    prefill); the totals add up every call since attach. Energies are of the side each row took."""

    energy_before: torch.Tensor | None = None  # [B] last prompt token, before steering
    energy_after: torch.Tensor | None = None  # [B] and after
    rows_taken: torch.Tensor | None = None  # [B] steps taken per row
    rows_skipped: torch.Tensor | None = None  # [B] steps the gates skipped per row
    steps_taken: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    steps_skipped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))


@dataclass(frozen=True)
class _Layer:
    comply: EnergyMember
    refuse: EnergyMember | None  # the safety energy, where the artefact has one
    scale: float  # the layer's mean hidden norm: eta is a fraction of it
    offset: float  # the compliance energy's calibrated gate offset
    direction: torch.Tensor | None  # unit harm-probe direction (project=True)
    stats: LayerStats


class Steering:
    """Forward pre-hooks that take K normalised energy-gradient steps at the last position.

    `settings`: one `SteerSettings` for every row (default: the artefact's), changed by any keyword
    override (`eta=0.5`, `harm_gate=None`, ...: the fields of `SteerSettings`), or one `SteerSettings` per
    batch row (None: that row unsteered), as the server batches requests. `layers` overrides the artefact's.
    Use as a context manager, or attach()/remove().
    """

    def __init__(
        self,
        model: nn.Module,
        artefact: Artefact,
        settings: SteerSettings | Sequence[SteerSettings | None] | None = None,
        *,
        layers: Sequence[int] | None = None,
        energy_dtype: torch.dtype = torch.float32,
        check: bool = True,
        **overrides: Any,
    ):
        if check:
            artefact.check_model(model)
        self.model, self.artefact = model, artefact
        self.layers = sorted(layers) if layers is not None else artefact.layers
        self.rows: tuple[SteerSettings | None, ...] | None = None  # per-row settings, or None: one for all
        if settings is None or isinstance(settings, SteerSettings):
            self.settings = (settings or artefact.settings).override(**overrides)
            live = [self.settings]
        else:
            if overrides:
                raise ValueError(f"per-row settings take no overrides, got {sorted(overrides)}")
            self.rows = tuple(settings)
            live = [r for r in self.rows if r is not None]
            self.settings = live[0] if live else artefact.settings
        if any(r.harm_gate is not None and r.flagged == "refuse" for r in live) and artefact.safety is None:
            raise ValueError(
                "flagged='refuse' needs a safety energy; this artefact has none (written before "
                "two-sided steering): use flagged='leave' or train it again"
            )
        self.harm_gated = any(r.harm_gate is not None for r in live)
        self.project = any(r.project for r in live)
        self.energy_dtype = energy_dtype
        self.stats: dict[int, LayerStats] = {}
        self._row_cache: dict[tuple, RowSettings] = {}
        self._gate: GateState | None = None  # set at each prefill by the harm gate's pre-pass
        # The gate's [B] mask and p(harmful), one copy per device: under a device_map the steered layers may sit
        # on different devices. Keyed by the mask it copies, so a new prefill's reading replaces the copies.
        self._read: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._read_of: torch.Tensor | None = None
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
            direction = self.artefact.gate.direction(layer) if self.project else None
            if self.project and direction is None:
                raise ValueError(f"project=True needs a harm-probe direction at layer {layer}; the artefact has none")
            safety = self.artefact.safety
            self.stats[layer] = LayerStats()
            spec = _Layer(
                self.artefact.energy.member(member, device, self.energy_dtype),
                None if safety is None else safety.member(member, device, self.energy_dtype),
                m.hidden_norm_of(layer),
                m.gate_offset_of(layer),
                None if direction is None else direction.to(device),
                self.stats[layer],
            )
            hooks.append((blocks[layer], self._make_hook(spec)))
        if self.harm_gated:
            self._gate = self._exit.enter_context(read_gate(self.model, self.artefact.gate, self._harm_thresholds))
        self._handles += add_pre_hooks(hooks)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._exit.close()  # the gate's hook goes; its last reading stays for `sides`

    def __enter__(self) -> Steering:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _make_hook(self, spec: _Layer) -> PreHook:
        stats = spec.stats

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._gate is not None and self._gate.busy:
                return None  # the harm gate's pre-pass reads the unsteered model
            h = block_input(args, kwargs)
            # The prefill sees the whole prompt; each decode step after it sees one new token.
            prefill = h.shape[1] > 1 or stats.rows_taken is None or stats.rows_taken.shape[0] != h.shape[0]
            if not prefill and self._settings(h.shape[0], h.device).every is None:
                return None  # no row is steered per new token: skip even the energy
            x, before, after, taken, skipped = self.descend(spec, h[:, -1], prefill=prefill)
            if prefill:
                stats.energy_before, stats.energy_after = before, after
                stats.rows_taken, stats.rows_skipped = taken, skipped
            else:
                assert stats.rows_taken is not None and stats.rows_skipped is not None  # set at the prefill
                stats.rows_taken, stats.rows_skipped = stats.rows_taken + taken, stats.rows_skipped + skipped
            stats.steps_taken = stats.steps_taken + taken.sum()
            stats.steps_skipped = stats.steps_skipped + skipped.sum()
            h = h.clone()
            h[:, -1] = x.to(h.dtype)
            return with_block_input(args, kwargs, h)

        return hook

    def descend(self, spec: _Layer, h: torch.Tensor, prefill: bool = True) -> Descent:
        """`descend_rows` on rows h [B, d] with this steering's per-row settings, gates and positions: rows
        the harm gate passes descend the compliance energy, flagged rows in refuse mode the safety energy."""
        rs = self._settings(h.shape[0], h.device)
        read = self._reading_on(h.device)
        allowed = None if read is None else read[0]
        refuse = None if read is None or spec.refuse is None else ~read[0] & (read[1] >= rs.refuse_gate)
        steps = rs.steps
        if not prefill and rs.every is not None:  # a new token: rows steered at the prompt only are left alone,
            allowed = rs.every if allowed is None else allowed & rs.every
            refuse = None if refuse is None else refuse & rs.every
            steps = steps * rs.every  # and owe no steps, so none count as skipped
        comply = descend_rows(
            spec.comply,
            h,
            rs.eta * spec.scale,
            steps,
            rs.max_steps,
            threshold=None if rs.energy_gate is None else rs.energy_gate + spec.offset,
            allowed=allowed,
            direction=spec.direction,
            with_after=prefill,
        )
        if refuse is None or spec.refuse is None or not bool(refuse.any()):
            return comply
        safe = descend_rows(
            spec.refuse, h, rs.refuse_eta * spec.scale, steps, rs.max_steps, allowed=refuse, with_after=prefill
        )
        x, before, after, taken, skipped = comply
        safe_x, safe_before, safe_after, safe_taken, safe_skipped = safe
        return (
            torch.where(refuse[:, None], safe_x, x),
            torch.where(refuse, safe_before, before),
            None if after is None or safe_after is None else torch.where(refuse, safe_after, after),
            torch.where(refuse, safe_taken, taken),
            torch.where(refuse, safe_skipped, skipped),
        )

    def _settings(self, batch: int, device: torch.device) -> RowSettings:
        """The per-row settings, made once per batch size and device: building them on every call would copy
        host values to the device, a synchronisation per layer and token on a GPU."""
        key = (batch, device)
        if key not in self._row_cache:
            rows = self.rows if self.rows is not None else (self.settings,) * batch
            if len(rows) != batch:
                raise ValueError(f"per-row settings have {len(rows)} rows for a batch of {batch}")
            self._row_cache[key] = RowSettings.stack(rows, device)
        return self._row_cache[key]

    def _harm_thresholds(self, batch: int, device: torch.device) -> torch.Tensor:
        thresholds = self._settings(batch, device).harm_gate
        assert thresholds is not None, "the gate is read only when some row is harm-gated"
        return thresholds

    def _reading_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The latest prefill's (allowed [B], p(harmful) [B]) on `device`; None without a harm gate."""
        state = self._gate
        if state is None or state.allowed is None or state.p_harm is None:
            return None
        if state.allowed is not self._read_of:
            self._read, self._read_of = {}, state.allowed
        if device not in self._read:
            self._read[device] = (state.allowed.to(device), state.p_harm.to(device))
        return self._read[device]

    def sides(self) -> list[tuple[Side, float | None]]:
        """Per row of the latest prefill, in that batch's order (`generate` sorts prompts into batches by
        length: run one batch in order to read them per prompt): which way it was steered and the harm gate's
        p(harmful) (None without a gate). "answer": the compliance energy; "refuse": the safety energy;
        "unsure": flagged but under `refuse_gate`, left alone; "leave": flagged and left alone (`flagged="leave"`);
        "off": a row given no settings."""
        p = None if self._gate is None or self._gate.p_harm is None else self._gate.p_harm.tolist()
        n = len(p) if p is not None else len(self.rows) if self.rows is not None else 1
        rows = self.rows if self.rows is not None else (self.settings,) * n
        out: list[tuple[Side, float | None]] = []
        for i, r in enumerate(rows):
            prob = None if p is None or r is None or r.harm_gate is None else p[i]
            if r is None:
                out.append(("off", prob))
            elif prob is None or r.harm_gate is None or prob < r.harm_gate:
                out.append(("answer", prob))
            else:
                if r.flagged == "leave":
                    out.append(("leave", prob))
                else:
                    out.append(("refuse" if prob >= (r.refuse_gate or 0.0) else "unsure", prob))
        return out

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
def descend_rows(
    energy: EnergyMember,
    h: torch.Tensor,
    eta: torch.Tensor,
    steps: torch.Tensor,
    max_steps: int,
    *,
    threshold: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    direction: torch.Tensor | None = None,
    with_after: bool = True,
) -> Descent:
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


def steer(
    model: nn.Module,
    artefact: Artefact | str | Path,
    settings: SteerSettings | Sequence[SteerSettings | None] | None = None,
    **overrides: Any,
) -> Steering:
    """`with steer(model, artefact, eta=..., steps=...): model.generate(...)` (see `Steering`)."""
    if not isinstance(artefact, Artefact):
        artefact = Artefact.load(artefact)
    return Steering(model, artefact, settings, **overrides)
