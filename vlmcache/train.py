"""Stage 2: train a head (and optionally a decoupled second stage) on cached features, evaluate, save a run.

A run folder holds `config.json` (the resolved config), `metrics.json` (metrics, cost, per-epoch history),
`per_class.csv` and `head.pt` (weights plus what is needed to rebuild the head), so `vlmcache eval RUN`
can evaluate it again, with or without post-hoc corrections.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Generator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmcache import atomic, cache, guard, runlock, runs, schemas, streaming, text_cache
from vlmcache.encoders import RANDOM, pick_device
from vlmcache.epochlog import LOGS, EpochLog
from vlmcache.errors import VlmcacheError, checked_params, unknown_choice
from vlmcache.features import (
    Pooled,
    Tokens,
    cache_parts,
    default_eval_split,
    find_cache,
    load_inputs,
    open_split,
    pretrained_of,
)
from vlmcache.heads import (
    HEADS,
    CosineClassifier,
    LinearClassifier,
    build_head,
    full_head_params,
    upgrade_head_file,
)
from vlmcache.losses import build_loss
from vlmcache.memory import peak_rss_mb, start_peak_memory, trim
from vlmcache.metrics import Evaluator
from vlmcache.predictions import FILE as PREDICTIONS
from vlmcache.predictions import PredictionWriter, require_pyarrow
from vlmcache.recipe import (
    LIFT_EPOCHS,
    LIFT_SWITCHES,
    OPTIMIZERS,
    PROTOCOLS,
    SCHEDULES,
    SEED_SWITCHES,
    check_finite_parameters,
    check_numbers,
    check_training_choices,
    double_corrections,
    last_step_lr,
    lr_factor,
    make_optimizer,
    seed_epoch_draws,
)
from vlmcache.samplers import build_sampler, sampler_params
from vlmcache.stage2 import STAGE2, build_stage2, logit_adjusted, stage2_params, tau_normalized


@dataclass
class TrainConfig:
    """Everything `vlmcache train-head` needs. `resolve()` validates it once and fills the defaults."""

    dataset: str | None  # None only for a second stage, which takes it from its first-stage run
    model: str | None = None  # None: whichever the one matching cache was made with
    pretrained: str | None = None
    cache_dir: str = "cache"
    cache_key: str | None = None
    preprocess: str = "model"  # which cache: the weights' own preprocessing, or the seed's (extract --preprocess)
    head: str = "linear"
    head_params: dict = field(default_factory=dict)
    tune: str | None = None  # the tail head's: what trains in the tower's last K blocks (tail.TUNES); its head_params
    text_init: str | None = None  # template set that initialises the cosine head
    loss: str | None = None  # default: ce, or the second stage's own
    loss_params: dict = field(default_factory=dict)
    sampler: str | None = None  # default: instance, or the second stage's own
    stage2: str | None = None
    stage2_params: dict = field(default_factory=dict)
    sampler_params: dict = field(default_factory=dict)
    from_run: str | None = None  # the first-stage run a second stage builds on
    protocol: str = "default"  # fills every setting left None below (PROTOCOLS); an explicit value wins
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    iters: int | None = None  # an optimiser-step budget: the last epoch stops there (0: epochs decide)
    # with the protocol's epochs, train at least this many steps (more epochs on a small split); 0 when
    # --epochs or --iters is given, which then decide alone
    min_steps: int | None = None
    warmup_iters: int | None = None
    schedule: str | None = None  # cosine (to zero) or seed_cosine (cos(7 pi/16 t), the seed's)
    select_on: str | None = None  # a split to keep the best epoch on ("none": the last epoch)
    drop_last: bool | None = None  # an epoch's last partial batch is dropped (the seed's DataLoader), not trained
    # with --select-on, score every this many steps and at the last step (the seed's num_eval_iter); 0: after
    # each epoch
    eval_every: int | None = None
    seed: int = 0
    train_split: str = "train"
    eval_split: str | None = None  # default: test, else val
    device: str = "auto"
    runs_dir: str = "runs"
    out: str | None = None
    overwrite: bool = False
    stream_tokens: bool = False
    stream: bool = False  # encode the images again on every step (the seed's way), not read the cache
    augment: bool | None = None  # train on augmented views: the cache's (None: when it has them), or streamed
    workers: int | None = None  # image loader processes when streaming (default: min(8, CPUs))
    root: str | None = None  # where the images are when streaming, if not where extraction found them
    tau_norm: float | None = None
    logit_adjust: float | None = None
    many: int = 100
    few: int = 20
    save_predictions: bool = False  # the run folder gets predictions.parquet: per test image, its top-5
    log: str | None = None  # per-epoch curves: tensorboard or csv (epochlog.EpochLog), into the run's logs/

    def resolve(self) -> TrainConfig:
        names = (("--dataset", self.dataset), ("--cache-key", self.cache_key), ("--split", self.eval_split))
        for option, name in (*names, ("--select-on", self.select_on), ("the training split", self.train_split)):
            if name:  # the name rule, for every name that is a folder of the cache or the run ('' and None: none)
                guard.check_name(name, option)
        if self.protocol not in PROTOCOLS:
            raise unknown_choice("protocol", self.protocol, PROTOCOLS)
        if self.pretrained is not None and self.pretrained.lower() in RANDOM:
            self.pretrained = "random"  # as cache keys and fingerprints say it
        if self.min_steps is None and (self.epochs is not None or self.iters is not None):
            self.min_steps = 0  # a length the user chose is the length
        if self.protocol == "lift":
            self._resolve_lift()
        for key, value in PROTOCOLS[self.protocol].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.head not in HEADS:
            raise unknown_choice("head", self.head, HEADS)
        if self.tune is not None:
            self._resolve_tune()
        if self.stage2 is not None:
            if self.stage2 not in STAGE2:
                raise unknown_choice("second stage", self.stage2, STAGE2)
            if not self.from_run:
                raise VlmcacheError(
                    f"--stage2 {self.stage2} re-balances a trained head: name its first-stage run with --from RUN "
                    f"(a folder that `vlmcache train-head` wrote)."
                )
            self.loss = self.loss or STAGE2[self.stage2].loss
            self.sampler = self.sampler or STAGE2[self.stage2].sampler
            if self.head == "coop":
                raise VlmcacheError("Second stages re-balance linear, cosine and decoder heads, not coop prompts.")
        elif self.from_run:
            raise VlmcacheError("--from names a first-stage run for a second stage; add --stage2 (crt, lws, ...).")
        self.loss = self.loss or "ce"
        self.sampler = self.sampler or "instance"
        seed_draws = self.protocol == "seed" and "num_samples" not in self.sampler_params
        if self.protocol == "seed":  # the seed's form of each method; explicit parameters win
            self.loss_params = {**SEED_SWITCHES["loss"].get(self.loss, {}), **self.loss_params}
            self.sampler_params = {**SEED_SWITCHES["sampler"], **self.sampler_params}
            if not self.stage2:
                self.head_params = {**SEED_SWITCHES["head"].get(self.head, {}), **self.head_params}
            else:
                self.stage2_params = {**SEED_SWITCHES["stage2"].get(self.stage2, {}), **self.stage2_params}
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        steps = (self.iters, self.warmup_iters, self.min_steps, self.eval_every)
        if not all(0 <= n <= schemas.COUNT_MAX for n in steps):
            raise VlmcacheError(
                f"--iters, --warmup-iters, --min-steps and --eval-every must be between 0 and {schemas.COUNT_MAX}, "
                f"got {', '.join(map(str, steps))}."
            )
        if self.select_on == "none":
            self.select_on = ""
        if self.log is not None and self.log not in LOGS:
            raise unknown_choice("--log", self.log, LOGS)
        self.sampler_params = checked_params(
            f"sampler '{self.sampler}'", self.sampler_params, sampler_params(self.sampler)
        )
        if self.stage2:
            self.stage2_params = checked_params(
                f"second stage '{self.stage2}'", self.stage2_params, stage2_params(self.stage2)
            )
        elif self.stage2_params:
            raise VlmcacheError("--stage2-param sets a second stage's parameters; add --stage2 (crt, lws, ...).")
        check_training_choices(self, ("epochs", "batch_size"))
        check_numbers(self)
        if seed_draws and self.iters:  # the seed's epoch: its share of the step budget, in whole batches
            self.sampler_params["num_samples"] = seed_epoch_draws(self.iters, self.epochs, self.batch_size)
        if self.tau_norm is not None and (self.stage2 or self.head in ("cosine", "coop")):
            raise VlmcacheError(
                f"--tau-norm applies to a first-stage linear classifier, not a second stage or the {self.head} head."
            )
        if self.text_init and self.head not in ("cosine", "tail"):
            raise VlmcacheError("--text-init initialises the cosine head (or the tail head's); use --head cosine.")
        if self.text_init and self.head == "tail" and self.head_params.get("classifier", "cosine") != "cosine":
            raise VlmcacheError("--text-init initialises a cosine classifier; the tail head's is classifier=linear.")
        if self.head == "cosine" and not self.stage2 and "normalize" not in self.head_params:
            # standardised inputs train from a random start; from the class texts, raw ones keep step 0 zero-shot
            self.head_params = {**self.head_params, "normalize": "none" if self.text_init else "standardize"}
        return self

    def _resolve_lift(self) -> None:
        """LIFT's method settings (recipe.LIFT_SWITCHES) under what the user gave; LIFT tunes the tower, so a tail
        head on a prefix cache is the only head it applies to."""
        if self.head != "tail" or self.stage2:
            raise VlmcacheError(
                f"--protocol lift tunes the tower's last blocks: use --head tail (on a cache extracted with "
                f"--tail-blocks K), as a first stage; got --head {self.head}"
                + (f" --stage2 {self.stage2}." if self.stage2 else ".")
            )
        self.head_params = {**LIFT_SWITCHES["head_params"], **self.head_params}
        if self.tune is not None:
            self.head_params["tune"] = self.tune
        if self.loss is None:
            self.loss, self.loss_params = LIFT_SWITCHES["loss"], {**LIFT_SWITCHES["loss_params"], **self.loss_params}
        self.text_init = self.text_init or LIFT_SWITCHES["text_init"]
        if self.epochs is None and self.dataset in LIFT_EPOCHS:
            self.epochs = LIFT_EPOCHS[self.dataset]

    def _resolve_tune(self) -> None:
        """--tune is the tail head's `tune` parameter, named on its own because it says what trains."""
        from vlmcache.tail import TUNES

        if self.head != "tail":
            raise VlmcacheError(f"--tune chooses what the tail head trains; it does not apply to --head {self.head}.")
        if self.tune not in TUNES:
            raise unknown_choice("--tune", self.tune, TUNES)
        if self.head_params.get("tune", self.tune) != self.tune:
            raise VlmcacheError(
                f"--tune {self.tune} and --head-param tune={self.head_params['tune']} disagree; give one of them."
            )
        self.head_params = {**self.head_params, "tune": self.tune}

    def run_name(self) -> str:
        parts = [self.head, self.loss, self.sampler] + ([self.stage2] if self.stage2 else [])
        return f"{self.dataset}__{'-'.join(parts)}__s{self.seed}__{config_hash(self)}"


