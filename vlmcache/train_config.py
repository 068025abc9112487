"""train-head's typed config: `TrainConfig`, whose `resolve()` validates it once and fills the defaults (the
protocol's settings, each method's seed form), and `config_hash`, the short hash of the settings that change a run's
result (the last part of its run name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

from vlmcache import guard, runs, schemas
from vlmcache.encoders import RANDOM
from vlmcache.epochlog import LOGS
from vlmcache.errors import VlmcacheError, checked_params, unknown_choice
from vlmcache.heads import HEADS
from vlmcache.recipe import (
    LIFT_EPOCHS,
    LIFT_SWITCHES,
    OPTIMIZERS,
    PROTOCOLS,
    SCHEDULES,
    SEED_SWITCHES,
    check_numbers,
    check_training_choices,
    seed_epoch_draws,
)
from vlmcache.samplers import sampler_params
from vlmcache.stage2 import STAGE2, stage2_params


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
                raise VlmcacheError(
                    "Second stages re-balance linear, cosine, decoder and tail heads, not coop prompts."
                )
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
