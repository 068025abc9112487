"""Each loss against a direct implementation of its paper's formula (value and gradient), written here
sample by sample and class by class, independently of vlmcache.losses."""

import math

import numpy as np
import pytest
import torch

from vlmcache.errors import VlmcacheError
from vlmcache.losses import LOSSES, build_loss, loss_params

COUNTS = [500, 120, 40, 9, 2]
C = len(COUNTS)


def _softmax_ce(z, y):  # -log softmax(z)_y for one sample
    return -(z[y] - torch.logsumexp(z, 0))


def _mean(values):
    return torch.stack(values).mean()


def ref_ce(z, t):
    return _mean([_softmax_ce(z[i], t[i]) for i in range(len(t))])


def ref_focal(z, t, gamma=2.0):  # Lin et al. 2017, eq. 5 without alpha
    out = []
    for i in range(len(t)):
        p = torch.exp(z[i][t[i]]) / torch.exp(z[i]).sum()
        out.append(-((1 - p) ** gamma) * torch.log(p))
    return _mean(out)


def _weighted(z, t, w):  # mean over the batch of w_y * CE, weights normalised to sum to C
    w = [wc / sum(w) * C for wc in w]
    return _mean([w[t[i]] * _softmax_ce(z[i], t[i]) for i in range(len(t))])


def ref_cbw(z, t):
    return _weighted(z, t, [1 / n for n in COUNTS])


def ref_cb(z, t, beta=0.9999):  # Cui et al. 2019: effective number E_n = (1 - beta^n) / (1 - beta)
    return _weighted(z, t, [(1 - beta) / (1 - beta**n) for n in COUNTS])


def ref_grw(z, t, exponent=1.2):
    return _weighted(z, t, [(1 / n) ** exponent for n in COUNTS])


def _prior():
    return [n / sum(COUNTS) for n in COUNTS]


def ref_balanced_softmax(z, t):  # Ren et al. 2020: softmax with n_j exp(z_j)
    out = []
    for i in range(len(t)):
        num = COUNTS[t[i]] * torch.exp(z[i][t[i]])
        den = sum(COUNTS[j] * torch.exp(z[i][j]) for j in range(C))
        out.append(-torch.log(num / den))
    return _mean(out)


def ref_logit_adjust(z, t, tau=1.0):  # Menon et al. 2021, eq. 10
    pi = _prior()
    return _mean(
        [
            -torch.log(
                torch.exp(z[i][t[i]] + tau * math.log(pi[t[i]]))
                / sum(torch.exp(z[i][j] + tau * math.log(pi[j])) for j in range(C))
            )
            for i in range(len(t))
        ]
    )


def ref_ldam(z, t, max_margin=0.5, scale=30.0):  # Cao et al. 2019, eq. 13: Delta_j = K / n_j^(1/4)
    k = max_margin / max(n**-0.25 for n in COUNTS)
    out = []
    for i in range(len(t)):
        y = int(t[i])
        zy = scale * (z[i][y] - k * COUNTS[y] ** -0.25)
        others = [scale * z[i][j] for j in range(C) if j != y]
        out.append(-(zy - torch.logsumexp(torch.stack([zy, *others]), 0)))
    return _mean(out)


def ref_lade(z, t, weight=0.1, remine_lambda=0.1):  # Hong et al. 2021, eqs. 11-13, uniform target prior
    pi = _prior()
    n = len(t)
    pc = _mean([_softmax_ce(z[i] + torch.tensor(np.log(pi), dtype=z.dtype), t[i]) for i in range(n)])
    lader = 0
    for c in range(C):
        own = [z[i][c] for i in range(n) if t[i] == c]
        first = sum(own) / (len(own) + 1e-8) if own else torch.tensor(0.0, dtype=z.dtype)
        shifted = torch.stack([z[i][c] - math.log(pi[c]) + math.log(1 / C) for i in range(n)])
        second = torch.logsumexp(shifted, 0) - math.log(n)
        lader = lader + pi[c] * (first - second - remine_lambda * second**2)
    return pc - weight * lader


REFERENCES = {
    "ce": ref_ce,
    "focal": ref_focal,
    "cbw": ref_cbw,
    "cb": ref_cb,
    "grw": ref_grw,
    "balanced_softmax": ref_balanced_softmax,
    "logit_adjust": ref_logit_adjust,
    "ldam": ref_ldam,
    "lade": ref_lade,
}


def test_every_loss_has_a_reference():
    assert set(REFERENCES) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_value_and_gradient_match_the_paper(name):
    g = torch.Generator().manual_seed(hash(name) % 1000)
    z = (torch.randn(16, C, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randint(0, C, (16,), generator=g)
    t[:3] = torch.tensor([4, 3, 0])  # the tail classes appear
    if name == "ldam":
        z = torch.tanh(z).detach().requires_grad_(True)  # LDAM works on cosine logits
    loss = build_loss(name, COUNTS).double()
    got = loss(z, t)
    (grad_got,) = torch.autograd.grad(got, z)
    z2 = z.detach().clone().requires_grad_(True)
    want = REFERENCES[name](z2, t)
    (grad_want,) = torch.autograd.grad(want, z2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "name, params",
    [
        ("focal", {"gamma": 0.5}),
        ("cb", {"beta": 0.99}),
        ("grw", {"exponent": 0.5}),
        ("ldam", {"max_margin": 0.3, "scale": 10}),
        ("lade", {"weight": 1.0, "remine_lambda": 0.5}),
        ("logit_adjust", {"tau": 2.0}),
    ],
)
def test_parameters_reach_the_formula(name, params):
    z = torch.randn(12, C, dtype=torch.float64)
    if name == "ldam":
        z = torch.tanh(z)
    t = torch.arange(12) % C
    torch.testing.assert_close(build_loss(name, COUNTS, **params).double()(z, t), REFERENCES[name](z, t, **params))


def test_focal_with_gamma_zero_is_ce_and_equal_counts_reduce_to_ce():
    z, t = torch.randn(20, 4), torch.arange(20) % 4
    ce = build_loss("ce", [5, 5, 5, 5])(z, t)
    torch.testing.assert_close(build_loss("focal", [5] * 4, gamma=0.0)(z, t), ce)
    for name in ("cbw", "cb", "grw", "balanced_softmax", "logit_adjust"):
        torch.testing.assert_close(build_loss(name, [5] * 4)(z, t), ce, msg=name)


def test_bad_names_and_parameters_are_clear():
    with pytest.raises(VlmcacheError, match="Did you mean 'focal'"):
        build_loss("focall", COUNTS)
    with pytest.raises(VlmcacheError, match="has no parameter 'gama'; its parameters: gamma"):
        build_loss("focal", COUNTS, gama=1)
    with pytest.raises(VlmcacheError, match="beta=1.0 is invalid"):
        build_loss("cb", COUNTS, beta=1.0)
    with pytest.raises(VlmcacheError, match="not a float"):
        build_loss("focal", COUNTS, gamma="two")
    assert build_loss("focal", COUNTS, gamma="1.5").gamma == 1.5  # strings from the CLI are typed
    assert loss_params("lade") == {"weight": 0.1, "remine_lambda": 0.1, "regularizer_logits": "raw"}
    assert loss_params("ldam") == {"max_margin": 0.5, "scale": 30.0}


def test_constants_follow_the_module_to_a_device_and_zero_counts_stay_finite():
    loss = build_loss("balanced_softmax", [10, 0, 3])
    assert "log_prior" in dict(loss.named_buffers())
    assert torch.isfinite(loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])))
