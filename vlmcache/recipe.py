"""The training recipe that train-head and finetune share, below both: protocols and each method's seed form,
the config checks, optimisers with their weight-decay groups, learning-rate schedules, and the divergence check.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from vlmcache import schemas
from vlmcache.errors import VlmcacheError, checked_params, unknown_choice
from vlmcache.heads import head_params
from vlmcache.losses import LOSSES, build_loss, loss_params
from vlmcache.samplers import SAMPLERS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "seed_cosine")

# Settings a protocol fills when the user leaves them unset. "default": the method papers' losses with AdamW and a
# cosine decay over epochs, the last epoch reported. "seed": the seed study's code (Imbalance-VLM/Imbalance-VLM;
# FIDELITY.md has the file and line of each value).
PROTOCOLS: dict[str, dict] = {
    "default": dict(
        epochs=30,
        batch_size=256,
        lr=1e-3,
        weight_decay=1e-4,
        optimizer="adamw",
        momentum=0.9,
        nesterov=False,
        iters=0,
        min_steps=2000,
        warmup_iters=0,
        schedule="cosine",
        select_on="",
        drop_last=False,
        eval_every=0,
    ),
    "seed": dict(
        epochs=32,
        batch_size=256,
        lr=0.03,
        weight_decay=5e-4,
        optimizer="sgd",
        momentum=0.9,
        nesterov=True,
        iters=8192,
        min_steps=0,
        warmup_iters=512,
        schedule="seed_cosine",
        select_on="val",
        drop_last=True,  # get_data_loader's default (build.py L83)
        eval_every=256,  # num_eval_iter; EvaluationHook also scores the last step (hooks/evaluation.py L15)
    ),
    # LIFT (Shi et al., ICML 2024; GitHub shijxcs/LIFT), read from utils/config.py lines 21-26 and
    # configs/model/clip_vit_b16.yaml: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, 10 epochs (20 on
    # iNaturalist: LIFT_EPOCHS). Its method settings (tail head, loss, classifier, text init) are LIFT_SWITCHES.
    "lift": dict(
        epochs=10,
        batch_size=128,
        lr=0.01,
        weight_decay=5e-4,
        optimizer="sgd",
        momentum=0.9,
        nesterov=False,
        iters=0,
        min_steps=0,
        warmup_iters=0,
        schedule="cosine",
        select_on="",
        drop_last=False,  # trainer.py L175-177: DataLoader(shuffle=True) keeps the last partial batch
        eval_every=0,  # LIFT tests once, after training
    ),
}
# LIFT's method, as the tail head's parameters and train-head's settings (FIDELITY.md, "LIFT" table, has each
# value's file and line): AdaptFormer in the tuned blocks, a cosine classifier at a fixed scale 25 on the class
# token after ln_post (no projection), initialised from "a photo of a {}." texts, the logit-adjusted loss (tau 1).
LIFT_SWITCHES: dict[str, object] = {
    "head_params": {"tune": "adapter", "classifier": "cosine", "features": "ln_post", "scale": 25.0,
                    "learn_scale": False},
    "loss": "logit_adjust",
    "loss_params": {"tau": 1.0},
    "text_init": "photo",
}  # fmt: skip
LIFT_EPOCHS = {"inat18": 20}  # scripts/run_tab1to4_main_results.sh: `num_epochs 20` on iNaturalist 2018
# The seed's form of each method, as parameters of the method (the papers' form is each default).
SEED_SWITCHES: dict[str, dict] = {
    "loss": {
        "cbw": {"reduction": "weighted_mean"},
        "cb": {"reduction": "weighted_mean"},
        "grw": {"reduction": "weighted_mean"},
        "lade": {"regularizer_logits": "adjusted"},
        "ldam": {"scale": 1.0},
    },
    "head": {"decoder": {"final_norm": False, "init": "seed"}},
    "stage2": {"crt": {"reinit": False}, "disalign": {"init": "seed", "decay": True}, "marc": {"decay": True}},
    # train-head replaces num_samples by the seed's arithmetic, (iters // epochs) * batch_size (seed_epoch_draws);
    # 65,536 is its value at the seed's defaults, which finetune (epochs, no step budget) keeps
    "sampler": {"replacement": False, "num_samples": 65536},
}


def seed_epoch_draws(iters: int, epochs: int, batch_size: int) -> int:
    """Rows the seed's sampler draws per epoch: `(num_train_iter // epoch) * batch_size` (imblearn/core/utils/
    build.py `get_data_loader`, L127-129), so that every epoch is the same number of whole batches and the
    epochs together make the step budget. Its train.py (L150) asserts that the budget divides into the epochs."""
    if iters % epochs:
        raise VlmcacheError(
            f"--protocol seed splits the step budget into equal epochs, as the seed's train.py does: --iters "
            f"({iters}) must be a multiple of --epochs ({epochs}); or set --sampler-param num_samples=N."
        )
    return iters // epochs * batch_size


def check_training_choices(cfg, counts: tuple[str, ...], head: str | None = None) -> None:
    """Loss, sampler and head by name, their parameters typed (in place), and counts of at least 1: shared by
    the configs of train-head and finetune, so that a mistake fails before any data is read. `head`: the head whose
    parameters these are, when not cfg.head (finetune --tail-blocks: the tail head, cfg.head its classifier)."""
    if cfg.loss not in LOSSES:
        raise unknown_choice("loss", cfg.loss, LOSSES)
    if cfg.sampler not in SAMPLERS:
        raise unknown_choice("sampler", cfg.sampler, SAMPLERS)
    cfg.loss_params = checked_params(f"loss '{cfg.loss}'", cfg.loss_params, loss_params(cfg.loss))
    build_loss(cfg.loss, [1, 1], **cfg.loss_params)
    head = head or cfg.head
    cfg.head_params = checked_params(f"{head} head", cfg.head_params, head_params(head))
    for name in counts:
        if not 1 <= getattr(cfg, name) <= schemas.COUNT_MAX:
            raise VlmcacheError(
                f"--{name.replace('_', '-')} must be between 1 and {schemas.COUNT_MAX}, got {getattr(cfg, name)}."
            )


PRIOR_ADJUSTED_LOSSES = ("balanced_softmax", "logit_adjust", "lade")  # train with logits shifted by the log prior
REWEIGHTING_LOSSES = ("cbw", "cb", "grw")
BALANCING_SAMPLERS = ("class_balanced", "sqrt")


def double_corrections(cfg) -> list[str]:
    """Settings that correct for the class prior twice. Allowed (a study may want them), but said."""
    out = []
    if cfg.loss in PRIOR_ADJUSTED_LOSSES and getattr(cfg, "logit_adjust", None):
        out.append(
            f"the loss '{cfg.loss}' already trains with logits adjusted by the class prior, and --logit-adjust "
            f"{cfg.logit_adjust} adjusts them again at evaluation: the prior is corrected twice."
        )
    if cfg.loss in REWEIGHTING_LOSSES + PRIOR_ADJUSTED_LOSSES and cfg.sampler in BALANCING_SAMPLERS:
        out.append(
            f"the loss '{cfg.loss}' re-balances classes and the sampler '{cfg.sampler}' does too: the classes are "
            f"balanced twice."
        )
    return out


def check_numbers(cfg) -> None:
    """Learning rates positive and finite, weight decay and momentum in range, post-hoc settings finite, the seed
    one that every generator takes: shared by train-head's and finetune's configs."""
    for name in ("lr", "head_lr"):
        value = getattr(cfg, name, None)
        if value is not None and not (schemas.finite(value) and value > 0):
            raise VlmcacheError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}.")
    if not (schemas.finite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise VlmcacheError(f"--weight-decay must be a finite number of 0 or more, got {cfg.weight_decay}.")
    momentum = getattr(cfg, "momentum", 0.0)
    if not (schemas.finite(momentum) and 0 <= momentum < 1):
        raise VlmcacheError(f"The momentum must be in [0, 1), got {momentum}.")
    for name in ("tau_norm", "logit_adjust"):
        value = getattr(cfg, name, None)
        if value is not None and not schemas.finite(value):
            raise VlmcacheError(f"--{name.replace('_', '-')} must be a finite number, got {value}.")
    if not 0 <= cfg.seed <= schemas.SEED_MAX:
        raise VlmcacheError(f"--seed must be between 0 and {schemas.SEED_MAX}, got {cfg.seed}.")
    if not 0 <= cfg.few <= cfg.many:
        raise VlmcacheError(f"The shot thresholds need 0 <= few <= many, got few={cfg.few}, many={cfg.many}.")


def param_groups(params: list[torch.nn.Parameter], weight_decay: float, **group) -> list[dict]:
    """Weight decay on matrices only. Biases, norm weights, the cosine head's logit scale and the per-class
    scales of LWS, MaRC and DisAlign (which start at 1) are vectors or scalars: decay would pull them toward 0,
    not regularise them. The same rule as open_clip's, timm's and the seed's training code (ndim < 2)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay, **group},
        {"params": no_decay, "weight_decay": 0.0, **group},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW or SGD (with the config's momentum and Nesterov) over `param_groups`, at the config's peak lr."""
    groups = param_groups(params, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov))
    return torch.optim.AdamW(groups, lr=cfg.lr)


def last_step_lr(sched: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate the last optimiser step used (of the first group). `get_last_lr()` after
    `sched.step()` is the next step's; this is the same product LambdaLR formed for the step before."""
    return sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch - 1)


def lr_factor(schedule: str, total: int, warmup: int = 0) -> Callable[[int], float]:
    """The learning rate's factor at step s: linear warm-up over `warmup` steps, then `cosine` (0.5 (1 + cos(pi t)),
    to zero at the end) or `seed_cosine` (cos(7 pi / 16 t), the seed's: it ends at about 0.2 of the peak).

    One closed form for a LambdaLR rather than torch's LinearLR + CosineAnnealingLR in a SequentialLR: LinearLR
    cannot start at 0 as the seed's warm-up does, CosineAnnealingLR's recursive form drifts from the closed form
    in the last bits, and torch has no cos(7 pi t / 16)."""
    cycles = 0.5 if schedule == "cosine" else 7 / 16

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return max(0.0, math.cos(math.pi * cycles * t))

    return factor


def check_finite_parameters(module: nn.Module) -> None:
    """A diverged model (NaN or inf in a weight) is a failed run, never a result."""
    for name, p in module.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            raise VlmcacheError(
                f"Training diverged: the parameter '{name}' holds NaN or inf, so the run is not saved. Lower --lr "
                f"or check the loss parameters."
            )
