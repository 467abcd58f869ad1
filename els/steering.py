"""Steer generation: move the last position's residual stream down the energy gradient at chosen layers.

    art = Artefact.load("run/artefact")
    with steer(model, art):
        model.generate(...)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from els.collect import Collection
from els.energy import CONTRASTS, EnergyMember, EnergyStack, TrainConfig, TrainResult, fit_harm_probe, stratified_split
from els.models import block_input, config_fingerprint, decoder_blocks, with_block_input

FORMAT_VERSION = 1
MANIFEST = "els.json"
WEIGHTS = "energy.safetensors"
LAYER_RULES = ("top_auc", "late_block", "last")  # see steer_layers
POSITIONS = ("last", "prompt")  # see Steering


def package_version() -> str:
    try:
        return version("els")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Artefact:
    """Trained energy models for every recorded layer plus the manifest saying how to steer with them."""

    energy: EnergyStack  # member i is the model of layer manifest["trained_layers"][i]
    manifest: dict
    probe_weight: torch.Tensor  # [S, d] harm probe per trained layer (see energy.fit_harm_probe)
    probe_bias: torch.Tensor  # [S]

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["steer"]["layers"])

    def member(self, layer: int) -> int:
        try:
            return self.manifest["trained_layers"].index(layer)
        except ValueError:
            raise ValueError(f"the artefact has no energy model for layer {layer}") from None

    def subset(self, layers: list[int]) -> Artefact:
        """The same artefact holding only these layers' models (smaller, for serving)."""
        members = [self.member(layer) for layer in layers]
        return Artefact(self.energy.select(members), {**self.manifest, "trained_layers": list(layers)},
                        self.probe_weight[members], self.probe_bias[members])

    def save(self, path: Path | str) -> None:
        """Write atomically: a reader sees the old artefact or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        tensors = {k: v.contiguous() for k, v in self.energy.state_dict().items()}
        tensors |= {"probe.weight": self.probe_weight.contiguous(), "probe.bias": self.probe_bias.contiguous()}
        save_file(tensors, tmp / WEIGHTS)
        (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path | str) -> Artefact:
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"{path} is not an ELS artefact (no {MANIFEST})")
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: artefact format {manifest.get('format_version')}, this els reads {FORMAT_VERSION}")
        e = manifest["energy"]
        energy = EnergyStack(len(manifest["trained_layers"]), manifest["hidden_size"], tuple(e["widths"]), e["dropout"])
        tensors = load_file(path / WEIGHTS)
        for name, t in tensors.items():
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: energy weights {name} contain NaN or infinity")
        probe_weight, probe_bias = tensors.pop("probe.weight"), tensors.pop("probe.bias")
        energy.load_state_dict(tensors)
        return cls(energy.eval(), manifest, probe_weight, probe_bias)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose architecture differs from the one the energies were trained on."""
        m = self.manifest
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        problems = []
        if (fp := config_fingerprint(model)) != m["model_fingerprint"]:
            problems.append(f"config fingerprint {fp} != {m['model_fingerprint']}")
        if hidden != m["hidden_size"]:
            problems.append(f"hidden size {hidden} != {m['hidden_size']}")
        if len(decoder_blocks(model, m.get("blocks_path"))) != m["num_layers"]:
            problems.append(f"{len(decoder_blocks(model, m.get('blocks_path')))} layers != {m['num_layers']}")
        if problems:
            raise ValueError(
                f"this artefact was trained on {m['base_model']!r} and does not fit this model: {'; '.join(problems)}"
            )


