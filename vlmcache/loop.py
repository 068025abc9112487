"""Stage 2's training loop and what it runs: the model of a run (a head, optionally a second stage, post-hoc
corrections), `fit` and `fit_steps` (a step at a time), evaluation, and the inputs a head reads (cached features or
streamed images; the tail head's blocks and the prompt head's text tower, bound from the cache's encoder).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Generator

import numpy as np
import torch
from torch import nn

from vlmcache import cache, streaming, text_cache
from vlmcache.errors import VlmcacheError
from vlmcache.features import Pooled, Tokens, load_inputs
from vlmcache.heads import HEADS, CosineClassifier, LinearClassifier
from vlmcache.memory import trim
from vlmcache.metrics import Evaluator
from vlmcache.recipe import check_finite_parameters, last_step_lr, lr_factor, make_optimizer
from vlmcache.stage2 import logit_adjusted, tau_normalized
from vlmcache.train_config import TrainConfig

# --------------------------------------------------------------------------- the model of a run


class RunModel(nn.Module):
    """A head, optionally followed by a second stage on its frozen features."""

    def __init__(self, head: nn.Module, stage2: nn.Module | None = None, classifier: nn.Module | None = None):
        super().__init__()
        self.head, self.stage2 = head, stage2
        self.classifier = classifier  # a post-hoc replacement of the head's classifier (tau-norm); None: the head's

    def forward(self, x):
        f = self.head.features(x)
        if self.stage2 is not None:
            return self.stage2(f)
        return (self.classifier if self.classifier is not None else self.head.classifier)(f)


def post_hoc(model: RunModel, tau_norm: float | None) -> RunModel:
    """The model evaluation sees: the trained one, with a tau-normalised copy of its classifier when asked.
    The trained model is left as it is, so a run saves (and second stages and kNN blends build on) the trained
    head, and post-hoc corrections are recorded in config.json and applied at every evaluation."""
    if tau_norm is None:
        return model
    _check_tau_norm(model)
    return RunModel(model.head, None, tau_normalized(model.head.classifier, tau_norm))


def _check_tau_norm(model: RunModel) -> None:
    if model.stage2 is not None or not isinstance(model.head.classifier, LinearClassifier):
        raise VlmcacheError(
            "--tau-norm applies to a first-stage linear classifier (cosine and prompt classifiers are unit norm)."
        )


def epoch_steps(draws: int, batch_size: int, drop_last: bool) -> int:
    """Optimiser steps in an epoch of `draws` sampled rows: with `drop_last` (the seed's DataLoader) whole
    batches only, else a last partial batch too."""
    if not drop_last:
        return math.ceil(draws / batch_size)
    if draws < batch_size:
        raise VlmcacheError(
            f"An epoch draws {draws} rows, fewer than one batch of {batch_size}, and drop_last drops the partial "
            f"batch: nothing would train. Lower --batch-size or raise the sampler's num_samples."
        )
    return draws // batch_size


def train_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Passes over the sampler: enough for `iters` steps, else `epochs`, raised to reach `min_steps` (the
    default protocol's floor, so that a small split such as the demo's 568 images still gets enough steps)."""
    if cfg.iters:
        return math.ceil(cfg.iters / steps_per_epoch)
    return max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))


