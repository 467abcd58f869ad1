import math

import pytest
import torch
import torch.nn.functional as F

from els.core.stats import stratified_split
from els.steering.energy import STATES, EnergyStack
from els.training.energy import TrainConfig, balanced_weights, info_nce, train_energy


def test_info_nce_matches_hand_computation():
    e_good = torch.tensor([[0.0, 1.0]])
    e_bad = torch.tensor([[2.0, 0.5]])
    tau = 0.1
    expected = []
    for p in (0.0, 1.0):
        num = math.exp(-p / tau)
        den = num + math.exp(-2.0 / tau) + math.exp(-0.5 / tau)
        expected.append(-math.log(num / den))
    assert info_nce(e_good, e_bad, tau).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_info_nce_is_shift_invariant():
    e_good, e_bad = torch.randn(1, 5), torch.randn(1, 7)
    assert torch.allclose(info_nce(e_good, e_bad), info_nce(e_good + 3.0, e_bad + 3.0), atol=1e-5)


def test_balancing_keeps_every_state_and_equalises_them():
    states = ["helpful"] * 90 + ["safe_refusal"] * 10 + ["false_refusal"] * 3 + ["jailbreak"] * 40
    wg = balanced_weights(states, ("helpful", "safe_refusal"))
    wb = balanced_weights(states, ("false_refusal", "jailbreak"))
    for w, pair in ((wg, ("helpful", "safe_refusal")), (wb, ("false_refusal", "jailbreak"))):
        mass = [sum(float(w[i]) for i, s in enumerate(states) if s == st) for st in pair]
        assert mass == pytest.approx([0.5, 0.5])
    draws = torch.multinomial(wb, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    drawn = {states[i] for i in draws.tolist()}
    assert drawn == {"false_refusal", "jailbreak"}


def test_stratified_split_has_every_state_in_validation():
    states = ["helpful"] * 20 + ["safe_refusal"] * 5 + ["false_refusal"] * 2 + ["jailbreak"] * 9
    tr, va = stratified_split(states, 0.2, seed=0, strata=STATES)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(states)
    assert {states[i] for i in va} == set(states)


def test_closed_form_gradient_matches_autograd():
    torch.manual_seed(0)
    stack = EnergyStack(3, 24, (16, 12, 8), dropout=0.15).double()
    stack.set_standardisation(torch.randn(3, 50, 24, dtype=torch.double) * 5 + 2)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for g, b in zip(stack.gammas, stack.betas):
            g.add_(torch.randn_like(g) * 0.3)
            b.add_(torch.randn_like(b) * 0.3)
    stack.eval()
    h = (torch.randn(3, 10, 24, dtype=torch.double) * 5).requires_grad_()
    energy = stack(h)
    (auto,) = torch.autograd.grad(energy.sum(), h)
    # each member, laid out for steering ([B, d] rows), against autograd through the stack
    with torch.inference_mode():
        for i in range(3):
            e2, closed = stack.member(i).energy_and_grad(h[i].detach())
            assert torch.allclose(energy[i].detach(), e2, atol=1e-10)
            assert torch.allclose(auto[i], closed, atol=1e-10)
    # and in float32, to the tolerance the steering relies on
    s32 = stack.float()
    h32 = h.detach().float().requires_grad_()
    (auto32,) = torch.autograd.grad(s32(h32).sum(), h32)
    for i in range(3):
        assert torch.allclose(auto32[i], s32.member(i).energy_and_grad(h32[i].detach())[1], atol=1e-5)
    e_bf, g_bf = s32.member(1, dtype=torch.bfloat16).energy_and_grad(h32[1].detach().bfloat16())
    cos = F.cosine_similarity(g_bf.float(), auto32[1], dim=-1)
    assert e_bf.dtype == torch.bfloat16 and cos.min() > 0.99  # bf16: the step direction survives


def test_select_keeps_members():
    stack = EnergyStack(4, 8, (6,), seeds=[10, 11, 12, 13]).eval()
    sub = stack.select([1, 3])
    h = torch.randn(4, 5, 8)
    assert torch.allclose(stack(h)[[1, 3]], sub(h[[1, 3]]))


def test_init_does_not_depend_on_the_other_members():
    a = EnergyStack(3, 8, (6,), seeds=[5, 6, 7])
    b = EnergyStack(1, 8, (6,), seeds=[6])
    assert torch.equal(a.weights[0][1], b.weights[0][0])


def _separable(n=400, layers=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = (["helpful", "false_refusal", "safe_refusal", "jailbreak"] * n)[:n]
    good = torch.tensor([s in ("helpful", "safe_refusal") for s in states])
    signal = torch.linspace(0.2, 1.5, layers)  # deeper layers separate better
    acts = torch.randn(n, layers, dim, generator=g)
    acts[:, :, 0] += torch.where(good, -1.0, 1.0)[:, None] * signal
    return acts, states


def test_training_learns_and_ranks_layers():
    acts, states = _separable()
    res = train_energy(acts, states, TrainConfig(widths=(16,), epochs=30, lr=3e-3, batch_size=32, patience=30))
    assert res.val_auc[-1] > 0.8
    assert res.val_auc[-1] > res.val_auc[0]
    assert res.energy.training is False


def test_stacked_training_equals_one_layer_at_a_time():
    # float64, same seeds and batches: each member of the stack is the model trained alone, to rounding. The
    # output bias is the exception: InfoNCE is shift-invariant, so its gradient is rounding noise that Adam
    # rescales; it moves by ~1e-9 and changes no ranking.
    acts, states = _separable()
    cfg = TrainConfig(widths=(16,), epochs=8, lr=3e-3, batch_size=32, dropout=0.0, patience=100)
    stacked = train_energy(acts, states, cfg, dtype=torch.float64)
    assert stacked.energy.w_out.dtype == torch.float64
    for layer in range(acts.shape[1]):
        single = train_energy(acts, states, cfg, layers=[layer], dtype=torch.float64)
        assert single.val_auc[0] == stacked.val_auc[layer] and single.best_epoch[0] == stacked.best_epoch[layer]
        stacked_state = stacked.energy.state_dict()
        for name, value in single.energy.state_dict().items():
            tol = 1e-7 if name == "b_out" else 1e-12
            assert torch.allclose(value[0], stacked_state[name][layer], rtol=0, atol=tol), name


def test_training_refuses_one_sided_data():
    acts = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="needs good states .* and bad states"):
        train_energy(acts, ["helpful"] * 5 + ["safe_refusal"] * 5)


def test_benign_contrast_trains_on_benign_states_only():
    torch.manual_seed(0)
    states = ["helpful"] * 30 + ["false_refusal"] * 30 + ["safe_refusal"] * 20 + ["jailbreak"] * 20
    acts = torch.randn(len(states), 2, 8)
    acts[:30, :, 0] -= 6.0  # helpful rows sit apart on one axis
    res = train_energy(acts, states, TrainConfig(widths=(8,), epochs=40, lr=3e-3, batch_size=16, contrast="benign"))
    assert {states[i] for i in res.val_index} == {"helpful", "false_refusal"}
    assert min(res.val_auc) > 0.8
    with pytest.raises(ValueError, match="false_refusal"):
        train_energy(acts[30:60], states[30:60], TrainConfig(contrast="benign"))
    with pytest.raises(ValueError, match="contrast"):
        train_energy(acts, states, TrainConfig(contrast="other"))
