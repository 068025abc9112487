"""Which training rows an epoch visits: one index tensor per epoch, drawn on the features' device.

Any sampler works with any loss. A sampler with exponent q draws class c with probability proportional to
n_c^q: q = 1 is instance sampling (every row once, shuffled), q = 0 class-balanced (Kang et al. 2020),
q = 1/2 square-root sampling (Mahajan et al. 2018).
"""

from __future__ import annotations

import torch

from vlmcache.errors import unknown_choice

SAMPLERS: dict[str, float] = {"instance": 1.0, "class_balanced": 0.0, "sqrt": 0.5}


class ClassPowerSampler:
    """Rows drawn with replacement so that class c has probability proportional to n_c^q (q < 1)."""

    def __init__(self, labels: torch.Tensor, q: float):
        counts = torch.bincount(labels).double()
        self.q = q
        self.n = len(labels)
        self.weights = (counts[labels] ** (q - 1)).float() if q != 1 else None  # per row: n_c^q / n_c

    def epoch(self, generator: torch.Generator) -> torch.Tensor:
        if self.weights is None:
            return torch.randperm(self.n, generator=generator, device=generator.device)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)


def build_sampler(name: str, labels: torch.Tensor) -> ClassPowerSampler:
    if name not in SAMPLERS:
        raise unknown_choice("sampler", name, SAMPLERS)
    return ClassPowerSampler(labels, SAMPLERS[name])