def config_hash(cfg: TrainConfig) -> str:
    """A short hash of the settings that change the result (not where outputs go)."""
    skip = runs.NOT_IDENTITY - {"seed", "from_run"}  # the seed names a run apart; the cache is its cache_key
    keep = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}
    if keep.get("tune") is None:  # --tune unset (every head but tail): run names as before it existed
        keep.pop("tune", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:8]


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


def _peak_memory(device: torch.device, scope: str) -> dict:
    out = {"peak_rss_mb": peak_rss_mb(), "peak_rss_scope": scope}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


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


def _selection_split(model_dir: Path, name: str) -> cache.SplitCache:
    if not (model_dir / name / cache.MANIFEST).is_file():
        raise VlmcacheError(
            f"--select-on {name}: the cache '{model_dir}' has no '{name}' split to select the best epoch on. "
            f"Extract it, or pass --select-on none to report the last epoch."
        )
    return open_split(model_dir, name)


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


# --------------------------------------------------------------------------- the job


def _inputs(
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


def _bind_text(head: nn.Module, split: cache.SplitCache, text: text_cache.TextCache, device: torch.device) -> None:
    """Give a prompt-tuning head the frozen text tower of the encoder that wrote the cache."""
    encoder = streaming.encoder_of(split, str(device))
    encoder.model.visual = nn.Identity()  # the image side is cached; free the tower's memory
    head.bind_text(encoder.model, encoder.tokenizer, text.classnames, text.logit_scale)


def _run_dir(cfg: TrainConfig) -> Path:
    """This run's folder, checked by the output guard before any work (runs.run_folder)."""
    return runs.run_folder(cfg.out, cfg.runs_dir, cfg.run_name(), cfg.overwrite)


def _check_tau_norm(model: RunModel) -> None:
    if model.stage2 is not None or not isinstance(model.head.classifier, LinearClassifier):
        raise VlmcacheError(
            "--tau-norm applies to a first-stage linear classifier (cosine and prompt classifiers are unit norm)."
        )


def load_run(run_dir: str | Path, device: torch.device) -> tuple[TrainConfig, RunModel, dict]:
    """A finished train-head run, every file checked against its schema, the head against its cache."""
    run_dir = Path(run_dir)
    if runs.read_kind(run_dir) == "finetune":
        meta = runs.read_json(run_dir / "config.json", "run")
        raise VlmcacheError(
            f"'{run_dir}' is a fine-tuning run; its head needs its tuned tower (vlmcache eval handles both). To "
            f"train heads on its features: vlmcache extract --pretrained {run_dir / str(meta.get('weights'))} "
            f"(or finetune --reextract)."
        )
    _, cfg = runs.read_config(run_dir, TrainConfig)
    try:
        cfg.resolve()
    except VlmcacheError as e:
        raise VlmcacheError(f"'{run_dir}/config.json': {e}") from None
    saved = upgrade_head_file(runs.load_head_file(run_dir, device))
    if saved["head"] not in HEADS or (saved["stage2"] is not None and saved["stage2"] not in STAGE2):
        raise VlmcacheError(f"'{run_dir}/head.pt' names a head or second stage this vlmcache does not have.")
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    split = open_split(model_dir, cfg.train_split)
    num_classes = int(split.fingerprint["num_classes"])
    width = {"tokens": split.token_shape, "prefix": split.prefix_shape}.get(
        HEADS[saved["head"]].input, lambda: (None, int(split.manifest["dims"]["pooled"]))
    )()[1]
    if (saved["num_classes"], saved["in_dim"]) != (num_classes, width):
        raise VlmcacheError(
            f"'{run_dir}/head.pt' is a head for {saved['num_classes']} classes and inputs of width "
            f"{saved['in_dim']}, but its cache '{model_dir}' has {num_classes} classes and width {width}."
        )
    try:
        head = build_head(saved["head"], saved["in_dim"], saved["num_classes"], **saved["head_params"]).to(device)
        if hasattr(head, "bind_tower"):
            bind_tail(head, split, device)
        if hasattr(head, "bind_text"):
            _bind_text(head, split, text_cache.read_text(model_dir / text_cache.TEXT_FILE), device)
        stage2 = (
            build_stage2(saved["stage2"], head.classifier, **(saved.get("stage2_params") or {}))
            if saved.get("stage2")
            else None
        )
        head.load_state_dict(saved["head_state"])
        if stage2 is not None:
            stage2.load_state_dict(saved["stage2_state"] or {})
    except (RuntimeError, TypeError, ValueError) as e:
        raise VlmcacheError(f"The weights in '{run_dir}/head.pt' do not fit this vlmcache's heads: {e}") from None
    return cfg, RunModel(head, stage2).to(device), saved


def inherit_first_stage(cfg: TrainConfig) -> TrainConfig:
    """A second stage takes its data and head from its first-stage run (`--from`), so its config, run name and
    labels say the head it really trains on. Returns the first stage's config."""
    _, first_cfg = runs.read_config(Path(cfg.from_run), TrainConfig)
    for key in ("dataset", "model", "pretrained", "preprocess", "head", "head_params", "cache_key", "cache_dir"):
        setattr(cfg, key, getattr(first_cfg, key))
    return first_cfg


def train_head(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict], None] | None = None,
    hold: str | None = None,
    wait: bool = False,
) -> dict:
    """Train, evaluate and save one run; returns the run's summary (metrics, cost, where it is).

    `hold` (the command's name, e.g. "vlmcache train-head") holds the folder the run goes into (`runlock`) from
    the moment the run is known to be valid until it is saved: another process there makes this one refuse, or
    wait with `wait`. Left None where the caller holds the folder itself (`ablate`)."""
    with ExitStack() as stack:
        holder = None if hold is None else (lambda folder: stack.enter_context(runlock.hold(folder, hold, wait, log)))
        job = prepare_run(cfg, log, hold=holder)
        try:
            t0 = time.perf_counter()
            history, selection = fit(
                job.fit_model,
                job.fit_data,
                job.loss_fn,
                job.sampler,
                cfg,
                job.device,
                job.on_epoch(on_epoch),
                job.select,
            )
            job.times["train_seconds"] = time.perf_counter() - t0
            return finish_run(job, history, selection)
        except BaseException:
            job.discard()
            raise


