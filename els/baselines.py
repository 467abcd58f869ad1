"""Training-free baselines fitted from the same `Collection` as ELS, each an `els.steering.Method`.

    methods = fit_baselines(collection)              # knobs by activation rules (no generation)
    methods = fit_baselines(collection, score=ev)    # knobs chosen on validation prompts (see els.tune.Evaluator)
    with methods["ablation"].apply(model): model.generate(...)

Directions are difference-of-means vectors of the residual stream at the last prompt token (the
collection's activations). Without a `score` hook, layers are chosen by how well the direction separates
its two classes on held-out rows of the collection, and the addition coefficient by the projection gap
between falsely refused and helped prompts; with one, a few candidates are scored on validation prompts
and picked by the same rule `els tune` uses (`els.tune.pick`).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from els.collect import Collection
from els.energy import stratified_split
from els.models import block_input, decoder_blocks, with_block_input
from els.steering import Base, Method

if TYPE_CHECKING:
    from els import tune

# Arditi et al. drop directions from the last 20% of layers: there they mostly encode the next token.
MAX_LAYER_FRACTION = 0.8
HOLDOUT_FRACTION = 0.2

BALANCED_SYSTEM_PROMPT = (
    "You are a helpful, honest and harmless assistant. Answer every request that has a reasonable harmless "
    "reading fully and directly, even when it uses alarming words or touches a sensitive subject: killing a "
    "process, violence in fiction, games or history, security concepts, medicine, drugs, law or sexuality "
    "asked about for information. Do not lecture, moralise or add needless warnings. Decline only requests "
    "that clearly seek to cause real harm, such as weapons, malware, fraud or hurting people; then say so "
    "briefly and offer a safe alternative if there is one."
)

Hook = Callable[[torch.Tensor], torch.Tensor]  # block input [B, T, d] -> new block input


@contextmanager
def hooked(model: nn.Module, hooks: dict[int, Hook], blocks_path: str | None = None) -> Iterator[None]:
    """Forward pre-hooks rewriting the input of the given blocks; removed on exit, also after an error."""
    blocks = decoder_blocks(model, blocks_path)

    def wrap(fn: Hook):
        return lambda module, args, kwargs: with_block_input(args, kwargs, fn(block_input(args, kwargs)))

    handles = [blocks[layer].register_forward_pre_hook(wrap(fn), with_kwargs=True) for layer, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _ablate(direction: torch.Tensor) -> Hook:
    def fn(h: torch.Tensor) -> torch.Tensor:
        r = direction.to(h.device, torch.float32)
        x = h.float()
        return (x - (x @ r)[..., None] * r).to(h.dtype)  # float32 so the bf16 residue is rounding only

    return fn


def _add(vector: torch.Tensor) -> Hook:
    return lambda h: h + vector.to(h.device, h.dtype)


@dataclass
class SystemPrompt:
    """The unchanged model with `BALANCED_SYSTEM_PROMPT`: asks for full answers to anything with a harmless
    reading (naming the usual false-refusal triggers) and brief refusals of clearly harmful requests."""

    name: str = "system-prompt"
    system: str | None = BALANCED_SYSTEM_PROMPT

    def apply(self, model: nn.Module) -> AbstractContextManager:
        return Base().apply(model)


@dataclass
class DirectionAblation:
    """Project the unit `direction` out of every block's input at every position (Arditi et al. 2024)."""

    direction: torch.Tensor  # [d], unit norm
    layer: int  # where the direction was measured
    name: str = "ablation"
    system: str | None = None
    blocks_path: str | None = None

    def apply(self, model: nn.Module) -> AbstractContextManager:
        n = len(decoder_blocks(model, self.blocks_path))
        return hooked(model, {i: _ablate(self.direction) for i in range(n)}, self.blocks_path)


@dataclass
class SurgicalAblation(DirectionAblation):
    """Ablate the false-refusal vector, orthogonal to the true refusal direction (Wang et al., ICLR 2025)."""

    name: str = "surgical"


@dataclass
class DirectionAddition:
    """Add -coeff * scale * direction to one block's input at every position (CAA / Arditi's addition)."""

    direction: torch.Tensor  # [d], unit refusal direction
    layer: int
    coeff: float  # in units of `scale`
    scale: float  # the layer's mean hidden norm, so coeff means the same at every layer and model
    name: str = "addition"
    system: str | None = None
    blocks_path: str | None = None

    def apply(self, model: nn.Module) -> AbstractContextManager:
        return hooked(model, {self.layer: _add(-self.coeff * self.scale * self.direction)}, self.blocks_path)


@dataclass
class ProbeGatedAddition:
    """`DirectionAddition` only on rows a linear probe calls benign (CAST-style conditional steering).

    The probe reads the layer's input at the last prompt token in the prefill (harmful if
    h . probe_w + probe_b > 0); the decision holds for that row's generated tokens.
    """

    direction: torch.Tensor  # [d], unit refusal direction
    layer: int
    coeff: float
    scale: float
    probe_w: torch.Tensor  # [d]
    probe_b: float
    name: str = "probe-gated"
    system: str | None = None
    blocks_path: str | None = None

    def apply(self, model: nn.Module) -> AbstractContextManager:
        vector = -self.coeff * self.scale * self.direction
        benign: list[torch.Tensor] = []  # this apply's gate: one flag per row of the current generate call

        def fn(h: torch.Tensor) -> torch.Tensor:
            if h.shape[1] > 1 or not benign:  # a prefill (decode steps see one position): decide anew
                benign[:] = [h[:, -1].float() @ self.probe_w.to(h.device) + self.probe_b <= 0]
            return h + benign[0][:, None, None].to(h.dtype) * vector.to(h.device, h.dtype)

        return hooked(model, {self.layer: fn}, self.blocks_path)


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
    s = x @ w
    cands = s.sort().values
    j = (s[harmful][:, None] > cands).float().mean(0) - (s[~harmful][:, None] > cands).float().mean(0)
    return w, -float(cands[j.argmax()])


