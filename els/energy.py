"""Energy models: one small MLP per layer, trained with InfoNCE so good states get low energy.

All layers' models live in one `EnergyStack` with stacked weights, so training every layer is a few
batched matmuls per step instead of a Python loop over layers, and steering computes the energy
gradient in closed form (no autograd, so it runs under `torch.inference_mode()`).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5
# What a prompt and its answer can be: benign answered / refused, harmful refused / answered.
STATES = ("helpful", "false_refusal", "safe_refusal", "jailbreak")
# Which states an energy pulls down (good) and pushes up (bad). four-state is the paper's. benign contrasts
# only benign prompts' answers: its gradient points from refusing towards answering, with no second
# low-energy basin at "safe refusal" to fall into; harmful prompts are then kept out by the harm gate.
CONTRASTS = {
    "four-state": (("helpful", "safe_refusal"), ("false_refusal", "jailbreak")),
    "benign": (("helpful",), ("false_refusal",)),
}


class EnergyStack(nn.Module):
    """S independent energy MLPs (one per layer) of the same shape.

    Each maps a residual-stream vector h in R^d to a scalar:
    x = (h - mean) * inv_std; then per width w: x = Dropout(SiLU(LayerNorm(W x + b))); E = w_out . x + b_out.
    The input standardisation (fixed, from the training data) keeps training stable whatever the layer's
    scale, and is a diagonal map, so the gradient stays closed form.
    """

    def __init__(self, n: int, dim: int, widths: tuple[int, ...] = (512, 256), dropout: float = 0.15,
                 seeds: list[int] | None = None):
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

    @property
    def n(self) -> int:
        return self.w_out.shape[0]

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

    def member(self, i: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
               ) -> EnergyMember:
        """Member i as an `EnergyMember` on `device` in `dtype`, for steering."""
        def t(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(device=device, dtype=dtype).contiguous()

        return EnergyMember(
            layers=tuple((t(w[i]), t(w[i].T), t(b[i]), t(g[i]), t(bt[i]))
                         for w, b, g, bt in zip(self.weights, self.biases, self.gammas, self.betas)),
            w_out=t(self.w_out[i][:, None]), b_out=t(self.b_out[i : i + 1]), mean=t(self.mean[i]),
            inv_std=t(self.inv_std[i]))

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
            grad = torch.ops.aten.native_layer_norm_backward(grad, a, a.shape[-1:], mu, rstd, g, beta,
                                                             [True, False, False])[0]
            grad = grad @ w_t
        return energy, grad * self.inv_std

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.energy_and_grad(h)[0]


def _layer_norm(a: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(a, a.shape[-1:], eps=LN_EPS) * g[:, None] + beta[:, None]


def info_nce(e_good: torch.Tensor, e_bad: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE over energies, per member: each good state is the positive against all bad ones.

    e_good [S, P], e_bad [S, N] -> loss [S] = mean_i -log softmax([-e_good_i, -e_bad_1..N] / tau)[0].
    """
    pos = -e_good[:, :, None] / tau
    neg = (-e_bad / tau)[:, None, :].expand(-1, e_good.shape[1], -1)
    logits = torch.cat([pos, neg], dim=-1)
    return -(logits.log_softmax(-1)[..., 0]).mean(-1)


def pairwise_auc(e_good: torch.Tensor, e_bad: torch.Tensor) -> torch.Tensor:
    """P[E(good) < E(bad)] per member (ties count half): [S, P], [S, N] -> [S].

    Shift-invariant like the loss, unlike the authors' sign rule (E < 0 counted as good).
    """
    diff = e_good[:, :, None] - e_bad[:, None, :]
    return (diff < 0).float().mean((1, 2)) + 0.5 * (diff == 0).float().mean((1, 2))