@dataclass
class RunJob:
    """A run between its set-up and its end: what `fit` trains and what `finish_run` evaluates and saves."""

    cfg: TrainConfig
    device: torch.device
    model_dir: Path
    run_dir: Path
    eval_name: str
    eval_data: object
    counts: np.ndarray
    classnames: list[str]
    in_dim: int
    num_classes: int
    model: RunModel
    fit_model: nn.Module
    fit_data: object
    head_params: dict
    loss_fn: nn.Module
    sampler: object
    select: Callable[[int, int], float] | None
    times: dict
    t_start: float
    memory_scope: str
    group_size: int = 1  # the runs trained together in this process's group (group.train_group)
    epoch_log: EpochLog | None = None  # --log
    staging: Path | None = None  # the folder the run is built in (guard.staging_folder), published when complete

    def staging_folder(self) -> Path:
        if self.staging is None:
            self.staging = guard.staging_folder(self.run_dir)
        return self.staging

    def discard(self) -> None:
        """A failed run: close its log and remove its staging folder (made for it alone); nothing else."""
        if self.epoch_log is not None:
            self.epoch_log.close()
            self.epoch_log = None
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    warnings: list[str] = field(default_factory=list)  # said when the run starts, kept in metrics.json

    def on_epoch(self, also: Callable[[dict], None] | None = None) -> Callable[[dict], None] | None:
        """What each epoch's row goes to: the run's --log, and `also` (a command's progress line)."""
        if self.epoch_log is None:
            return also
        if also is None:
            return self.epoch_log

        def both(row: dict) -> None:
            self.epoch_log(row)
            also(row)

        return both