def fit(
    module: nn.Module,
    data,
    loss_fn: nn.Module,
    sampler,
    cfg: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[dict], None] | None = None,
    select: Callable[[int, int], float] | None = None,
) -> tuple[list[dict], dict | None]:
    """Minibatch training of the parameters of `module` that require grad, under the config's learning-rate
    schedule, for `cfg.epochs` passes of the sampler or, with `cfg.iters`, that many optimiser steps.

    `select(epoch, step)` (model selection) scores the module after each epoch; the best epoch's weights are
    loaded back at the end, and the selection (epoch, step, score) is returned with the per-epoch history.
    """
    steps = fit_steps(module, data, loss_fn, sampler, cfg, device, on_epoch, select)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def fit_steps(
    module: nn.Module,
    data,
    loss_fn: nn.Module,
    sampler,
    cfg: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[dict], None] | None = None,
    select: Callable[[int, int], float] | None = None,
) -> Generator[float, None, tuple[list[dict], dict | None]]:
    """`fit` one optimiser step at a time: a generator that yields after every step and returns (history,
    selection). `fit` drives one to its end; `group.train_group` drives a grid's runs in lock-step, each run's
    steps exactly the ones it takes alone. Time spent paused at a yield is left out of the run's seconds.

    Per-step losses stay on the device and are checked once per epoch, so a non-finite loss stops the
    run naming its epoch and step without a host sync on every step.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    steps = epoch_steps(sampler.size, cfg.batch_size, cfg.drop_last)
    rows = steps * cfg.batch_size if cfg.drop_last else sampler.size  # what an epoch trains on
    epochs = train_epochs(cfg, steps)
    total = cfg.iters or epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, total, cfg.warmup_iters))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    # Written in place: a new small tensor kept alive per step would sit above each step's freed activations
    # and pin glibc's heap, which then grows by a logits buffer per step (15 GB in an iNat-sized epoch).
    step_losses = torch.empty(steps + 1, device=device)
    history, done, best, best_state = [], 0, None, None

    def score(epoch: int) -> dict:  # select on the module as it is now; keep it if it is the best so far
        nonlocal best, best_state
        value = select(epoch, done)
        if best is None or value > best["score"]:  # the first of equal scores stays, as the seed's `>`
            best = {"epoch": epoch, "step": done, "score": value}
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return {"select_score": value, **({"select_step": done} if cfg.eval_every else {})}

    for epoch in range(1, epochs + 1):
        module.train()
        if hasattr(data, "set_epoch"):  # augmented views: which one each row shows this epoch
            data.set_epoch(cfg.seed, epoch)
        t0 = time.perf_counter()
        k = seen = 0
        paused = 0.0
        scored = {}
        for x, y in data.batches(sampler.epoch(gen)[:rows], cfg.batch_size, gen):
            if cfg.iters and done >= cfg.iters:
                break
            loss = loss_fn(module(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_losses[k] = loss.detach()
            k += 1
            done += 1
            seen += len(y)
            t_pause = time.perf_counter()
            if select is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == total):
                scored = score(epoch)  # the seed's EvaluationHook: every num_eval_iter steps and the last
                module.train()
            yield epoch - 1 + seen / rows  # how far along: a group advances the run furthest behind
            paused += time.perf_counter() - t_pause
        stacked = step_losses[:k]
        finite = torch.isfinite(stacked)
        if not bool(finite.all()):
            step = int((~finite).nonzero()[0]) + 1
            raise VlmcacheError(
                f"The loss became {stacked[step - 1].item()} at epoch {epoch}, step {step}; the run is stopped. "
                f"Lower --lr (now {cfg.lr}) or check the loss parameters."
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0 - paused
        row = {
            "epoch": epoch,
            "step": done,
            "loss": float(stacked.mean()),
            "seconds": round(seconds, 4),
            "samples_per_s": round(seen / seconds, 1),
            "lr": last_step_lr(sched),  # what the epoch's last step used
        }
        if select is not None and not cfg.eval_every:
            scored = score(epoch)
        row.update(scored)  # with eval_every, the epoch's last score (none if no step of it was scored)
        history.append(row)
        if on_epoch:
            on_epoch({**row, "epochs": epochs})  # with the total, for a progress bar
    if best_state is not None:
        module.load_state_dict(best_state)
    check_finite_parameters(module)
    return history, best


class OnRawCosines(nn.Module):
    """A margin loss on a cosine classifier sees cosines: the classifier's learnable scale is divided out, so the
    loss's own margin (in cosine units) and scale apply once (Cao et al. 2019), not on top of 1/0.07."""

    def __init__(self, loss: nn.Module, classifier: CosineClassifier):
        super().__init__()
        self.loss, self.classifier = loss, classifier

    def forward(self, logits, targets):
        return self.loss(logits / self.classifier.log_scale.exp(), targets)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    train_counts: np.ndarray,
    classnames: list[str] | None,
    logit_adjust: float | None = None,
    many: int = 100,
    few: int = 20,
    predictions=None,
):
    """Metrics and the per-class table, logits reduced to top-5 chunk by chunk (and, with a
    `predictions.PredictionWriter`, written per image as they come)."""
    model.eval()
    evaluator = Evaluator(train_counts, classnames, predictions=predictions)
    log_prior = None
    if logit_adjust is not None:
        counts = torch.as_tensor(train_counts, dtype=torch.float64).clamp(min=1)
        log_prior = (counts / counts.sum()).log().float()
    for x, y in data.chunks():
        logits = model(x).float()
        if not bool(torch.isfinite(logits).all()):
            raise VlmcacheError("The model's logits hold NaN or inf; it diverged, and its metrics would mean nothing.")
        if log_prior is not None:
            logits = logit_adjusted(logits, log_prior.to(logits.device), logit_adjust)
        evaluator.update(logits, y)
        del logits
        trim()
    return evaluator.compute(many, few)


@torch.no_grad()
def frozen_features(head: nn.Module, data) -> Pooled:
    """The head's features of every row, in row order, for a second stage to train on in memory."""
    head.eval()
    xs, ys = [], []
    for x, y in data.chunks():
        xs.append(head.features(x).float())
        ys.append(y)
    return Pooled(torch.cat(xs), torch.cat(ys))