def stratified_split(states: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train/validation indices with every state represented in both where it has two or more rows."""
    rng = random.Random(seed)
    train, val = [], []
    for s in STATES:
        idx = [i for i, st in enumerate(states) if st == s]
        rng.shuffle(idx)
        k = round(len(idx) * val_fraction) if len(idx) > 1 else 0
        k = max(k, 1) if len(idx) > 1 else k
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def balanced_weights(states: list[str], side: tuple[str, ...]) -> torch.Tensor:
    """Sampling weights over rows so each state of one side (the good or the bad states) is drawn equally
    often: no state is dropped and no state dominates because it is common."""
    present = [s for s in side if s in states]
    w = torch.tensor([0.0 if s not in present else 1.0 / states.count(s) for s in states])
    return w / len(present) if present else w


@dataclass
class TrainConfig:
    widths: tuple[int, ...] = (512, 256)
    dropout: float = 0.15
    tau: float = 0.1
    lr: float = 5e-5
    batch_size: int = 64
    epochs: int = 120
    patience: int = 15
    val_fraction: float = 0.2
    seed: int = 0
    # The recipe's contrast (`els run`): the paper's four-state one put harmful prompts' answers in the
    # energy too, and steered benign prompts towards "safe refusal" as often as towards answering.
    contrast: str = "benign"  # see CONTRASTS


@dataclass
class TrainResult:
    energy: EnergyStack  # best epoch per layer, eval mode
    val_auc: list[float]
    train_auc: list[float]
    best_epoch: list[int]
    epochs_run: int
    val_index: list[int]  # rows of the activations held out for validation
    history: list[list[float]] = field(default_factory=list)  # val AUC per epoch per layer


def train_energy(acts: torch.Tensor, states: list[str], cfg: TrainConfig = TrainConfig(),
                 layers: list[int] | None = None, dtype: torch.dtype = torch.float32) -> TrainResult:
    """Train one energy model per layer on activations [N, L, d] labelled with the four states.

    Rows of the states `cfg.contrast` names take part (all four by default). Every step draws a batch of
    good and a batch of bad rows, balanced over the states; all layers see the same rows. Each layer keeps
    the weights of its best validation-AUC epoch; training stops when the mean validation AUC over layers
    has not improved for `patience` epochs. `val_index` in the result indexes `acts`. `dtype` is the training
    precision (float64 lets tests compare runs to rounding).
    """
    if cfg.contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {list(CONTRASTS)}, got {cfg.contrast!r}")
    good_states, bad_states = CONTRASTS[cfg.contrast]
    layers = list(range(acts.shape[1])) if layers is None else layers
    if not set(states) & set(good_states) or not set(states) & set(bad_states):
        raise ValueError(
            f"the {cfg.contrast} energy needs good states {good_states} and bad states {bad_states}; the "
            f"collection has {sorted(set(states))}. Add prompts the model refuses falsely or answers harmfully "
            "(or vice versa)."
        )
    used = [i for i, s in enumerate(states) if s in good_states + bad_states]
    tr, va = ([used[i] for i in part] for part in stratified_split([states[i] for i in used], cfg.val_fraction,
                                                                      cfg.seed))
    good = torch.tensor([s in good_states for s in states])
    x = acts[:, layers].transpose(0, 1).to(dtype)  # [S, N, d]
    x_tr, x_va = x[:, tr], x[:, va]
    st_tr = [states[i] for i in tr]
    good_tr, good_va = good[tr], good[va]
    w_good, w_bad = balanced_weights(st_tr, good_states), balanced_weights(st_tr, bad_states)

    torch.manual_seed(cfg.seed)
    model = EnergyStack(len(layers), acts.shape[-1], cfg.widths, cfg.dropout,
                        seeds=[cfg.seed * 100_003 + layer for layer in layers]).to(dtype)
    model.set_standardisation(x_tr)
    # The fused CPU kernel is about 2.5x faster than the default here; Adam dominates a step for large stacks.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = max(1, math.ceil(max(int(good_tr.sum()), int((~good_tr).sum())) / cfg.batch_size))
    best_auc = torch.full((len(layers),), -1.0)
    best_epoch = [0] * len(layers)
    best_state = copy.deepcopy(model.state_dict())
    history, epoch = [], 0
    best_mean, best_mean_epoch = -1.0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for _ in range(steps):
            gi = torch.multinomial(w_good, cfg.batch_size, replacement=True, generator=gen)
            bi = torch.multinomial(w_bad, cfg.batch_size, replacement=True, generator=gen)
            e = model(x_tr[:, torch.cat([gi, bi])])  # one pass for both sides: half the kernel calls
            loss = info_nce(e[:, : cfg.batch_size], e[:, cfg.batch_size :], cfg.tau).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        auc = evaluate_auc(model, x_va, good_va)
        history.append(auc.tolist())
        improved = auc > best_auc
        if improved.any():
            best_auc = torch.where(improved, auc, best_auc)
            state = model.state_dict()
            for k, v in best_state.items():
                v[improved] = state[k][improved]
            for s in improved.nonzero().flatten().tolist():
                best_epoch[s] = epoch
        # Per-layer AUCs on a small validation set rise by chance now and then; stopping when the mean over
        # layers stalls ends training once the layers have, as a whole, stopped learning.
        if auc.mean() > best_mean:
            best_mean, best_mean_epoch = float(auc.mean()), epoch
        if epoch - best_mean_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    train_auc = evaluate_auc(model, x_tr, good_tr)
    return TrainResult(model, best_auc.tolist(), train_auc.tolist(), best_epoch, epoch, va, history)


@torch.no_grad()
def evaluate_auc(model: EnergyStack, x: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    e = model(x)
    model.train(was_training)
    return pairwise_auc(e[:, good], e[:, ~good])


def fit_harm_probe(acts: torch.Tensor, harmful: torch.Tensor, train: list[int], l2: float = 1e-2,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer logistic regression of "the prompt is harmful" on activations [N, S, d].

    Returns weights [S, d] and biases [S] acting on raw activations. It lets steering leave alone the rows
    that look harmful: the energy alone ranks "will refuse" high for benign and harmful prompts alike.
    """
    x = acts[train].transpose(0, 1).float()  # [S, n, d]
    y = harmful[train].float()
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True) + 1e-3
    z = (x - mu) / sd
    w = torch.zeros(x.shape[0], x.shape[2], requires_grad=True)
    b = torch.zeros(x.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.einsum("snd,sd->sn", z, w) + b[:, None]
        loss = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits)) * x.shape[0] + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd[:, 0]).detach()
    return w_raw, (b - (mu[:, 0] * w_raw).sum(-1)).detach()