def prepare_run(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    shared: dict | None = None,
    memory_scope=None,
    hold: Callable[[Path], None] | None = None,
):
    """Everything before the training loop: the config resolved, the cache found, inputs loaded, the model, loss,
    sampler and selection built. `shared` (a dict kept across runs: `group.train_group`) holds inputs already
    loaded by an earlier run of the same cache, so a group reads each split once; `memory_scope` is the
    group's peak-memory scope (None: this run starts its own). `hold(folder)` takes the runs folder's lock once
    the run is known to be valid and before anything is written (so a mistake leaves no folder behind)."""
    t_start = time.perf_counter()
    cfg.resolve()
    if cfg.save_predictions:
        require_pyarrow()
    for warning in double_corrections(cfg):
        log(f"warning: {warning}")
    device = pick_device(cfg.device)
    memory_scope = memory_scope or start_peak_memory(device)
    first = None
    if cfg.stage2:
        inherit_first_stage(cfg)
        _, first_model, first_saved = load_run(cfg.from_run, device)
        first = (first_model.head, first_saved)
    model_dir = _locate_cache(cfg)
    eval_name = cfg.eval_split or default_eval_split(model_dir)
    train_split, eval_split = open_split(model_dir, cfg.train_split), open_split(model_dir, eval_name)
    num_classes = int(train_split.fingerprint["num_classes"])
    if num_classes < 2:  # else a head of one logit fails deep inside the loss ("got shape torch.Size([1])")
        raise VlmcacheError(
            f"The cache '{model_dir}' holds {num_classes} class; a classifier needs at least 2. Extract images "
            f"(or split-file labels) of two or more classes."
        )
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    run_dir = _run_dir(cfg)
    if hold is not None:
        hold(run_dir.parent)
        run_dir = _run_dir(cfg)  # again: a process this one waited for may have finished the same run
    warnings = selection_warnings(cfg, eval_name)
    for warning in warnings:
        log(f"warning: {warning}")

    t_load = time.perf_counter()
    augment = use_views(cfg, train_split, log)
    train_data, eval_data = _inputs(cfg, cfg.head, [train_split, eval_split], device, augment, shared)
    counts = np.bincount(train_data.y.cpu().numpy(), minlength=num_classes)
    times = {"load_seconds": time.perf_counter() - t_load}

    torch.manual_seed(cfg.seed)
    t_features = time.perf_counter()
    model, fit_model, fit_data, head_params = _build_model(cfg, first, train_data, train_split, text, device, shared)
    loss_fn = build_loss(cfg.loss, counts, **cfg.loss_params).to(device)
    # the classifier whose scale the logits carry: a second stage's own (cRT's trained copy; the frozen one that
    # LWS, DisAlign and MaRC scale), else the head's
    classifier = fit_model.classifier if cfg.stage2 else model.head.classifier
    if cfg.loss == "ldam" and isinstance(classifier, CosineClassifier):
        loss_fn = OnRawCosines(loss_fn, classifier)
    sampler = build_sampler(cfg.sampler, fit_data.y, **cfg.sampler_params)
    select = _selector(cfg, model, eval_data, eval_name, model_dir, counts, device, shared)
    times["features_seconds"] = time.perf_counter() - t_features
    if device.type == "cuda" and memory_scope != "group":
        torch.cuda.reset_peak_memory_stats(device)
    times["prepare_seconds"] = time.perf_counter() - t_start
    job = RunJob(
        cfg, device, model_dir, run_dir, eval_name, eval_data, counts, text.classnames, train_data.dim, num_classes,
        model, fit_model, fit_data, head_params, loss_fn, sampler, select, times, t_start, memory_scope,
        warnings=warnings,
    )  # fmt: skip
    if cfg.log:  # live inside the run's own staging folder: nothing outside the run is made or removed
        try:
            job.epoch_log = EpochLog(cfg.log, job.staging_folder() / "logs", cfg.select_on)
        except BaseException:  # (tensorboard missing): the staging folder made for it goes too
            job.discard()
            raise
    return job