# --------------------------------------------------------------------------- the job's inputs


def inputs(
    cfg: TrainConfig,
    head: str,
    splits: list[cache.SplitCache],
    device: torch.device,
    augment: bool = False,
    shared: dict | None = None,
) -> list:
    """What the head reads from each split: cached features, or (--stream) the images encoded on every pass.
    `augment` applies to the first split (training): its augmented views instead of its plain embeddings.
    With `shared` (a group's), a split loaded once is handed to every run as its own shallow copy: the arrays
    are shared, the per-epoch view choice (`set_epoch`) is each run's."""
    if not cfg.stream:
        out = []
        for i, s in enumerate(splits):
            key = (str(s.dir), HEADS[head].input, cfg.stream_tokens, augment and i == 0, str(device))
            if shared is None:
                out.append(load_inputs(s, head, device, cfg.stream_tokens, augment and i == 0))
                continue
            if key not in shared:
                shared[key] = load_inputs(s, head, device, cfg.stream_tokens, augment and i == 0)
                if isinstance(shared[key], Tokens):  # streamed: the group's runs read each block once
                    shared[key].blocks.keep = 3 * shared[key].window_blocks
            out.append(copy.copy(shared[key]))
        return out
    encoder = streaming.encoder_of(splits[0], str(device))
    tokens = HEADS[head].input == "tokens"
    prefix = tail_blocks_of(splits[0]) if HEADS[head].input == "prefix" else 0
    return [
        streaming.StreamedImages(s, encoder, tokens, cfg.workers, cfg.root, augment and i == 0, prefix)
        for i, s in enumerate(splits)
    ]


def tail_blocks_of(split: cache.SplitCache) -> int:
    """K, the tower blocks a cache's prefix leaves to the tail head; refused for a cache without a prefix."""
    split.prefix_shape()  # the error that says how to extract one
    return int(split.fingerprint["tail_blocks"])


def bind_tail(head: nn.Module, split: cache.SplitCache, device: torch.device) -> None:
    """Give the tail head the last K blocks of the tower that wrote the cache (its fingerprint names the weights
    and preprocessing; `streaming.encoder_of` refuses a tower that would compute otherwise)."""
    k = tail_blocks_of(split)
    encoder = streaming.encoder_of(split, str(device))
    head.bind_tower(encoder.model.visual, k, encoder.name)
    head.to(device)


def use_views(cfg: TrainConfig, split: cache.SplitCache, log) -> bool:
    """Whether training reads augmented views (and says so): asked for, or by default when the cache has them for
    this head's input (pooled views; the views' tokens for the decoder)."""
    cached = int(split.fingerprint.get("views") or 0)
    tokens = HEADS[cfg.head].input == "tokens"
    have = cached and (split.fingerprint.get("view_tokens") if tokens else True)
    if HEADS[cfg.head].input == "prefix":
        have = cached and split.fingerprint.get("view_prefix")
    if cfg.augment is False:
        return False
    if cfg.augment and cfg.stage2:
        raise VlmcacheError(
            "--augment trains a first stage on augmented views; a second stage reads what its first stage computes "
            "from plain inputs."
        )
    if cfg.augment and not have and not cfg.stream:
        what = "--tokens --views K" if tokens else "--views K"
        raise VlmcacheError(
            f"--augment needs augmented views: extract the train split with {what}, or stream the images "
            f"with --stream --augment (a fresh view every epoch). The cache '{split.dir}' has none for the "
            f"{cfg.head} head."
        )
    # a tail run's --stream twin recomputes the cached views by default: the cache is an optimisation of that run
    streamed_twin = cfg.stream and HEADS[cfg.head].input == "prefix"
    if cfg.augment is None and not (have and not cfg.stage2 and (not cfg.stream or streamed_twin)):
        return False
    which = f"one of the {cached} cached views" if have else "a fresh view"
    hint = " (--no-augment: the plain inputs)" if cfg.augment is None else ""
    log(f"training on augmented views: {which} per row and epoch, drawn by (seed, epoch){hint}")
    return True


def bind_text(head: nn.Module, split: cache.SplitCache, text: text_cache.TextCache, device: torch.device) -> None:
    """Give a prompt-tuning head the frozen text tower of the encoder that wrote the cache."""
    encoder = streaming.encoder_of(split, str(device))
    encoder.model.visual = nn.Identity()  # the image side is cached; free the tower's memory
    head.bind_text(encoder.model, encoder.tokenizer, text.classnames, text.logit_scale)
