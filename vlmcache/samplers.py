"""Which training rows an epoch visits: one index tensor per epoch, drawn on the features' device.

Any sampler works with any loss. A sampler with exponent q draws class c with probability proportional to
n_c^q: q = 1 is instance sampling (every row once, shuffled), q = 0 class-balanced (Kang et al. 2020),
q = 1/2 square-root sampling (Mahajan et al. 2018).
"""

from __future__ import annotations

import torch

from vlmcache.errors import VlmcacheError, checked_params, unknown_choice

SAMPLERS: dict[str, float] = {"instance": 1.0, "class_balanced": 0.0, "sqrt": 0.5}


class ClassPowerSampler:
    """Rows drawn so that class c has probability proportional to n_c^q; `size` indices per epoch.

    `replacement=True` (the papers' samplers): `num_samples` independent draws (default: one per row).
    `replacement=False` (the seed's WeightedRandomSampler): each block of n draws is a weighted permutation of all
    n rows, so whole blocks visit every row once whatever the weights, and only a last partial block (the first
    `num_samples mod n` rows of a weighted permutation) leans toward the weights. At the seed's 65,536 draws per
    epoch on Places-LT's 62,500 images this gives shares close to instance sampling.
    """

    def __init__(self, labels: torch.Tensor, q: float, replacement: bool = True, num_samples: int | None = None):
        counts = torch.bincount(labels).double()
        self.q, self.replacement = q, replacement
        self.n = len(labels)
        if num_samples is not None and num_samples < 1:
            raise VlmcacheError(f"The sampler parameter num_samples must be at least 1, got {num_samples}.")
        self.size = int(num_samples) if num_samples else self.n
        self.weights = (counts[labels] ** (q - 1)).float() if q != 1 else None  # per row: n_c^q / n_c

    def epoch(self, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        if self.weights is not None and self.replacement:
            return torch.multinomial(self.weights.to(device), self.size, replacement=True, generator=generator)
        blocks = []
        for start in range(0, self.size, self.n):  # whole permutations, then the head of one more
            if self.weights is None:
                block = torch.randperm(self.n, generator=generator, device=device)
            else:
                block = torch.multinomial(self.weights.to(device), self.n, replacement=False, generator=generator)
            blocks.append(block[: min(self.n, self.size - start)])
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


def sampler_params(name: str) -> dict[str, object]:
    if name not in SAMPLERS:
        raise unknown_choice("sampler", name, SAMPLERS)
    return {"replacement": True, "num_samples": 0}  # num_samples 0: one draw per training row


def build_sampler(name: str, labels: torch.Tensor, **params) -> ClassPowerSampler:
    typed = checked_params(f"sampler '{name}'", params, sampler_params(name))
    return ClassPowerSampler(labels, SAMPLERS[name], typed.get("replacement", True), typed.get("num_samples") or None)
