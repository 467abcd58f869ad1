"""Energy training: one model per layer, all in one `EnergyStack`, trained with InfoNCE so good states get
low energy (batched matmuls over layers, not a Python loop)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from els.core.stats import auroc, fit_logistic, stratified_split
from els.steering.energy import CONTRASTS, STATES, EnergyStack


def info_nce(e_good: torch.Tensor, e_bad: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """InfoNCE over energies, per member: each good state is the positive against all bad ones.

    e_good [S, P], e_bad [S, N] -> loss [S] = mean_i -log softmax([-e_good_i, -e_bad_1..N] / tau)[0].
    """
    pos = -e_good[:, :, None] / tau
    neg = (-e_bad / tau)[:, None, :].expand(-1, e_good.shape[1], -1)
    logits = torch.cat([pos, neg], dim=-1)
    return -(logits.log_softmax(-1)[..., 0]).mean(-1)


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


def train_energy(
    acts: torch.Tensor,
    states: list[str],
    cfg: TrainConfig = TrainConfig(),
    layers: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TrainResult:
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
    tr, va = (
        [used[i] for i in part]
        for part in stratified_split([states[i] for i in used], cfg.val_fraction, cfg.seed, STATES)
    )
    good = torch.tensor([s in good_states for s in states])
    x = acts[:, layers].transpose(0, 1).to(dtype)  # [S, N, d]
    x_tr, x_va = x[:, tr], x[:, va]
    st_tr = [states[i] for i in tr]
    good_tr, good_va = good[tr], good[va]
    w_good, w_bad = balanced_weights(st_tr, good_states), balanced_weights(st_tr, bad_states)

    torch.manual_seed(cfg.seed)
    model = EnergyStack(
        len(layers), acts.shape[-1], cfg.widths, cfg.dropout, seeds=[cfg.seed * 100_003 + layer for layer in layers]
    ).to(dtype)
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
    return auroc(e[:, ~good], e[:, good])  # P[E(good) < E(bad)]: shift-invariant, like the loss


def fit_harm_probe(
    acts: torch.Tensor,
    harmful: torch.Tensor,
    train: list[int],
    l2: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer logistic regression of "the prompt is harmful" on activations [N, S, d], each layer on its
    standardised `train` rows (mean loss + l2 * |w|^2).

    Returns weights [S, d] and biases [S] acting on raw activations. It lets steering leave alone the rows
    that look harmful: the energy alone ranks "will refuse" high for benign and harmful prompts alike.
    """
    x = acts[train].float()
    y = harmful[train].float()
    weights, biases = [], []
    for layer in range(x.shape[1]):
        mu, sd = x[:, layer].mean(0), x[:, layer].std(0) + 1e-3
        w, b = fit_logistic((x[:, layer] - mu) / sd, y, torch.ones(len(y)), l2)
        weights.append(w / sd)
        biases.append(b - mu @ (w / sd))
    return torch.stack(weights), torch.stack(biases)