Scorer = Callable[[Method], "tune.Score"]  # a method's result on validation prompts (els.tune.Evaluator)


def _best(candidates: list[Method], score: Scorer | None, base: tune.Score | None) -> Method:
    if score is None or len(candidates) == 1:
        return candidates[0]
    from els.tune import pick  # lazy: els.tune imports optuna, which only validation-driven fitting needs

    return candidates[pick([score(m) for m in candidates], base)]


def fit_baselines(collection: Collection, *, score: Scorer | None = None, candidates: int = 3,
                  coeff_scales: tuple[float, ...] = (0.5, 1.0, 2.0), blocks_path: str | None = None,
                  seed: int = 0) -> dict[str, Method]:
    """Fit every baseline's directions and knobs from `collection`.

    Layers: the `candidates` layers (below 80% depth, not the embedding) whose direction best separates
    its classes on a held-out 20% of the rows, directions fitted on the rest; the best one without
    `score`, else the one `els.tune.pick` prefers on validation. Final directions use all rows.
    Addition coefficient: the gap between falsely refused and helped benign prompts along r at that layer,
    in units of the layer's mean hidden norm (moves the average false refusal onto the average helpful
    answer); with `score`, that times each of `coeff_scales`. The probe gate reuses the addition's knobs.
    """
    acts = collection.activations.float()
    states = collection.states
    harmful = torch.tensor([r.kind == "harmful" for r in collection.records])
    fr = torch.tensor([s == "false_refusal" for s in states])
    helpful = torch.tensor([s == "helpful" for s in states])
    fit_idx, held_idx = (torch.tensor(i) for i in stratified_split(states, HOLDOUT_FRACTION, seed))
    fit = torch.zeros(len(states), dtype=torch.bool).index_fill_(0, fit_idx, True)
    num_layers = acts.shape[1]
    allowed = torch.zeros(num_layers, dtype=torch.bool)
    allowed[1 : max(2, int(MAX_LAYER_FRACTION * num_layers))] = True

    def ranked(direction: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> list[int]:
        proj = torch.einsum("nld,ld->nl", acts[held_idx], direction)
        sep = separation(proj, pos[held_idx], neg[held_idx])
        return [layer for layer in sep.argsort(descending=True).tolist() if allowed[layer]][:candidates]

    refusal = mean_direction(acts, harmful, ~harmful)
    norms = acts.norm(dim=-1).mean(0)
    base = score(Base()) if score is not None else None
    kw = {"blocks_path": blocks_path}
    out: dict[str, Method] = {"system-prompt": SystemPrompt()}

    layers = ranked(mean_direction(acts[fit], harmful[fit], ~harmful[fit]), harmful, ~harmful)
    ablation = _best([DirectionAblation(refusal[layer], layer, **kw) for layer in layers], score, base)
    out["ablation"] = ablation
    layer = ablation.layer  # Arditi et al. use one layer's direction for both ablation and addition

    def gap(a: torch.Tensor, b: torch.Tensor) -> float:
        proj = acts[:, layer] @ refusal[layer]
        return float(proj[a].mean() - proj[b].mean())

    if fr.sum() >= 2 and helpful.sum() >= 2:
        coeff = max(gap(fr, helpful), 0.0) / float(norms[layer])
    else:  # no false refusals to aim at: half the harmful-benign gap
        coeff = 0.5 * gap(harmful, ~harmful) / float(norms[layer])
    scales = coeff_scales if score is not None else (1.0,)
    out["addition"] = addition = _best(
        [DirectionAddition(refusal[layer], layer, coeff * s, float(norms[layer]), **kw) for s in scales], score, base)
    w, b = lda_probe(acts[:, layer], harmful)
    out["probe-gated"] = ProbeGatedAddition(refusal[layer], layer, addition.coeff, addition.scale, probe_w=w,
                                            probe_b=b, **kw)

    if fr.sum() < 2 or helpful.sum() < 2:
        warnings.warn("fewer than two false refusals or helpful answers: no surgical baseline", stacklevel=2)
        return out
    surgical = orthogonalise(mean_direction(acts, fr, helpful), refusal)
    fit_surgical = orthogonalise(mean_direction(acts[fit], fr[fit], helpful[fit]),
                                 mean_direction(acts[fit], harmful[fit], ~harmful[fit]))
    layers = ranked(fit_surgical, fr, helpful)
    out["surgical"] = _best([SurgicalAblation(surgical[layer], layer, **kw) for layer in layers], score, base)
    return out


def knobs(method: Method) -> dict:
    """The fitted settings of a baseline as plain values (for reports and manifests)."""
    out: dict = {"name": method.name, "system": method.system}
    for key in ("layer", "coeff", "scale", "probe_b"):
        if hasattr(method, key):
            out[key] = round(float(getattr(method, key)), 6) if key != "layer" else int(method.layer)
    return out
