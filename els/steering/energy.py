"""Energy models: one small MLP per layer, trained with InfoNCE so good states get low energy.

All layers' models live in one `EnergyStack` with stacked weights, so training every layer is a few
batched matmuls per step instead of a Python loop over layers, and steering computes the energy
gradient in closed form (no autograd, so it runs under `torch.inference_mode()`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5
# What a prompt and its answer can be: benign answered / refused, harmful refused / answered.
STATES = ("helpful", "false_refusal", "safe_refusal", "jailbreak")
# Which states an energy pulls down (good) and pushes up (bad). four-state is the paper's. benign contrasts
# only benign prompts' answers: its gradient points from refusing towards answering, with no second
# low-energy basin at "safe refusal" to fall into. safety contrasts only harmful prompts' answers: its gradient
# points from answering towards refusing. Two-sided steering routes each prompt to one of the two by the harm gate.
CONTRASTS = {
    "four-state": (("helpful", "safe_refusal"), ("false_refusal", "jailbreak")),
    "benign": (("helpful",), ("false_refusal",)),
    "safety": (("safe_refusal",), ("jailbreak",)),
}


class EnergyStack(nn.Module):
    """S independent energy MLPs (one per layer) of the same shape.

    Each maps a residual-stream vector h in R^d to a scalar:
    x = (h - mean) * inv_std; then per width w: x = Dropout(SiLU(LayerNorm(W x + b))); E = w_out . x + b_out.
    The input standardisation (fixed, from the training data) keeps training stable whatever the layer's
    scale, and is a diagonal map, so the gradient stays closed form.
    """

    mean: torch.Tensor  # buffers [S, d], registered in __init__ (nn.Module's attribute lookup hides their type)
    inv_std: torch.Tensor

    def __init__(
        self,
        n: int,
        dim: int,
        widths: tuple[int, ...] = (512, 256),
        dropout: float = 0.15,
        seeds: list[int] | None = None,
    ):
        super().__init__()
        self.dim, self.widths, self.dropout = dim, tuple(widths), dropout
        sizes = (dim, *widths)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n, a, b)) for a, b in zip(sizes, sizes[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n, b)) for b in widths)
        self.gammas = nn.ParameterList(nn.Parameter(torch.ones(n, b)) for b in widths)
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(n, b)) for b in widths)
        self.w_out = nn.Parameter(torch.empty(n, widths[-1]))
        self.b_out = nn.Parameter(torch.empty(n))
        self.register_buffer("mean", torch.zeros(n, dim))
        self.register_buffer("inv_std", torch.ones(n, dim))
        self.reset_parameters(seeds or list(range(n)))

    @torch.no_grad()
    def reset_parameters(self, seeds: list[int]) -> None:
        """nn.Linear's default init, drawn per member from its own seed, so a member's init does not depend
        on which other layers share the stack."""
        for s, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            for w, b in zip([*self.weights, self.w_out[:, :, None]], [*self.biases, self.b_out[:, None]]):
                bound = 1 / math.sqrt(w.shape[1])
                w[s].copy_(torch.rand(w[s].shape, generator=g) * 2 * bound - bound)
                b[s].copy_(torch.rand(b[s].shape, generator=g) * 2 * bound - bound)

    def set_standardisation(self, x: torch.Tensor) -> None:
        """Fix the input standardisation from training activations x [S, N, d]."""
        self.mean.copy_(x.mean(1))
        self.inv_std.copy_(1 / (x.std(1) + 1e-4 * x.std(1).mean(-1, keepdim=True) + 1e-8))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Energies [S, B] of inputs h [S, B, d]."""
        x = (h - self.mean[:, None]) * self.inv_std[:, None]
        for w, b, g, beta in zip(self.weights, self.biases, self.gammas, self.betas):
            a = torch.baddbmm(b[:, None], x, w)
            x = F.silu(_layer_norm(a, g, beta))
            if self.training and self.dropout:
                x = F.dropout(x, self.dropout)
        return torch.einsum("sbw,sw->sb", x, self.w_out) + self.b_out[:, None]

    def member(
        self, i: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> EnergyMember:
        """Member i as an `EnergyMember` on `device` in `dtype`, for steering."""

        def t(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(device=device, dtype=dtype).contiguous()

        return EnergyMember(
            layers=tuple(
                (t(w[i]), t(w[i].T), t(b[i]), t(g[i]), t(bt[i]))
                for w, b, g, bt in zip(self.weights, self.biases, self.gammas, self.betas)
            ),
            w_out=t(self.w_out[i][:, None]),
            b_out=t(self.b_out[i : i + 1]),
            mean=t(self.mean[i]),
            inv_std=t(self.inv_std[i]),
        )

    def select(self, members: list[int]) -> EnergyStack:
        """A stack holding only the given members (e.g. the chosen layers), as a copy."""
        sub = copy.deepcopy(self)
        with torch.no_grad():
            for p in sub.parameters():
                p.data = p.data[members].clone()
            for name, buf in sub.named_buffers():
                setattr(sub, name, buf[members].clone())
        return sub


@dataclass(frozen=True)
class EnergyMember:
    """One layer's energy model as plain 2-D tensors, laid out for steering: each weight is stored with a
    contiguous transpose for the backward matmul (a transposed view sends bf16 matmuls on a CPU down a
    path about ten times slower), and inputs are [B, d] rows, so every matmul is a plain mm."""

    layers: tuple[tuple[torch.Tensor, ...], ...]  # per width: W [a, b], W^T [b, a], bias, LN gain, LN shift [b]
    w_out: torch.Tensor  # [w, 1]
    b_out: torch.Tensor  # [1]
    mean: torch.Tensor  # [d]
    inv_std: torch.Tensor  # [d]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_out.dtype

    def energy_and_grad(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies [B] and dE/dh [B, d] of rows h [B, d], in closed form (no dropout, no autograd).

        Forward keeping what the backward needs, then the chain rule through SiLU, LayerNorm and Linear.
        The LayerNorm and SiLU derivatives are ATen's fused kernels (the formulas autograd uses, called
        directly): at batch 1 the cost is the number of kernel launches, not the arithmetic.
        """
        x = (h - self.mean) * self.inv_std
        saved = []
        for w, w_t, b, g, beta in self.layers:
            a = torch.addmm(b, x, w)
            n, mu, rstd = torch.native_layer_norm(a, a.shape[-1:], g, beta, LN_EPS)
            x = F.silu(n)
            saved.append((w_t, g, beta, a, mu, rstd, n))
        energy = torch.addmm(self.b_out, x, self.w_out)[:, 0]
        grad = self.w_out.T.expand_as(x)
        for w_t, g, beta, a, mu, rstd, n in reversed(saved):
            grad = torch.ops.aten.silu_backward(grad, n)
            grad = torch.ops.aten.native_layer_norm_backward(
                grad, a, a.shape[-1:], mu, rstd, g, beta, [True, False, False]
            )[0]
            grad = grad @ w_t
        return energy, grad * self.inv_std

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.energy_and_grad(h)[0]


def _layer_norm(a: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(a, a.shape[-1:], eps=LN_EPS) * g[:, None] + beta[:, None]
