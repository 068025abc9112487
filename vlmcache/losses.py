"""Imbalance-aware classification losses, built once from the training class counts.

`build_loss(name, class_counts, **params)` returns an `nn.Module` called as `loss(logits, targets)`.
Per-class constants are buffers, so they follow `.to(device)`. Classes without training images are
counted as one image, so that weights and log-priors stay finite.

Re-weighting losses (cbw, cb, grw) weight each sample by its class weight and average over the batch,
with weights normalised to sum to the number of classes, as in Cui et al. (2019): equal counts give CE.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.errors import VlmcacheError, checked_params, unknown_choice


def _counts(class_counts) -> torch.Tensor:
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).clamp(min=1)
    if counts.ndim != 1 or len(counts) < 2:
        raise VlmcacheError(f"class_counts must be one count per class (2 or more classes), got shape {counts.shape}.")
    return counts


def _normalised(w: torch.Tensor) -> torch.Tensor:
    return (w / w.sum() * len(w)).float()


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok:
        raise VlmcacheError(f"The loss parameter {name}={value} is invalid: {rule}.")


class CrossEntropy(nn.Module):
    """Plain softmax cross-entropy."""

    def __init__(self, class_counts):
        super().__init__()
        _counts(class_counts)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


class FocalLoss(nn.Module):
    """Focal loss, Lin et al. 2017: -(1 - p_t)^gamma log p_t."""

    def __init__(self, class_counts, gamma: float = 2.0):
        super().__init__()
        _counts(class_counts)
        _check("gamma", gamma, gamma >= 0, "gamma >= 0")
        self.gamma = gamma

    def forward(self, logits, targets):
        logpt = F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
        return (-((1 - logpt.exp()) ** self.gamma) * logpt).mean()


REDUCTIONS = ("mean", "weighted_mean")


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with a weight per class; subclasses say how the weights follow from the counts.

    `reduction="mean"` (Cui et al. 2019): the mean of w_y * l over the batch, weights summing to the number of
    classes. `"weighted_mean"` (the seed's code, PyTorch's `F.cross_entropy(weight=w)`): sum of w_y * l over the
    sum of w_y in the batch, so a batch of tail samples takes as large a step as a batch of head samples."""

    def __init__(self, weights: torch.Tensor, reduction: str = "mean"):
        super().__init__()
        _check("reduction", reduction, reduction in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}")
        self.register_buffer("weights", weights)
        self.reduction = reduction

    def forward(self, logits, targets):
        w = self.weights[targets]
        weighted = w * F.cross_entropy(logits, targets, reduction="none")
        return weighted.sum() / w.sum() if self.reduction == "weighted_mean" else weighted.mean()


class InverseFrequencyCE(WeightedCrossEntropy):
    """Class-balanced re-weighting (CBW): weights proportional to 1 / n_c."""

    def __init__(self, class_counts, reduction: str = "mean"):
        super().__init__(_normalised(1.0 / _counts(class_counts)), reduction)


class ClassBalancedCE(WeightedCrossEntropy):
    """Class-balanced loss, Cui et al. 2019: weights (1 - beta) / (1 - beta^n_c), the inverse effective number."""

    def __init__(self, class_counts, beta: float = 0.9999, reduction: str = "mean"):
        _check("beta", beta, 0 <= beta < 1, "0 <= beta < 1")
        super().__init__(_normalised((1 - beta) / (1 - beta ** _counts(class_counts))), reduction)


class GRWLoss(WeightedCrossEntropy):
    """Generalized re-weighting, Zhang et al. 2021 (DisAlign): weights proportional to (1 / n_c)^exponent."""

    def __init__(self, class_counts, exponent: float = 1.2, reduction: str = "mean"):
        _check("exponent", exponent, exponent >= 0, "exponent >= 0")
        super().__init__(_normalised(_counts(class_counts) ** -exponent), reduction)


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted loss, Menon et al. 2021: cross-entropy of logits + tau * log prior."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        counts = _counts(class_counts)
        self.register_buffer("log_prior", (counts / counts.sum()).log().float())
        self.tau = tau

    def forward(self, logits, targets):
        return F.cross_entropy(logits + self.tau * self.log_prior, targets)


