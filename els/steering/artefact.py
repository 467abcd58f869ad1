"""The steering artefact: per-layer energy models, the harm gate, and the manifest saying how to steer.

art = Artefact.load("runs/default/artefact")
art.layers, art.settings  # where and how `Steering` steers by default
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from els.core.io import save_tensors_atomic, write_atomic
from els.core.models import config_fingerprint, decoder_blocks
from els.steering.energy import EnergyStack
from els.steering.gate import TENSOR_PREFIX, HarmGate
from els.steering.manifest import FORMAT_VERSION, Integrity, Manifest
from els.steering.settings import SteerSettings

MANIFEST = "els.json"
WEIGHTS = "energy.safetensors"
SAFETY_PREFIX = "safety."  # the safety energy's tensors in the weights file (two-sided artefacts)
LAYER_RULES = ("top_auc", "late_block", "last")  # see steer_layers
# The recipe's layer choice (with SteerSettings' defaults and TrainConfig's, what `els run` does).
DEFAULT_LAYER_RULE = "top_auc"
DEFAULT_TOP_N = 2


def package_version() -> str:
    try:
        return version("els")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Artefact:
    """Trained energy models for every recorded layer plus the manifest saying how to steer with them."""

    energy: EnergyStack  # the compliance energy; member i is the model of layer manifest.trained_layers[i]
    manifest: Manifest
    gate: HarmGate  # which prompts are flagged as harmful (els.steering.gate)
    # Safe refusal low, jailbreak high, same members as `energy`: where flagged rows go (flagged="refuse").
    safety: EnergyStack | None = None

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.steer.layers)

    @property
    def settings(self) -> SteerSettings:
        return self.manifest.steer.settings()

    def member_index(self, layer: int) -> int:
        try:
            return self.manifest.trained_layers.index(layer)
        except ValueError:
            raise ValueError(f"the artefact has no energy model for layer {layer}") from None

    def subset(self, layers: list[int]) -> Artefact:
        """The same artefact holding only these layers' models (smaller, for serving)."""
        members = [self.member_index(layer) for layer in layers]
        manifest = self.manifest.model_copy()
        manifest.trained_layers = list(layers)
        return Artefact(
            self.energy.select(members),
            manifest,
            self.gate,
            None if self.safety is None else self.safety.select(members),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything the weights file holds: the energy models, the safety energy and the harm gate."""
        out = {k: v.contiguous() for k, v in self.energy.state_dict().items()} | self.gate.to_tensors()
        if self.safety is not None:
            out |= {SAFETY_PREFIX + k: v.contiguous() for k, v in self.safety.state_dict().items()}
        return out

    def save(self, path: Path | str) -> None:
        """Write els.json and energy.safetensors into `path`, each atomically, and nothing else: other files
        in the folder are left alone. The manifest, here and on disk, records the weights' sha256 and member
        layer order, so a crash between the two replacements leaves a pair that `load` refuses, never a silent
        mix of an old manifest and new weights."""
        path = Path(path)
        tensors = self.tensors()
        layers = list(self.manifest.trained_layers)
        self.manifest.format_version = FORMAT_VERSION  # `tensors` holds the gate as this format stores it
        self.manifest.weights = Integrity(sha256=weights_sha256(tensors, layers), member_layers=layers)
        save_tensors_atomic(tensors, path / WEIGHTS)
        write_atomic(path / MANIFEST, self.manifest_json())

    def manifest_json(self) -> str:
        """els.json's text: the manifest with the harm gate's report."""
        return self.manifest.to_json(self.gate.report)

    @classmethod
    def load(cls, path: Path | str) -> Artefact:
        """Read and verify an artefact; anything malformed raises ValueError (FileNotFoundError when absent)
        with one line naming the file."""
        path = Path(path)
        mpath, wpath = path / MANIFEST, path / WEIGHTS
        if not mpath.exists():
            raise FileNotFoundError(f"{path} is not an ELS artefact (no {MANIFEST})")
        manifest, report = Manifest.read(mpath)
        if not wpath.exists():
            raise FileNotFoundError(f"{path} is not a complete ELS artefact (no {WEIGHTS})")
        try:
            tensors = load_file(wpath)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{wpath} is not a readable safetensors file ({e})") from e
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{path}: energy weights {name} contain NaN or infinity")
        _check_integrity(manifest, tensors, mpath, wpath)
        try:
            spec = manifest.energy
            shape = (len(manifest.trained_layers), manifest.hidden_size, tuple(spec.widths), spec.dropout)
            with torch.device("meta"):  # shapes only: nothing is allocated before they match the weights on disk
                expected = {k: tuple(v.shape) for k, v in EnergyStack(*shape).state_dict().items()}
            if manifest.safety is not None:  # the safety energy: the same members, its tensors prefixed
                expected |= {SAFETY_PREFIX + k: v for k, v in expected.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{mpath}: malformed energy description ({type(err).__name__}: {err})") from err
        gate_shapes = _gate_shapes(manifest, tensors)
        if missing := [k for k in gate_shapes if k not in tensors]:
            raise ValueError(f"{wpath} lacks the harm gate tensors {', '.join(missing)}")
        expected |= gate_shapes
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            diff = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise ValueError(
                f"{wpath} does not fit {mpath} (hidden_size {manifest.hidden_size}, "
                f"{len(manifest.trained_layers)} layers, widths {spec.widths}): "
                + "; ".join(f"{k} {found.get(k, 'missing')} != {expected.get(k, 'unexpected')}" for k in diff[:3])
            )
        try:
            if manifest.format_version == 1:
                gate = _gate_of_format_1(manifest, tensors.pop("probe.weight"), tensors.pop("probe.bias"))
            else:
                if tensors[f"{TENSOR_PREFIX}layer"].is_floating_point():
                    raise TypeError(f"{TENSOR_PREFIX}layer must be an integer tensor")
                gate = HarmGate.from_tensors(tensors, report)
                tensors = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed harm gate ({type(err).__name__}: {err})") from err
        if not 0 <= gate.layer < manifest.num_layers:
            raise ValueError(f"{path}: the harm gate reads layer {gate.layer}, the model has {manifest.num_layers}")
        if not 0 <= gate.threshold <= 1:
            raise ValueError(f"{path}: the harm gate's threshold {gate.threshold:g} is not a probability in [0, 1]")
        energy = EnergyStack(*shape)
        energy.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(SAFETY_PREFIX)})
        safety = None
        if manifest.safety is not None:
            safety = EnergyStack(*shape)
            safety.load_state_dict(
                {k[len(SAFETY_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SAFETY_PREFIX)}
            )
            safety.eval()
        return cls(energy.eval(), manifest, gate, safety)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose architecture differs from the one the energies were trained on."""
        m = self.manifest
        config: Any = model.config
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
        problems = []
        if (fp := config_fingerprint(model)) != m.model_fingerprint:
            problems.append(f"config fingerprint {fp} != {m.model_fingerprint}")
        if hidden != m.hidden_size:
            problems.append(f"hidden size {hidden} != {m.hidden_size}")
        if (n := len(decoder_blocks(model))) != m.num_layers:
            problems.append(f"{n} layers != {m.num_layers}")
        if problems:
            raise ValueError(
                f"this artefact was trained on {m.base_model!r} and does not fit this model: {'; '.join(problems)}"
            )


def weights_sha256(tensors: dict[str, torch.Tensor], member_layers: list[int]) -> str:
    """sha256 over the member layers and every tensor (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256(json.dumps([int(x) for x in member_layers]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_integrity(manifest: Manifest, tensors: dict[str, torch.Tensor], mpath: Path, wpath: Path) -> None:
    record = manifest.weights
    if record is None:  # written before the weights were hashed
        return
    if record.member_layers != manifest.trained_layers:
        raise ValueError(
            f"{mpath}: trained_layers {manifest.trained_layers} do not match the layer order the "
            f"weights were saved with {record.member_layers}"
        )
    if weights_sha256(tensors, record.member_layers) != record.sha256:
        raise ValueError(f"{wpath} does not match the sha256 recorded in {mpath} (weights edited or replaced)")


def _gate_shapes(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The shapes of the harm gate's tensors an artefact of `manifest` holds (`directions` is optional)."""
    d, n = manifest.hidden_size, len(manifest.trained_layers)
    if manifest.format_version == 1:  # a probe per trained layer
        return {"probe.weight": (n, d), "probe.bias": (n,)}
    shapes: dict[str, tuple[int, ...]] = {"weight": (d,), "bias": (1,), "threshold": (1,), "layer": (1,)}
    if f"{TENSOR_PREFIX}directions" in tensors:  # a row per layer (make_artefact fills those the pool lacks)
        shapes["directions"] = (manifest.num_layers, d)
    return {TENSOR_PREFIX + k: v for k, v in shapes.items()}


def layer_probes_gate(
    trained_layers: list[int],
    num_layers: int,
    layer: int,
    probe_w: torch.Tensor,
    probe_b: torch.Tensor,
    threshold: float,
) -> HarmGate:
    """A gate from one probe per trained layer, fitted on the collection's prompts, read at `layer` (what
    format 1 stored, and the fallback without a pooled gate)."""
    directions = torch.zeros(num_layers, probe_w.shape[-1])
    directions[trained_layers] = probe_w.float()
    i = trained_layers.index(layer)
    return HarmGate(
        layer,
        probe_w[i].float(),
        float(probe_b[i]),
        float(threshold),
        directions,
        {"source": "collection", "layer": layer, "threshold": float(threshold)},
    )


def _gate_of_format_1(manifest: Manifest, probe_w: torch.Tensor, probe_b: torch.Tensor) -> HarmGate:
    # format 1 read its gate at the first steered layer, at the steering threshold (0.5 without one)
    return layer_probes_gate(
        manifest.trained_layers,
        manifest.num_layers,
        min(manifest.steer.layers),
        probe_w,
        probe_b,
        manifest.steer.harm_gate or 0.5,
    )


def steer_layers(auc: Mapping[int, float], num_layers: int, rule: str, n: int) -> list[int]:
    """Which `n` of the trained layers to steer, from each one's validation AUC (`Manifest.auc`).

    top_auc: the n trained layers of best validation AUC. late_block: the n consecutive layers of best mean
    AUC in the model's second half (steering a block keeps the push coherent from layer to layer). last: the
    n last trained layers (a push there reaches the logits with the fewest layers left to undo it)."""
    if rule == "top_auc":
        return sorted(sorted(auc, key=lambda layer: (-auc[layer], layer))[:n])
    if rule == "last":
        return sorted(auc)[-n:]
    late = [layer for layer in sorted(auc) if layer >= num_layers // 2] or sorted(auc)
    n = min(n, len(late))
    windows = [late[i : i + n] for i in range(len(late) - n + 1) if late[i + n - 1] - late[i] == n - 1]
    return max(windows or [late[-n:]], key=lambda w: sum(auc[layer] for layer in w))
