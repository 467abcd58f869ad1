"""The shared statistics against scikit-learn's on the same data: AUROC and the logistic fit."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from els.core.stats import auroc, fit_logistic


def test_auroc_hand_values():
    assert float(auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))) == 1.0
    # pairs (1>0) (1<2) (3>0) (3>2): 3/4; a tie counts half
    assert float(auroc(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0]))) == pytest.approx(0.75)
    assert float(auroc(torch.tensor([1.0]), torch.tensor([1.0]))) == 0.5
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([1.0])))
    assert auroc(torch.zeros(3, 0), torch.zeros(3, 2)).isnan().all()


def test_auroc_matches_scikit_learn_with_ties_and_per_layer():
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 20, (5, 300), generator=g).double() + 3  # many ties, shifted up
    neg = torch.randint(0, 20, (5, 200), generator=g).double()
    got = auroc(pos, neg)
    assert got.shape == (5,) and got.dtype == torch.float64
    for layer in range(5):
        labels = np.r_[np.ones(300), np.zeros(200)]
        want = roc_auc_score(labels, np.r_[pos[layer].numpy(), neg[layer].numpy()])
        assert float(got[layer]) == pytest.approx(want, abs=1e-12)


def test_fit_logistic_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    n, d = 400, 20
    x = torch.randn(n, d, generator=g)
    y = (x[:, :3].sum(1) + 0.8 * torch.randn(n, generator=g) > 0.3).float()
    weight = torch.rand(n, generator=g) + 0.2
    for l2 in (1e-1, 1e-3):
        w, b = fit_logistic(x, y, weight, l2)
        ref = LogisticRegression(C=1 / (2 * l2), tol=1e-10, max_iter=10_000).fit(
            x.double().numpy(), y.numpy(), sample_weight=(weight / weight.sum()).double().numpy()
        )
        assert torch.allclose(w.double(), torch.from_numpy(ref.coef_[0]), atol=2e-4, rtol=0)
        assert float(b) == pytest.approx(float(ref.intercept_[0]), abs=2e-4)
        p = torch.sigmoid(x @ w + b).double()
        assert torch.allclose(p, torch.from_numpy(ref.predict_proba(x.double().numpy())[:, 1]), atol=1e-4)
        # Warm-started from another L2's optimum, the fit lands on the same point.
        w2, b2 = fit_logistic(x, y, weight, l2, init=fit_logistic(x, y, weight, 1.0))
        assert torch.allclose(w2, w, atol=1e-3) and float(b2) == pytest.approx(float(b), abs=1e-3)