class BalancedSoftmax(LogitAdjustedLoss):
    """Balanced softmax, Ren et al. 2020: cross-entropy of logits + log prior (logit adjustment with tau 1)."""

    def __init__(self, class_counts):
        super().__init__(class_counts, tau=1.0)


class LDAMLoss(nn.Module):
    """LDAM, Cao et al. 2019: subtract m_c proportional to n_c^(-1/4) (largest max_margin) from the true logit,
    then cross-entropy of scale * logits. Margin and scale act on cosines in [-1, 1]: on a cosine classifier,
    train-head hands this loss the raw cosines (its own learnable scale is not applied twice). On a linear head,
    `scale=1.0` is the seed's form, CE(z - m)."""

    def __init__(self, class_counts, max_margin: float = 0.5, scale: float = 30.0):
        super().__init__()
        _check("max_margin", max_margin, max_margin > 0, "max_margin > 0")
        _check("scale", scale, scale > 0, "scale > 0")
        margins = _counts(class_counts) ** -0.25
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.scale = scale

    def forward(self, logits, targets):
        adjusted = logits - F.one_hot(targets, logits.shape[1]) * self.margins[targets][:, None]
        return F.cross_entropy(self.scale * adjusted, targets)


class LADELoss(nn.Module):
    """LADE, Hong et al. 2021: PC softmax cross-entropy (logits + log prior) plus `weight` times the
    LADER regulariser, which estimates each class's logit under a uniform target prior (ReMINE, lambda).

    `regularizer_logits="raw"` (the paper) feeds the model's logits to the regulariser; `"adjusted"` (the seed's
    code) feeds it the logits plus the log prior, as its PC softmax term sees them."""

    def __init__(self, class_counts, weight: float = 0.1, remine_lambda: float = 0.1, regularizer_logits: str = "raw"):
        super().__init__()
        _check("weight", weight, weight >= 0, "weight >= 0")
        _check("remine_lambda", remine_lambda, remine_lambda >= 0, "remine_lambda >= 0")
        _check("regularizer_logits", regularizer_logits, regularizer_logits in ("raw", "adjusted"), "raw or adjusted")
        self.adjusted = regularizer_logits == "adjusted"
        counts = _counts(class_counts)
        prior = counts / counts.sum()
        self.register_buffer("log_prior", prior.log().float())
        self.register_buffer("prior", prior.float())
        self.weight, self.remine_lambda = weight, remine_lambda

    def forward(self, logits, targets):
        pc_ce = F.cross_entropy(logits + self.log_prior, targets)
        if self.adjusted:
            logits = logits + self.log_prior
        num_classes, n = logits.shape[1], logits.shape[0]
        onehot = F.one_hot(targets, num_classes).to(logits.dtype)  # (B, C)
        per_class = onehot.sum(0)  # samples of each class in the batch
        first = (logits * onehot).sum(0) / (per_class + 1e-8)  # mean logit of class c on its own samples
        # log-mean-exp over the batch of the logits moved to a uniform prior
        second = torch.logsumexp(logits - self.log_prior - math.log(num_classes), dim=0) - math.log(n)
        bound = first - second - self.remine_lambda * second**2
        return pc_ce - self.weight * (bound * self.prior).sum()


LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropy,
    "focal": FocalLoss,
    "cbw": InverseFrequencyCE,
    "cb": ClassBalancedCE,
    "balanced_softmax": BalancedSoftmax,
    "grw": GRWLoss,
    "lade": LADELoss,
    "ldam": LDAMLoss,
    "logit_adjust": LogitAdjustedLoss,
}


def loss_params(name: str) -> dict[str, object]:
    """The hyper-parameters of a loss with their defaults, e.g. {'gamma': 2.0} for focal."""
    if name not in LOSSES:
        raise unknown_choice("loss", name, LOSSES)
    sig = inspect.signature(LOSSES[name].__init__)
    return {k: p.default for k, p in sig.parameters.items() if k not in ("self", "class_counts")}


def build_loss(name: str, class_counts, **params) -> nn.Module:
    """A loss by name, built once from the training class counts; unknown names and parameters are errors."""
    typed = checked_params(f"loss '{name}'", params, loss_params(name))
    return LOSSES[name](class_counts, **typed)
