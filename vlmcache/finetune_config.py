"""`vlmcache finetune`'s settings: `FinetuneConfig`, validated once by `resolve()`, and its protocols."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

from vlmcache.choices import TAIL_TUNE, TUNE, default_workers
from vlmcache.errors import VlmcacheError, checked_params, unknown_choice
from vlmcache.recipe import OPTIMIZERS, SCHEDULES, SEED_SWITCHES, check_numbers, check_training_choices
from vlmcache.samplers import sampler_params
from vlmcache.schemas import SEED_MAX
from vlmcache.templates import get_templates

HEADS = ("linear", "cosine")  # on the tower's pooled embedding (with --tail-blocks: the tail head's classifier)
TAIL_ONLY = {"views": 0, "view_seed": 0, "round_prefix": True}  # settings of --tail-blocks runs, and their defaults


@dataclass
class FinetuneConfig:
    """Everything `vlmcache finetune` needs; `resolve()` validates it once."""

    dataset: str
    root: str | None = None
    split_files: dict[str, str] = field(default_factory=dict)
    classnames_file: str | None = None
    holdout: float = 0.2
    holdout_seed: int = 0  # the test split's, as extraction's --seed: never the training seed (one test set)
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    preprocess_from: str | None = None
    tune: str = "all"  # TUNE; with tail_blocks, TAIL_TUNE (what the tail module trains)
    last_k: int = 1
    tail_blocks: int = 0  # K > 0: blocks 0..L-K-1 frozen, the tail head's module in the last K (tail_finetune.py)
    views: int = 0  # with tail_blocks: each row shows one of V views per epoch, as extract --views V draws them
    view_seed: int = 0  # with tail_blocks: extract's --view-seed (0: a fresh view every epoch when views is 0)
    round_prefix: bool = True  # with tail_blocks: the prefix rounded to float16 as the prefix cache stores it
    head: str = "linear"
    head_params: dict = field(default_factory=dict)
    text_init: str | None = None  # template set whose class-text embeddings initialise a cosine head
    loss: str = "ce"
    loss_params: dict = field(default_factory=dict)
    sampler: str = "instance"
    epochs: int = 10
    batch_size: int = 64
    sampler_params: dict = field(default_factory=dict)
    protocol: str = "default"  # fills every setting left None below (FINETUNE_PROTOCOLS); an explicit value wins
    lr: float | None = None  # the tower's
    head_lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    warmup_iters: int | None = None
    schedule: str | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0
    train_split: str = "train"
    eval_split: str | None = None  # default: test, else val
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on GPUs that have it, else fp16 with loss scaling; fp32 on CPU
    grad_checkpointing: bool = False
    workers: int = field(default_factory=default_workers)
    runs_dir: str = "runs"
    out: str | None = None
    overwrite: bool = False
    reextract: bool = False
    reextract_tokens: bool = False
    cache_dir: str = "cache"
    many: int = 100
    few: int = 20

    def resolve(self) -> FinetuneConfig:
        if self.protocol not in FINETUNE_PROTOCOLS:
            raise unknown_choice("protocol", self.protocol, FINETUNE_PROTOCOLS)
        self._resolve_tail()
        for key, value in FINETUNE_PROTOCOLS[self.protocol].items():
            if getattr(self, key) is None and not (key == "lr" and self.tail_blocks):  # a tail run has no tower lr
                setattr(self, key, value)
        if self.protocol == "seed":
            self.loss_params = {**SEED_SWITCHES["loss"].get(self.loss, {}), **self.loss_params}
            self.sampler_params = {**SEED_SWITCHES["sampler"], **self.sampler_params}
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, SCHEDULES)
        if self.warmup_iters < 0:
            raise VlmcacheError(f"--warmup-iters must be 0 or more, got {self.warmup_iters}.")
        self.sampler_params = checked_params(
            f"sampler '{self.sampler}'", self.sampler_params, sampler_params(self.sampler)
        )
        if self.tune not in (TAIL_TUNE if self.tail_blocks else TUNE):
            if self.tail_blocks:
                raise VlmcacheError(
                    f"--tail-blocks {self.tail_blocks} puts a tuned module in the tower's last blocks: --tune must "
                    f"be one of {', '.join(TAIL_TUNE)}; got '{self.tune}'."
                )
            if self.tune in TAIL_TUNE:
                raise VlmcacheError(
                    f"--tune {self.tune} tunes a module in the tower's last blocks: add --tail-blocks K."
                )
            raise unknown_choice("--tune choice", self.tune, TUNE)
        if self.head not in HEADS:
            raise unknown_choice("fine-tuning head", self.head, HEADS)
        check_training_choices(self, ("epochs", "batch_size", "last_k"), "tail" if self.tail_blocks else None)
        check_numbers(self)
        if not 0 <= self.holdout_seed <= SEED_MAX:
            raise VlmcacheError(f"--holdout-seed must be between 0 and {SEED_MAX}, got {self.holdout_seed}.")
        if not self.tail_blocks:  # the tower's embedding is unit-normalised, as CLIP trains it (the tail head's own)
            self.head_params = {"normalize": "l2", **self.head_params}
        if self.head_params.get("normalize", "l2") not in ("l2", "none"):
            raise VlmcacheError(
                f"Fine-tuning takes the linear head's normalize=l2 or none, not {self.head_params['normalize']}: "
                f"center_l2 and standardize fit statistics of frozen features, and a tuned tower's features move "
                f"every step. Train a head on a re-extracted cache (--reextract) for them."
            )
        if self.text_init:
            if self.head != "cosine":
                raise VlmcacheError("--text-init initialises the cosine head; use --head cosine.")
            get_templates(self.text_init)
        self.crop_scale = tuple(self.crop_scale)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise VlmcacheError(f"--crop-scale must be 0 < min <= max <= 1, got {self.crop_scale}.")
        return self

    def _resolve_tail(self) -> None:
        """With --tail-blocks K the run trains the tail head's module with train-head's recipe (tail_finetune.py);
        the settings that recipe has no use for are refused rather than ignored."""
        if self.tail_blocks < 0:
            raise VlmcacheError(
                f"--tail-blocks must be 1 or more (0: tune the tower as --tune says), got {self.tail_blocks}."
            )
        if not self.tail_blocks:
            given = [f"--{n.replace('_', '-')}" for n in TAIL_ONLY if getattr(self, n) != TAIL_ONLY[n]]
            if given:
                raise VlmcacheError(f"{', '.join(given)} apply to a run with --tail-blocks K; add it or drop them.")
            return
        if self.lr is not None:
            raise VlmcacheError(
                "--lr is the tower's learning rate; with --tail-blocks the tail module and the head train together "
                "at --head-lr (train-head --head tail's one learning rate). Drop --lr."
            )
        for flag, on in (("--reextract", self.reextract), ("--grad-checkpointing", self.grad_checkpointing)):
            if on:
                raise VlmcacheError(f"{flag} does not apply with --tail-blocks (the tower's own weights never change).")
        if self.precision not in ("auto", "fp32"):
            raise VlmcacheError(
                f"With --tail-blocks the tail trains in fp32, as train-head's; got --precision {self.precision}."
            )
        if self.views < 0:
            raise VlmcacheError(f"--views must be 0 or more, got {self.views}.")
        if not 0 <= self.view_seed <= SEED_MAX:
            raise VlmcacheError(f"--view-seed must be between 0 and {SEED_MAX}, got {self.view_seed}.")
        for key, want in (("tune", self.tune), ("classifier", self.head)):
            if self.head_params.get(key, want) != want:
                raise VlmcacheError(
                    f"--head-param {key}={self.head_params[key]} disagrees with {key} {want}; give one of them."
                )
        self.head_params = {**self.head_params, "tune": self.tune, "classifier": self.head}

    def hash(self) -> str:
        """A short hash of the settings that change the result (not where outputs go, not the loader)."""
        skip = {"runs_dir", "out", "overwrite", "device", "workers", "reextract", "reextract_tokens", "cache_dir"}
        if not self.tail_blocks:  # runs without a tail keep the names they had before these settings existed
            skip |= {"tail_blocks", *TAIL_ONLY}
        keep = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def run_name(self) -> str:
        tune = f"tail{self.tail_blocks}-{self.tune}" if self.tail_blocks else self.tune
        return f"{self.dataset}__ft-{tune}-{self.head}-{self.loss}-{self.sampler}__s{self.seed}__{self.hash()}"


# The seed never tunes the tower (its Supervised.train freezes every `vision_model` parameter), so "seed" here means
# its optimiser, schedule and method forms for what fine-tuning trains; the tower keeps its own small lr.
FINETUNE_PROTOCOLS: dict[str, dict] = {
    "default": dict(lr=1e-5, head_lr=1e-3, weight_decay=0.1, optimizer="adamw", momentum=0.9, nesterov=False,
                    warmup_iters=0, schedule="cosine"),
    "seed": dict(lr=1e-5, head_lr=0.03, weight_decay=5e-4, optimizer="sgd", momentum=0.9, nesterov=True,
                 warmup_iters=512, schedule="seed_cosine"),
}  # fmt: skip
