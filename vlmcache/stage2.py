"""Decoupled second stages on a finished first-stage head, and post-hoc logit corrections.

Each stage-2 module maps the frozen head's features (B, F) to logits and says which parameters it trains.
Because the features are frozen, they are computed once for the whole training split and the second stage
trains on them in memory.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from vlmcache.errors import checked_params, unknown_choice


class CRT(nn.Module):
    """Classifier re-training, Kang et al. 2020: a freshly initialised classifier on frozen features.
    `reinit=False` (the seed's code for its CLIP decoder) fine-tunes the stage-1 classifier instead."""

    def __init__(self, classifier: nn.Module, reinit: bool = True):
        super().__init__()
        self.classifier = copy.deepcopy(classifier).requires_grad_(True)
        if reinit:
            self.classifier.reset_parameters()

    def forward(self, f):
        return self.classifier(f)


class LWS(nn.Module):
    """Learnable weight scaling, Kang et al. 2020: logits of the frozen classifier times a per-class scale."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(classifier.weight.shape[0]))

    def forward(self, f):
        return self.scale * self.classifier(f)


def class_params(num_classes: int, decay: bool) -> tuple[nn.Parameter, nn.Parameter]:
    """A per-class scale (init 1) and shift (init 0). Weight decay reaches matrices only (`recipe.param_groups`),
    so as vectors (C,) they are never decayed: decay would pull a scale that starts at 1 toward 0. With `decay`
    they are (1, C), as the seed's DisAlign_Net and MARC_Net hold them (imblearn/algorithms/supervised/utils.py
    L117-118, L144-145), and its `param_groups_weight_decay` (imblearn/nets/utils.py L90: only ndim <= 1 or names
    ending `.bias` exempt) decays them with the run's weight decay; the same rule here does the same."""
    shape = (1, num_classes) if decay else (num_classes,)
    return nn.Parameter(torch.ones(shape)), nn.Parameter(torch.zeros(shape))


class DisAlign(nn.Module):
    """Distribution alignment, Zhang et al. 2021: z + sigma(x) * (alpha * z + beta - z), with the confidence
    sigma(x) = sigmoid(g(x)) learnt from the features, and per-class alpha (init 1) and beta (init 0).

    `init="paper"`: (1 - sigma) z + sigma (alpha z + beta) with g initialised to zero, so step 0 gives the
    stage-1 logits. `init="seed"` (the seed's code): (1 + sigma alpha) z + sigma beta with g as nn.Linear
    initialises it, so step 0 scales the logits by 1 + sigma(g(x)).

    `decay=True` (the seed's): alpha and beta are weight-decayed (`class_params`)."""

    def __init__(self, classifier: nn.Module, init: str = "paper", decay: bool = False):
        super().__init__()
        if init not in ("paper", "seed"):
            raise unknown_choice("DisAlign init", init, ["paper", "seed"])
        self.classifier = classifier.requires_grad_(False)
        num_classes, dim = classifier.weight.shape
        self.alpha, self.beta = class_params(num_classes, decay)
        self.confidence = nn.Linear(dim, 1)
        self.seed_form = init == "seed"
        if not self.seed_form:
            nn.init.zeros_(self.confidence.weight)
            nn.init.zeros_(self.confidence.bias)

    def forward(self, f):
        z = self.classifier(f)
        s = torch.sigmoid(self.confidence(f))  # (B, 1)
        if self.seed_form:
            return (1 + s * self.alpha) * z + s * self.beta
        return (1 - s) * z + s * (self.alpha * z + self.beta)


class MaRC(nn.Module):
    """Margin calibration, Wang et al. 2022: omega_c * z_c + beta_c * ||w_c||, per-class omega (init 1), beta (0).
    `decay=True` (the seed's): omega and beta are weight-decayed (`class_params`)."""

    def __init__(self, classifier: nn.Module, decay: bool = False):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.omega, self.beta = class_params(classifier.weight.shape[0], decay)

    def forward(self, f):
        return self.omega * self.classifier(f) + self.beta * self.classifier.weight_norms()


@dataclass(frozen=True)
class Stage2Info:
    cls: type[nn.Module]
    sampler: str  # defaults when the user names none
    loss: str
    description: str


STAGE2: dict[str, Stage2Info] = {
    "crt": Stage2Info(CRT, "class_balanced", "ce", "re-train the classifier with class-balanced sampling"),
    "lws": Stage2Info(LWS, "class_balanced", "ce", "learn a per-class logit scale"),
    "disalign": Stage2Info(DisAlign, "instance", "grw", "confidence-gated per-class scale and bias"),
    "marc": Stage2Info(MaRC, "instance", "grw", "per-class margin calibration"),
}


def stage2_params(name: str) -> dict[str, object]:
    """A second stage's settings with their defaults, e.g. {'reinit': True} for crt."""
    if name not in STAGE2:
        raise unknown_choice("second stage", name, STAGE2)
    sig = inspect.signature(STAGE2[name].cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k not in ("self", "classifier")}


def build_stage2(name: str, classifier: nn.Module, **params) -> nn.Module:
    """A second stage by name on a frozen classifier; unknown names and parameters are errors."""
    typed = checked_params(f"second stage '{name}'", params, stage2_params(name))
    return STAGE2[name].cls(classifier, **typed)


def tau_normalized(classifier: nn.Module, tau: float) -> nn.Module:
    """Kang et al. 2020: divide each class weight by its norm^tau (bias dropped); post-hoc, no training."""
    out = copy.deepcopy(classifier)
    with torch.no_grad():
        out.weight.div_(out.weight.norm(dim=1, keepdim=True).clamp(min=1e-12) ** tau)
        if getattr(out, "bias", None) is not None:
            out.bias.zero_()
    return out


def logit_adjusted(logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment, Menon et al. 2021: logits - tau * log prior."""
    return logits - tau * log_prior