def selection_warnings(cfg: TrainConfig, eval_name: str) -> list[str]:
    """What is wrong with the run's model selection, said on stderr and kept in metrics.json's `warnings`: an
    epoch selected on the split the run reports makes that score optimistic (`report` marks such rows)."""
    if cfg.select_on and cfg.select_on == eval_name:
        return [
            f"--select-on {cfg.select_on}: the epoch is selected on the split the run reports ({eval_name}), so its "
            f"score is optimistic; select on a held-out split (val) for numbers to publish."
        ]
    return []


def finish_run(job: RunJob, history: list[dict], selection: dict | None) -> dict:
    """Evaluate the trained run, check it, and save its folder; returns its summary. `job.times` holds the
    training loop's seconds by now."""
    cfg = job.cfg
    if selection is not None:
        selection = {"split": cfg.select_on, **selection}
    t_eval = time.perf_counter()
    eval_model = post_hoc(job.model, cfg.tau_norm)
    writer = None
    if cfg.save_predictions:  # in the run's staging folder, published with it
        spot = job.staging_folder() / PREDICTIONS
        writer = PredictionWriter(spot, open_split(job.model_dir, job.eval_name), job.classnames)
    try:
        metrics, table = evaluate(
            eval_model, job.eval_data, job.counts, job.classnames, cfg.logit_adjust, cfg.many, cfg.few, writer
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    if job.epoch_log is not None:
        job.epoch_log.close()
        job.epoch_log = None
    job.times["eval_seconds"] = time.perf_counter() - t_eval
    if job.group_size > 1:
        # In a group the runs take turns, so the clock since this run's set-up is the group's time, not its own:
        # its whole run is its share of the group, the phases it spent working (set-up, its own steps, its
        # evaluation). The group's wall time is the pipeline's to record (results.csv's group_wall_seconds).
        job.times["total_seconds"] = sum(job.times[k] for k in ("prepare_seconds", "train_seconds", "eval_seconds"))
    else:
        job.times["total_seconds"] = time.perf_counter() - job.t_start
    cost = _cost(cfg, job.times, history, job.device, job.memory_scope)
    if job.group_size > 1:  # seconds are this run's own; memory is the group's process's
        cost["group_size"] = job.group_size
        cost["total_seconds_scope"] = "share of group"

    check_finite_parameters(job.model)
    saved = {
        "head": cfg.head,
        "in_dim": job.in_dim,
        "num_classes": job.num_classes,
        "head_params": job.head_params,
        "head_state": job.model.head.state_dict(),
        "stage2": cfg.stage2,
        "stage2_params": dict(cfg.stage2_params),
        "stage2_state": job.model.stage2.state_dict() if job.model.stage2 is not None else None,
    }
    config = {
        "config": asdict(cfg),
        "cache": str(job.model_dir),
        "eval_split": job.eval_name,
        "train_counts": job.counts.tolist(),
        "argv": sys.argv,
    }
    result = {"run": str(job.run_dir), "metrics": metrics, "cost": cost, "history": history, "selection": selection}
    if job.warnings:
        result["warnings"] = list(job.warnings)
    _save_run(job.run_dir, job.staging_folder(), saved, table, config, result)
    job.staging = None  # published
    return result


def _locate_cache(cfg: TrainConfig) -> Path:
    """The run's cache; what the config left out (dataset, model, weights) becomes the found cache's, and the
    cache is recorded by key and absolute root so that `eval` and second stages find it from anywhere."""
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    cfg.dataset, cfg.model, _ = cache_parts(model_dir)
    cfg.pretrained = cfg.pretrained or pretrained_of(model_dir)
    cfg.cache_key = model_dir.name
    cfg.cache_dir = str(model_dir.parent.parent.resolve())
    return model_dir


def _build_model(cfg: TrainConfig, first, train_data, train_split, text, device: torch.device, shared=None):
    """(the run's model, the module that trains, the data it trains on, the head's full settings). A second
    stage trains on the frozen first-stage head's features; a first stage builds its head, fits its input
    statistics and, with --text-init, starts from the class texts."""
    if first is not None:
        head, first_saved = first
        head.requires_grad_(False)
        stage2 = build_stage2(cfg.stage2, head.classifier, **cfg.stage2_params).to(device)
        fit_data = frozen_features(head, train_data)  # one pass of the frozen head over train
        return RunModel(head, stage2), stage2, fit_data, dict(first_saved["head_params"])
    head_params = full_head_params(cfg.head, cfg.head_params)
    num_classes = int(train_split.fingerprint["num_classes"])
    head = build_head(cfg.head, train_data.dim, num_classes, **head_params).to(device)
    if hasattr(head, "bind_tower"):
        bind_tail(head, train_split, device)
    if hasattr(head, "bind_text"):
        _bind_text(head, train_split, text, device)
    if getattr(head, "needs_input_stats", False):
        key = ("input statistics", id(getattr(train_data, "x", train_data)), head.normalize)
        if shared is not None and key in shared:  # a group's runs on the same rows: computed once
            head.shift.copy_(shared[key][0])
            head.scale.copy_(shared[key][1])
        else:
            head.fit_input(x for x, _ in train_data.chunks())
            if shared is not None:
                shared[key] = (head.shift.clone(), head.scale.clone())
    if cfg.text_init:
        if cfg.text_init not in text.sets:
            raise unknown_choice("template set of --text-init", cfg.text_init, text.sets)
        init = head.init_from_text if hasattr(head, "init_from_text") else head.classifier.init_from_text
        init(torch.from_numpy(text.sets[cfg.text_init][1]).to(device), text.logit_scale)
    model = RunModel(head)
    return model, model, train_data, head_params


def _selector(
    cfg: TrainConfig, model: RunModel, eval_data, eval_name: str, model_dir: Path, counts, device, shared=None
):
    """With --select-on SPLIT, the function that scores the model on that split after each epoch; else None."""
    if not cfg.select_on:
        return None
    select_data = (
        eval_data
        if cfg.select_on == eval_name
        else _inputs(cfg, cfg.head, [_selection_split(model_dir, cfg.select_on)], device, shared=shared)[0]
    )

    def select(epoch: int, step: int) -> float:
        scored = evaluate(post_hoc(model, cfg.tau_norm), select_data, counts, None, cfg.logit_adjust)
        return scored[0]["overall"]

    return select


def _cost(cfg: TrainConfig, times: dict, history: list[dict], device: torch.device, memory_scope: str) -> dict:
    """metrics.json's cost: each phase's seconds, samples/s of the training loop, peak memory and, for a second
    stage, what the method costs from scratch (this stage plus the first stage it builds on)."""
    samples = sum(h["samples_per_s"] * h["seconds"] for h in history)
    train_seconds = times["train_seconds"]
    cost = {
        "train_seconds": round(train_seconds, 3),  # the optimisation loop alone: what samples_per_s measures
        "load_seconds": round(times["load_seconds"], 3),
        "features_seconds": round(times["features_seconds"], 3),  # a second stage's frozen pass, input statistics
        "eval_seconds": round(times["eval_seconds"], 3),
        "total_seconds": round(times["total_seconds"], 3),  # everything this run did
        "samples_per_s": round(samples / train_seconds, 1) if train_seconds > 0 else None,
        "device": str(device),
        **_peak_memory(device, memory_scope),
    }
    if cfg.stage2:
        first_cost = runs.read_metrics(Path(cfg.from_run))["cost"]
        first_total = first_cost.get("total_seconds")
        if first_total is None:  # a run written before total_seconds existed
            first_total = (first_cost.get("train_seconds") or 0) + (first_cost.get("load_seconds") or 0)
        cost["first_stage_seconds"] = first_total
        cost["total_with_first_stage_seconds"] = round(cost["total_seconds"] + first_total, 3)
    return cost


def _save_run(run_dir: Path, staging: Path, saved: dict, table, config: dict, result: dict) -> None:
    """head.pt, per_class.csv, config.json and, last, metrics.json, written into the run's staging folder (which
    holds its logs and predictions already), that replaces `run_dir` only once complete."""
    atomic.save_torch_atomic(saved, staging / "head.pt")
    atomic.write_bytes_atomic(staging / "per_class.csv", table.to_csv(index=False).encode())
    atomic.write_json_atomic(staging / "config.json", config)
    atomic.write_json_atomic(staging / "metrics.json", result)  # last: a run with metrics.json is complete
    runs.publish_run(staging, run_dir)


def evaluate_run(
    run_dir: str | Path,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    split: str | None = None,
    device: str = "auto",
    save_predictions: bool = False,
) -> dict:
    """Evaluate a saved train-head run again, optionally with post-hoc tau-normalisation or logit adjustment
    (`runs.evaluate_run` takes a run of any kind); `save_predictions` writes this evaluation's per-image
    predictions to the run folder's predictions.parquet."""
    runs.check_post_hoc(tau_norm, logit_adjust)
    dev = pick_device(device)
    cfg, model, saved = load_run(run_dir, dev)
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    config, _ = runs.read_config(Path(run_dir), TrainConfig)
    eval_name = split or config["eval_split"]
    (data,) = _inputs(cfg, cfg.head, [open_split(model_dir, eval_name)], dev)
    counts = np.asarray(config["train_counts"])
    if len(counts) != saved["num_classes"]:
        raise VlmcacheError(
            f"'{run_dir}/config.json': train_counts has {len(counts)} classes, its head {saved['num_classes']}."
        )
    # the run's own post-hoc corrections apply unless a flag replaces them (0 turns either off)
    tau_norm = cfg.tau_norm if tau_norm is None else tau_norm
    logit_adjust = cfg.logit_adjust if logit_adjust is None else logit_adjust
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    writer = None
    if save_predictions:
        writer = PredictionWriter(Path(run_dir) / PREDICTIONS, open_split(model_dir, eval_name), text.classnames)
    try:
        metrics, _ = evaluate(
            post_hoc(model, tau_norm), data, counts, text.classnames, logit_adjust, cfg.many, cfg.few, writer
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {
        "run": str(run_dir),
        "split": eval_name,
        "tau_norm": tau_norm,
        "logit_adjust": logit_adjust,
        "metrics": metrics,
        **({"predictions": str(writer.close())} if writer is not None else {}),
    }