def make_artefact(result: TrainResult, collection: Collection, *, trained_layers: list[int], top_n: int,
                  eta: float, steps: int, gate: float | None, train_cfg: TrainConfig, num_layers: int,
                  harm_gate: float | None = None, layer_rule: str = "top_auc", positions: str = "last",
                  blocks_path: str | None = None) -> Artefact:
    """Record per-layer validation AUC, choose N layers by `layer_rule` (see `steer_layers`), and calibrate
    per-layer gate offsets and step scales."""
    if layer_rule not in LAYER_RULES:
        raise ValueError(f"layer rule must be one of {LAYER_RULES}, got {layer_rule!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    acts = collection.activations[:, trained_layers].float()
    good = torch.tensor([s in CONTRASTS[train_cfg.contrast][0] for s in collection.states])
    va = torch.tensor(result.val_index)
    with torch.no_grad():
        e_val = result.energy(acts[va].transpose(0, 1))  # [S, V]
    offsets = [_youden_threshold(e, good[va]) for e in e_val]
    harmful = torch.tensor([r.kind == "harmful" for r in collection.records])
    # The probe reads every prompt, whatever rows the energy used: its own split over all states (the same
    # split as the energy's under the four-state contrast).
    probe_tr, probe_va = stratified_split(collection.states, train_cfg.val_fraction, train_cfg.seed)
    probe_w, probe_b = fit_harm_probe(collection.activations[:, trained_layers], harmful, probe_tr)
    with torch.no_grad():
        p_val = torch.einsum("nsd,sd->sn", acts[probe_va], probe_w) + probe_b[:, None]
    probe_acc = ((p_val > 0) == harmful[probe_va]).float().mean(1)
    m = collection.meta
    manifest = {
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "base_model": m["model"],
        "model_fingerprint": m["model_fingerprint"],
        "hidden_size": acts.shape[-1],
        "num_layers": num_layers,
        "blocks_path": blocks_path,
        "trained_layers": trained_layers,
        "layer_auc": {str(layer): round(a, 4) for layer, a in zip(trained_layers, result.val_auc)},
        "layer_train_auc": {str(layer): round(a, 4) for layer, a in zip(trained_layers, result.train_auc)},
        # eta is a fraction of this norm, so one setting means the same push at every layer and model.
        "hidden_norm": {str(layer): round(float(acts[:, i].norm(dim=-1).mean()), 4)
                        for i, layer in enumerate(trained_layers)},
        # The loss is shift-invariant, so energies are only comparable within a layer: the gate compares
        # E - offset, with offset the layer's best validation split between good and bad.
        "gate_offset": {str(layer): round(float(o), 6) for layer, o in zip(trained_layers, offsets)},
        "probe_val_acc": {str(layer): round(float(a), 4) for layer, a in zip(trained_layers, probe_acc)},
        "steer": {"layers": None, "layer_rule": layer_rule, "eta": eta, "steps": steps, "gate": gate,
                  "harm_gate": harm_gate, "positions": positions},
        "energy": {"contrast": train_cfg.contrast, "widths": list(train_cfg.widths), "dropout": train_cfg.dropout,
                   "tau": train_cfg.tau,
                   "lr": train_cfg.lr, "batch_size": train_cfg.batch_size, "epochs_run": result.epochs_run,
                   "seed": train_cfg.seed},
        "data": {"counts": collection.counts(), "sets": m["sets"], "judge": m["judge"],
                 "max_new_tokens": m["max_new_tokens"], "system": m["system"]},
    }
    manifest["steer"]["layers"] = steer_layers(manifest, layer_rule, top_n)
    return Artefact(result.energy, manifest, probe_w, probe_b)


def steer_layers(manifest: dict, rule: str, n: int) -> list[int]:
    """top_auc: the n trained layers of best validation AUC. late_block: the n consecutive layers of best mean
    AUC in the model's second half (steering a block keeps the push coherent from layer to layer). last: the
    n last trained layers (a push there reaches the logits with the fewest layers left to undo it)."""
    auc = {int(k): v for k, v in manifest["layer_auc"].items()}
    if rule == "top_auc":
        return sorted(sorted(auc, key=lambda layer: (-auc[layer], layer))[:n])
    if rule == "last":
        return sorted(auc)[-n:]
    late = [layer for layer in sorted(auc) if layer >= manifest["num_layers"] // 2] or sorted(auc)
    n = min(n, len(late))
    windows = [late[i : i + n] for i in range(len(late) - n + 1) if late[i + n - 1] - late[i] == n - 1]
    return max(windows or [late[-n:]], key=lambda w: sum(auc[layer] for layer in w))


def _youden_threshold(e: torch.Tensor, good: torch.Tensor) -> float:
    """The energy that best separates good (below) from bad (above): max TPR - FPR."""
    cands = e.sort().values
    best, best_t = -2.0, float(cands[0])
    for t in cands.tolist():
        j = float(((e[~good] > t).float().mean() - (e[good] > t).float().mean()))
        if j > best:
            best, best_t = j, t
    return best_t


RowValue = float | int | Sequence[float] | Sequence[int] | None


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

    `eta` (a fraction of the layer's mean hidden norm), `steps` and `threshold` override the artefact's
    settings, as one value or one per batch row (the server batches requests with different settings).
    Two optional gates decide which rows are stepped:
    - the energy gate (`threshold`, or the manifest's `gate`): a row is stepped only while its energy
      exceeds the layer's calibrated offset plus `threshold`; `gate=False` turns it off;
    - the harm gate (`harm_gate`, a probability): at the prefill, the harm probe of the lowest steered layer
      reads each prompt; rows it finds harmful with at least this probability are left alone for the
      whole generation. One value, or one per row (None: no harm gate for that row).
    `positions`: "last" steps position -1 of every forward pass, the last prompt token and then each new
    token (the paper); "prompt" steps only the last prompt token, so the answer's opening is steered and
    the rest is decoded unchanged (no edits compounding over the answer, no cost per new token). One
    value or one per row.
    Use as a context manager, or attach()/remove().
    """

    def __init__(self, model: nn.Module, artefact: Artefact, *, layers: Sequence[int] | None = None,
                 eta: RowValue = None, steps: RowValue = None, threshold: RowValue = None, gate: bool | None = None,
                 harm_gate: RowValue = None, positions: str | Sequence[str] | None = None, energy_dtype: torch.dtype = torch.float32,
                 check: bool = True):
        if check:
            artefact.check_model(model)
        s = artefact.manifest["steer"]
        self.model, self.artefact = model, artefact
        self.layers = sorted(layers) if layers is not None else artefact.layers
        self.eta = s["eta"] if eta is None else eta
        self.steps = s["steps"] if steps is None else steps
        use_gate = (s["gate"] is not None or threshold is not None) if gate is None else gate
        self.threshold = (threshold if threshold is not None else (s["gate"] or 0.0)) if use_gate else None
        self.harm_gate = s.get("harm_gate") if harm_gate is None else harm_gate
        self.positions = s.get("positions", "last") if positions is None else positions
        asked = [self.positions] if isinstance(self.positions, str) else self.positions
        if any(p not in POSITIONS for p in asked):
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if not isinstance(self.positions, str) and len(set(self.positions)) == 1:
            self.positions = self.positions[0]  # one value for all rows: new tokens skip the hook's work entirely
        for name, v in (("eta", self.eta), ("steps", self.steps), ("threshold", self.threshold)):
            vals = v if isinstance(v, Sequence) else [v]
            if any(x is not None and not torch.isfinite(torch.tensor(float(x))) for x in vals):
                raise ValueError(f"{name} must be finite, got {v}")
            if name != "threshold" and any(x < 0 for x in vals):
                raise ValueError(f"{name} must be >= 0, got {v}")
        gates = self.harm_gate if isinstance(self.harm_gate, Sequence) else [self.harm_gate]
        if any(x is not None and not 0.0 <= x <= 1.0 for x in gates):
            raise ValueError(f"harm_gate is a probability in [0, 1], got {self.harm_gate}")
        self._harm_gated = any(x is not None for x in gates)
        self.energy_dtype = energy_dtype
        self.stats: dict[int, LayerStats] = {}
        self._cache: dict[tuple, tuple] = {}
        self._allowed: torch.Tensor | None = None  # [B] rows the harm gate lets through, set at prefill
        self._handles: list = []

    def _row(self, value: RowValue, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=dtype, device=device)
        if t.ndim and t.shape[0] != batch:
            raise ValueError(f"per-row setting has {t.shape[0]} values for a batch of {batch}")
        return t.expand(batch) if not t.ndim else t

    def attach(self) -> Steering:
        blocks = decoder_blocks(self.model, self.artefact.manifest.get("blocks_path"))
        m = self.artefact.manifest
        for layer in self.layers:
            if not 0 <= layer < len(blocks):
                raise ValueError(f"layer {layer} out of range for a model with {len(blocks)} layers")
            member = self.artefact.member(layer)
            device = next(blocks[layer].parameters()).device
            energy = self.artefact.energy.member(member, device, self.energy_dtype)
            probe = None
            if self._harm_gated and layer == self.layers[0]:
                probe = (self.artefact.probe_weight[member].to(device), self.artefact.probe_bias[member].to(device))
            self.stats[layer] = LayerStats()
            hook = self._make_hook(energy, m["hidden_norm"][str(layer)], m["gate_offset"][str(layer)],
                                   self.stats[layer], probe)
            self._handles.append(blocks[layer].register_forward_pre_hook(hook, with_kwargs=True))
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
            if not prefill and self.positions == "prompt":
                return None  # nothing to do per new token: skip even the energy
            if prefill and probe is not None:
                p_harm = torch.sigmoid(h[:, -1].float() @ probe[0] + probe[1])
                self._allowed = p_harm < self._settings(h.shape[0], p_harm.device)[3]
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
        allowed = self._allowed
        if not prefill and every is not None:  # a new token: rows steered at the prompt only are left alone,
            allowed = every if allowed is None else allowed & every
            steps = steps * every  # and owe no steps, so none count as skipped
        k_max = max(self.steps) if isinstance(self.steps, Sequence) else int(self.steps)
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
        """Per-row eta, steps, threshold, harm gate and positions as tensors, made once per batch size: building them on
        every call would copy host values to the device, a synchronisation per layer and token on a GPU."""
        key = (batch, device)
        if key not in self._cache:
            harm = None
            if self._harm_gated:
                # A row without a harm gate (None) is always let through: p < 2 holds.
                gates = self.harm_gate if isinstance(self.harm_gate, Sequence) else [self.harm_gate] * batch
                harm = self._row([2.0 if x is None else x for x in gates], batch, device, torch.float32)
            every = None  # [B] rows steered at every new token, when that differs from row to row
            if not isinstance(self.positions, str):
                every = self._row([p == "last" for p in self.positions], batch, device, torch.bool)
            self._cache[key] = (self._row(self.eta, batch, device, torch.float32),
                                self._row(self.steps, batch, device, torch.long),
                                None if self.threshold is None else self._row(self.threshold, batch, device, torch.float32),
                                harm, every)
        return self._cache[key]

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


class Method(Protocol):
    """An inference-time way to change a model's behaviour, as `els eval` compares them.

    `system` is the system prompt the method generates with (None: the template's default); `apply`
    returns a context manager under which `model.generate` runs with the method in effect.
    """

    name: str
    system: str | None

    def apply(self, model: nn.Module) -> AbstractContextManager: ...


@dataclass
class Base:
    """The unchanged model."""

    name: str = "base"
    system: str | None = None

    def apply(self, model: nn.Module) -> AbstractContextManager:
        return nullcontext()


@dataclass
class Els:
    """Energy steering with an artefact; settings override the manifest's (see `Steering`)."""

    artefact: Artefact
    settings: dict = field(default_factory=dict)
    name: str = "els"
    system: str | None = None

    def apply(self, model: nn.Module) -> Steering:
        return Steering(model, self.artefact, **self.settings)
