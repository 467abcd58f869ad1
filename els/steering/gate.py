"""The harm gate at generation time: which rows of a batch may be steered.

A logistic probe reads the residual stream entering one decoder block at the last prompt token. It must
decide before any method edits the residual stream, whichever layers the method edits (surgical ablation
edits every layer), so it reads a pre-pass: at each prefill, the same forward call is run first with no
cache up to the gate's layer and stopped there, costing `layer / num_layers` of one prefill and nothing
per new token. Its decision holds for the whole generate call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn

import torch
from torch import nn

from els.core.hooks import StopForward
from els.core.models import block_input, decoder_blocks

TENSOR_PREFIX = "harm_gate."


@dataclass
class HarmGate:
    """p(harmful) = sigmoid(h[layer] . weight + bias) on raw activations; flagged when p >= threshold.

    `directions` [L, d] holds a probe direction per layer (raw-activation weights; zero where none was
    fitted): steering can be kept orthogonal to the one at each steered layer, so it cannot make a prompt
    look less harmful there.
    """

    layer: int
    weight: torch.Tensor  # [d]
    bias: float
    threshold: float
    directions: torch.Tensor | None = None  # [L, d]
    report: dict = field(default_factory=dict)  # how it was chosen (JSON-able, kept in the manifest)

    def probability(self, h: torch.Tensor) -> torch.Tensor:
        """p(harmful) for activations [..., d] of the gate's layer."""
        return torch.sigmoid(h.float() @ self.weight.to(h.device) + self.bias)

    def probability_from_layers(self, acts: torch.Tensor) -> torch.Tensor:
        """p(harmful) for activations [N, L, d] of every layer."""
        return self.probability(acts[:, self.layer])

    def direction(self, layer: int) -> torch.Tensor | None:
        """The unit probe direction at `layer`, or None where there is none."""
        if self.directions is None or not 0 <= layer < len(self.directions):
            return None
        d = self.directions[layer].float()
        n = d.norm()
        return None if n == 0 else d / n

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            f"{TENSOR_PREFIX}weight": self.weight.float().contiguous(),
            f"{TENSOR_PREFIX}bias": torch.tensor([float(self.bias)]),
            f"{TENSOR_PREFIX}threshold": torch.tensor([float(self.threshold)]),
            f"{TENSOR_PREFIX}layer": torch.tensor([self.layer], dtype=torch.int64),
        }
        if self.directions is not None:
            out[f"{TENSOR_PREFIX}directions"] = self.directions.float().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], report: dict | None = None) -> HarmGate:
        """Reads the `harm_gate.*` entries and ignores the rest, so an artefact's whole tensor file will do."""
        p = TENSOR_PREFIX
        return cls(
            int(tensors[f"{p}layer"][0]),
            tensors[f"{p}weight"].float(),
            float(tensors[f"{p}bias"][0]),
            float(tensors[f"{p}threshold"][0]),
            tensors.get(f"{p}directions"),
            report or {},
        )


@dataclass
class GateState:
    """Set at each prefill: `allowed` [B] rows the gate lets through, `p_harm` [B]. `busy` is True while the
    pre-pass runs, so hooks of the gated method leave that pass alone."""

    allowed: torch.Tensor | None = None
    p_harm: torch.Tensor | None = None
    busy: bool = False


Threshold = Callable[[int, torch.device], torch.Tensor]  # (batch, device) -> [B] per-row thresholds


def _cache_len(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it `cache`
    if cache is None:
        return 0
    return int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 1


@contextmanager
def read_gate(model: nn.Module, gate: HarmGate, threshold: Threshold) -> Iterator[GateState]:
    """While active, every prefill of `model` first runs the gate's pre-pass and sets the returned state."""
    state = GateState()
    block = decoder_blocks(model)[gate.layer]

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> NoReturn:
        state.p_harm = gate.probability(block_input(args, kwargs)[:, -1])
        raise StopForward

    def before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if state.busy or _cache_len(kwargs) > 0:
            return None
        rest = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        state.busy = True
        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            module(*args, **rest | {"use_cache": False})
        except StopForward:
            pass
        finally:
            handle.remove()
            state.busy = False
        p = state.p_harm
        assert p is not None, "the gate's block did not run"  # grab sets it before stopping the forward
        state.allowed = p < threshold(p.shape[0], p.device)
        return None

    handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
