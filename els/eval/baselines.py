"""Fit the training-free baselines (`els.eval.methods`) from the same `Collection` as ELS; `register_baselines`
names them for `els eval --methods`.

    methods = fit_baselines(collection)
    with methods["ablation"].apply(model): model.generate(...)

Directions are difference-of-means vectors of the residual stream at the last prompt token (the
collection's activations). Layers are chosen by how well the direction separates its two classes on
held-out rows of the collection, and the addition coefficient by the projection gap between falsely
refused and helped prompts.
"""

from __future__ import annotations

import warnings

import torch

from els.core.stats import stratified_split, youden_threshold
from els.eval.methods import (
    DirectionAblation,
    DirectionAddition,
    Gated,
    Method,
    MethodContext,
    MethodFactory,
    ProbeGatedAddition,
    SurgicalAblation,
    SystemPrompt,
    register_method,
)
from els.steering.artefact import Artefact
from els.steering.energy import STATES
from els.steering.settings import SteerSettings
from els.training.collect import Collection, load_collection

# Arditi et al. drop directions from the last 20% of layers: there they mostly encode the next token.
MAX_LAYER_FRACTION = 0.8
HOLDOUT_FRACTION = 0.2


def mean_direction(acts: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Unit difference of means, per layer: acts [N, L, d], boolean row masks -> [L, d]."""
    diff = acts[pos].mean(0) - acts[neg].mean(0)
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def separation(proj: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Standardised gap of projections proj [N, L] between classes (Cohen's d), per layer; unlike AUC it
    does not saturate at 1 when several layers separate perfectly."""
    a, b = proj[pos], proj[neg]
    return (a.mean(0) - b.mean(0)) / ((a.var(0, correction=0) + b.var(0, correction=0)) / 2).sqrt().clamp_min(1e-8)


def orthogonalise(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """v with its component along unit r removed, unit-normalised, per row: [L, d], [L, d] -> [L, d]."""
    v = v - (v * r).sum(-1, keepdim=True) * r
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def lda_probe(x: torch.Tensor, harmful: torch.Tensor, shrink: float = 0.1) -> tuple[torch.Tensor, float]:
    """Shrinkage-LDA probe on rows x [N, d]: weights w and bias b, harmful where x . w + b > 0, with the
    bias at the split that best separates the training rows (max TPR - FPR)."""
    mu_h, mu_b = x[harmful].mean(0), x[~harmful].mean(0)
    centred = torch.cat([x[harmful] - mu_h, x[~harmful] - mu_b])
    cov = centred.T @ centred / len(x)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(x.shape[1])
    w = torch.linalg.solve(cov, mu_h - mu_b)
    return w, -youden_threshold(x @ w, ~harmful)


def fit_baselines(collection: Collection, *, seed: int = 0) -> dict[str, Method]:
    """Fit every baseline's directions and knobs from `collection`.

    Layer: the one (below 80% depth, not the embedding) whose direction best separates its classes on a
    held-out 20% of the rows, directions fitted on the rest. Final directions use all rows.
    Addition coefficient: the gap between falsely refused and helped benign prompts along r at that layer,
    in units of the layer's mean hidden norm (moves the average false refusal onto the average helpful
    answer). The probe gate reuses the addition's knobs.
    """
    acts = collection.activations.float()
    states = collection.states
    harmful = torch.tensor([r.kind == "harmful" for r in collection.records])
    fr = torch.tensor([s == "false_refusal" for s in states])
    helpful = torch.tensor([s == "helpful" for s in states])
    fit_idx, held_idx = (torch.tensor(i) for i in stratified_split(states, HOLDOUT_FRACTION, seed, STATES))
    fit = torch.zeros(len(states), dtype=torch.bool).index_fill_(0, fit_idx, True)
    num_layers = acts.shape[1]
    allowed = torch.zeros(num_layers, dtype=torch.bool)
    allowed[1 : max(2, int(MAX_LAYER_FRACTION * num_layers))] = True

    def best_layer(direction: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> int:
        proj = torch.einsum("nld,ld->nl", acts[held_idx], direction)
        sep = separation(proj, pos[held_idx], neg[held_idx])
        return next(layer for layer in sep.argsort(descending=True).tolist() if allowed[layer])

    refusal = mean_direction(acts, harmful, ~harmful)
    norms = acts.norm(dim=-1).mean(0)
    out: dict[str, Method] = {"system-prompt": SystemPrompt()}

    layer = best_layer(mean_direction(acts[fit], harmful[fit], ~harmful[fit]), harmful, ~harmful)
    out["ablation"] = DirectionAblation(refusal[layer], layer)
    # Arditi et al. use one layer's direction for both ablation and addition

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        proj = acts[:, layer] @ refusal[layer]
        return float(proj[a].mean() - proj[b].mean())

    if fr.sum() >= 2 and helpful.sum() >= 2:
        coeff = max(gap(fr, helpful), 0.0) / float(norms[layer])
    else:  # no false refusals to aim at: half the harmful-benign gap
        coeff = 0.5 * gap(harmful, ~harmful) / float(norms[layer])
    out["addition"] = DirectionAddition(refusal[layer], layer, coeff, float(norms[layer]))
    w, b = lda_probe(acts[:, layer], harmful)
    out["probe-gated"] = ProbeGatedAddition(refusal[layer], layer, coeff, float(norms[layer]), probe_w=w, probe_b=b)

    if fr.sum() < 2 or helpful.sum() < 2:
        warnings.warn("fewer than two false refusals or helpful answers: no surgical baseline", stacklevel=2)
        return out
    surgical = orthogonalise(mean_direction(acts, fr, helpful), refusal)
    fit_surgical = orthogonalise(
        mean_direction(acts[fit], fr[fit], helpful[fit]), mean_direction(acts[fit], harmful[fit], ~harmful[fit])
    )
    layer = best_layer(fit_surgical, fr, helpful)
    out["surgical"] = SurgicalAblation(surgical[layer], layer)
    return out


def knobs(method: Method) -> dict:
    """The fitted settings of a baseline as plain values (for reports and manifests)."""
    out: dict = {"name": method.name, "system": method.system}
    for key in ("layer", "coeff", "scale", "probe_b"):
        if hasattr(method, key):
            value = getattr(method, key)
            out[key] = int(value) if key == "layer" else round(float(value), 6)
    return out


def _fitted(name: str) -> MethodFactory:
    def factory(ctx: MethodContext) -> Method:
        if ctx.states is None:
            raise ValueError(f"method {name!r} is fitted on collected states: pass --states DIR")
        if ctx.fitted is None:
            ctx.fitted = fit_baselines(load_collection(ctx.states))
        if name not in ctx.fitted:
            raise ValueError(f"method {name!r} could not be fitted: the collection has too few false refusals")
        return ctx.fitted[name]

    return factory


def gate_threshold(art: Artefact, settings: SteerSettings | None) -> float:
    """The harm gate's threshold ELS runs at, for the gated baselines and the composed methods; the gate's own
    where ELS runs ungated."""
    harm_gate = (settings or art.settings).harm_gate
    return float(art.gate.threshold if harm_gate is None else harm_gate)


def _gated(name: str) -> MethodFactory:
    """`name` behind the artefact's harm gate, at the threshold ELS itself uses in this run."""
    inner = _fitted(name)

    def factory(ctx: MethodContext) -> Method:
        if ctx.artefact is None:
            raise ValueError(f"method '{name}-gated' uses the artefact's harm gate: pass --steer DIR")
        method = inner(ctx)
        assert isinstance(method, DirectionAblation | DirectionAddition), "only block-input rewrites are gated"
        return Gated(method, ctx.artefact.gate, gate_threshold(ctx.artefact, ctx.els_settings))

    return factory


def register_baselines() -> None:
    """Make the fitted baselines, plain and behind the artefact's harm gate, usable in `els eval --methods`."""
    for name in ("ablation", "addition", "surgical", "probe-gated"):
        register_method(name, _fitted(name))
    for name in ("ablation", "addition", "surgical"):
        register_method(f"{name}-gated", _gated(name))
