"""Full fine-tuning: the one stage that streams raw images after extraction.

The image tower (all of it, its last k blocks, or its norms and biases) and a head on its pooled embedding
train together on augmented images (random resized crop and flip at the model's own preprocessing), with any
loss and sampler of stage 2. A checkpoint is written after every epoch, and a run started again with the same
settings goes on from its last one. Every random choice is seeded by (seed, epoch, position in the epoch), so a
resumed run equals an uninterrupted one. Under torchrun the model is wrapped in DistributedDataParallel and
each process takes every world-th sample of the epoch's order.

The run folder has train-head's format (config.json, metrics.json, per_class.csv, head.pt) plus the tuned
open_clip weights, `<model>-ft-<hash>.pt`, which `vlmcache extract --pretrained FILE` reads; `--reextract`
does that at the end, so stage 2 can go on from a new cache (a new fingerprint: the file's sha256).

`--tail-blocks K --tune adapter|lora|full|none` is the other kind of run: blocks 0..L-K-1 frozen and the tail
head's module in the last K, trained with train-head's tail recipe (vlmcache/tail_finetune.py), so that it equals
`train-head --head tail` on a prefix cache and its `--stream` twin.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlmcache import atomic, distributed, faults, handover, runs
from vlmcache.choices import TAIL_TUNE, TUNE
from vlmcache.datasets import load_dataset
from vlmcache.encoders import Encoder, load_encoder, pick_precision
from vlmcache.errors import VlmcacheError, checked_params, unknown_choice
from vlmcache.extract import ExtractConfig, ImageRows, default_workers, image_loader, probe_dims, run_extract
from vlmcache.heads import build_head, full_head_params, upgrade_head_file
from vlmcache.images import BadImage
from vlmcache.losses import build_loss
from vlmcache.memory import peak_rss_mb, start_peak_memory
from vlmcache.metrics import Evaluator
from vlmcache.recipe import (
    OPTIMIZERS,
    SCHEDULES,
    SEED_SWITCHES,
    check_finite_parameters,
    check_numbers,
    check_training_choices,
    last_step_lr,
    lr_factor,
    param_groups,
)
from vlmcache.samplers import build_sampler, sampler_params
from vlmcache.schemas import SEED_MAX
from vlmcache.splits import Split
from vlmcache.stage2 import logit_adjusted, tau_normalized
from vlmcache.templates import get_templates

HEADS = ("linear", "cosine")  # on the tower's pooled embedding (with --tail-blocks: the tail head's classifier)
TAIL_ONLY = {"views": 0, "view_seed": 0, "round_prefix": True}  # settings of --tail-blocks runs, and their defaults
CHECKPOINT = "checkpoint.pt"


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


# --------------------------------------------------------------------------- the model


class TunedModel(nn.Module):
    """The open_clip image tower followed by a head on its pooled, projected embedding."""

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def select_trainable(visual: nn.Module, tune: str, last_k: int = 1) -> list[str]:
    """Set requires_grad on the image tower's parameters to train; returns their names."""
    visual.requires_grad_(False)
    if tune == "all":
        chosen = [n for n, _ in visual.named_parameters()]
    elif tune == "norms":
        norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
        chosen = [
            f"{m}.{n}" if m else n
            for m, mod in visual.named_modules()
            if isinstance(mod, norms)
            for n, _ in mod.named_parameters(recurse=False)
        ]
        chosen += [n for n, _ in visual.named_parameters() if n.endswith("bias") and n not in chosen]
    else:
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None:
            raise VlmcacheError(
                f"--tune last needs a ViT image tower; {type(visual).__name__} has no transformer blocks. "
                f"Use --tune all or --tune norms."
            )
        if last_k > len(blocks):
            raise VlmcacheError(f"--last-k {last_k}: the tower has {len(blocks)} blocks.")
        first = len(blocks) - last_k
        keep = tuple(f"transformer.resblocks.{i}." for i in range(first, len(blocks))) + ("ln_post.", "proj")
        chosen = [n for n, _ in visual.named_parameters() if n.startswith(keep)]
    params = dict(visual.named_parameters())
    for n in chosen:
        params[n].requires_grad_(True)
    return chosen


# --------------------------------------------------------------------------- the data


class AugmentedRows(torch.utils.data.Dataset):
    """Training samples of any epoch: item (epoch, k, row) is sample k of that epoch, image `row`, its crop and flip
    seeded by (seed, epoch, k). The items carry their epoch, so one set of loader workers, started once per run,
    serves every epoch (EpochBatches says which items an epoch has). An unreadable image is a skipped sample,
    counted per epoch in the run's history."""

    def __init__(self, split: Split, transform, seed: int):
        self.source, self.transform, self.seed = split.source, transform, seed

    def __getitem__(self, item: tuple[int, int, int]):
        epoch, k, row = item
        try:
            img = self.source.load(row)
        except BadImage as e:
            return row, None, None, str(e)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, k]).generate_state(1)[0]))
            return row, self.transform(img), None, None


class EpochBatches:
    """The batches of (epoch, k, row) items of the epoch set last (`set_epoch`), in order. It lives in the main
    process, which hands each batch's items to the loader's workers, so the workers never need the epoch's order."""

    def __init__(self, batch_size: int):
        self.batch_size, self.epoch = batch_size, 0
        self.rows = self.positions = np.zeros(0, np.int64)

    def set_epoch(self, epoch: int, rows: np.ndarray, positions: np.ndarray) -> None:
        self.epoch, self.rows, self.positions = epoch, rows, positions

    def __iter__(self):
        for i in range(0, len(self.rows), self.batch_size):
            j = slice(i, i + self.batch_size)
            yield [(self.epoch, int(k), int(r)) for k, r in zip(self.positions[j], self.rows[j], strict=True)]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)


def training_loader(data: AugmentedRows, batches: EpochBatches, workers: int, pin: bool) -> DataLoader:
    """One loader for a whole run: its workers are started once and kept across epochs (persistent). Workers forked
    anew each epoch share the process's memory copy-on-write, and while they live every page that the training
    step writes (weights, gradients, optimiser state, the activations' heap) is copied first: ViT-B-16 on a CPU
    trained at 1.2 to 1.4 img/s beside two idle forked workers against 1.9 without them. Kept, that cost is paid in
    the first epoch only."""
    return image_loader(data, None, workers, pin, batch_sampler=batches, persistent=True)


# --------------------------------------------------------------------------- checkpoints


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:  # weights_only: a checkpoint from elsewhere cannot run code when it is loaded
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache fine-tuning checkpoint (refused to load it: {e}).") from None


# --------------------------------------------------------------------------- the job


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def _evaluate(model, split: Split, encoder: Encoder, counts, classnames, cfg, precision, logit_adjust=None):
    model.eval()
    evaluator = Evaluator(counts, classnames)
    log_prior = None
    if logit_adjust is not None:
        c = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
        log_prior = (c / c.sum()).log().float().to(encoder.device)
    part, finish = handover.cut(encoder.preprocess)  # uint8 from the workers, finished on the device
    data = ImageRows(split.source, np.arange(len(split)), part)
    skipped = 0
    for batch in image_loader(data, cfg.batch_size * 2, cfg.workers, encoder.device.type == "cuda"):
        skipped += len(batch["bad"])
        if batch["images"] is None:
            continue
        x = handover.finished(batch, encoder.device, finish)["images"].to(encoder.device, non_blocking=True)
        with _autocast(encoder.device, precision):
            logits = model(x).float()
        if log_prior is not None:
            logits = logit_adjusted(logits, log_prior, logit_adjust)
        evaluator.update(logits, torch.from_numpy(split.labels[batch["rows"].numpy()]).to(encoder.device))
    metrics, table = evaluator.compute(cfg.many, cfg.few)
    return metrics, table, skipped


def finetune_dataset(cfg: FinetuneConfig):
    """The dataset a fine-tuning run reads. A generated hold-out takes `holdout_seed`, not the training seed, so
    every run of a dataset is scored on one test set."""
    return load_dataset(cfg.dataset, cfg.root, cfg.split_files, cfg.classnames_file, cfg.holdout, cfg.holdout_seed)


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print, on_epoch=None) -> dict:
    """Fine-tune, evaluate and save one run (resuming from its checkpoint); returns the run's summary."""
    cfg.resolve()
    run_dir = _run_dir(cfg)  # the output guard, before any work
    dataset = finetune_dataset(cfg)
    train_split = dataset.split(cfg.train_split)
    eval_name = cfg.eval_split or next((s for s in ("test", "val") if s in dataset.splits), None)
    if eval_name is None:
        raise VlmcacheError(f"{cfg.dataset} has no test or val split to evaluate on; name one with --split.")
    eval_split = dataset.split(eval_name)
    distributed.init_from_env()
    rank, world = distributed.rank_world()
    encoder = load_encoder(cfg.model, cfg.pretrained, distributed.local_device(cfg.device), "fp32", cfg.preprocess_from)
    device = encoder.device
    precision = pick_precision(cfg.precision, device)
    memory_scope = start_peak_memory(device)
    if cfg.tail_blocks:  # K against the tower before the run folder is made
        from vlmcache.tail import check_tail_blocks

        check_tail_blocks(encoder.model.visual, cfg.tail_blocks, encoder.name)
    state = _prepare_run_dir(cfg, run_dir, device)
    if cfg.tail_blocks:
        from vlmcache.tail_finetune import finetune_tail

        return finetune_tail(cfg, encoder, dataset, train_split, eval_split, run_dir, memory_scope, log, on_epoch)

    counts = np.bincount(train_split.labels, minlength=dataset.num_classes)
    model, ddp, n_tuned = _build_model(cfg, encoder, dataset, log)
    opt = _optimizer(cfg, model)
    sampler = build_sampler(cfg.sampler, torch.from_numpy(train_split.labels.astype(np.int64)), **cfg.sampler_params)
    steps = math.ceil(sampler.size // world / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.schedule, cfg.epochs * steps, cfg.warmup_iters))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = build_loss(cfg.loss, counts, **cfg.loss_params).to(device)
    step = _Step(ddp, loss_fn, opt, sched, scaler, device, precision)
    transform, finish = handover.cut(encoder.train_transform(cfg.crop_scale))  # the workers' part, the device's
    history, start, train_seconds = [], 1, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, start, train_seconds = state["history"], state["epoch"] + 1, state["train_seconds"]
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    batches = EpochBatches(cfg.batch_size)
    loader = training_loader(
        AugmentedRows(train_split, transform, cfg.seed), batches, cfg.workers, device.type == "cuda"
    )
    for epoch in range(start, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]))
        order = sampler.epoch(gen).numpy()[: sampler.size // world * world]
        mine = np.arange(rank, len(order), world)
        batches.set_epoch(epoch, order[mine], mine)
        mean_loss, seen, skipped = _train_epoch(step, loader, finish, train_split, epoch, cfg.lr)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        row = {
            "epoch": epoch,
            "loss": mean_loss,
            "seconds": round(seconds, 3),
            "samples_per_s": round(world * seen / seconds, 1),
            "skipped": skipped,
            "lr": last_step_lr(sched),  # what the epoch's last step used
        }
        history.append(row)
        if rank == 0:
            checkpoint = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
            _save_checkpoint(cfg, run_dir, epoch, checkpoint, history, train_seconds)
        distributed.barrier()
        if on_epoch and rank == 0:
            on_epoch(row)
    del loader  # its workers end here: left alive, they would share evaluation's and re-extraction's memory too

    result = None
    if rank == 0:
        cost = {"train_seconds": round(train_seconds, 3), "tuned_tower_params": n_tuned, "precision": precision}
        cost["peak_rss_scope"] = memory_scope
        result = _finish(cfg, run_dir, encoder, model, dataset, eval_split, counts, history, cost)
    result = distributed.broadcast(result)
    if cfg.reextract:  # every process takes part, as in a multi-process `vlmcache extract`
        result["cache"] = reextract(cfg, Path(result["weights"]), log)
    if rank == 0:
        atomic.write_json_atomic(run_dir / "metrics.json", result)  # last: a run with metrics.json is complete
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the final weights are in the run; the checkpoint is spent
    distributed.barrier()
    return result


def _run_dir(cfg: FinetuneConfig) -> Path:
    """This run's folder, checked by the output guard before any work (runs.run_folder)."""
    return runs.run_folder(cfg.out, cfg.runs_dir, cfg.run_name(), cfg.overwrite)


def _prepare_run_dir(cfg: FinetuneConfig, run_dir: Path, device: torch.device) -> dict | None:
    """The run folder made (or emptied with --overwrite) by rank 0; returns the checkpoint to resume from if any."""
    rank = distributed.rank_world()[0]
    state = None
    if cfg.overwrite:
        if rank == 0 and run_dir.exists():
            shutil.rmtree(run_dir)
    elif (run_dir / CHECKPOINT).is_file():
        state = _load_checkpoint(run_dir / CHECKPOINT, device)
        if state.get("config_hash") != cfg.hash():
            raise VlmcacheError(
                f"'{run_dir}' holds a checkpoint of other settings; pass --overwrite to start again, or --out."
            )
    distributed.barrier()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    return state


def _build_model(cfg: FinetuneConfig, encoder: Encoder, dataset, log) -> tuple[TunedModel, nn.Module, int]:
    """The tower with its chosen parameters trainable and a seeded head (from the class texts with --text-init);
    with the DistributedDataParallel wrapper under torchrun, and the number of tuned tower parameters."""
    rank, world = distributed.rank_world()
    device = encoder.device
    visual = encoder.model.visual
    trainable = select_trainable(visual, cfg.tune, cfg.last_k)
    if cfg.grad_checkpointing and hasattr(visual, "set_grad_checkpointing"):
        visual.set_grad_checkpointing(True)
    embed_dim = probe_dims(encoder, tokens=False)["pooled"]
    torch.manual_seed(cfg.seed)
    head = build_head(cfg.head, embed_dim, dataset.num_classes, **cfg.head_params)
    if cfg.text_init:
        text = encoder.encode_classnames(dataset.classnames, get_templates(cfg.text_init))
        head.classifier.init_from_text(text.cpu(), float(encoder.model.logit_scale.exp()))
    model = TunedModel(visual, head).to(device)
    ddp = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    n_tuned = sum(p.numel() for p in visual.parameters() if p.requires_grad)
    if rank == 0:
        log(f"tuning {len(trainable)} tensors ({n_tuned:,} parameters) of the image tower ({cfg.tune}) and the head")
    return model, ddp, n_tuned


def _optimizer(cfg: FinetuneConfig, model: TunedModel) -> torch.optim.Optimizer:
    """AdamW or SGD with the tower at --lr and the head at --head-lr, weight decay on matrices only."""
    tower_params = [p for p in model.visual.parameters() if p.requires_grad]
    groups = param_groups(tower_params, cfg.weight_decay, lr=cfg.lr) + param_groups(
        list(model.head.parameters()), cfg.weight_decay, lr=cfg.head_lr
    )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=bool(cfg.nesterov))
    return torch.optim.AdamW(groups)


@dataclass
class _Step:
    """What one optimiser step needs: the (wrapped) model, loss, optimiser, schedule and loss scaler."""

    ddp: nn.Module
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.precision):
            loss = self.loss_fn(self.ddp(x).float(), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.detach()


def _train_epoch(
    step: _Step, loader: DataLoader, finish, train_split: Split, epoch: int, lr: float
) -> tuple[float, int, int]:
    """One pass over this process's rows of the epoch (the loader's batches, their images finished on the device
    by `finish`, handover.cut's): (mean loss, images trained on, images skipped)."""
    world = distributed.rank_world()[1]
    device = step.device
    losses, seen, skipped = [], 0, 0
    for batch in loader:
        skipped += len(batch["bad"])
        if batch["images"] is None:
            if world > 1:  # one process skipping a step would leave the others waiting in all-reduce
                raise VlmcacheError(
                    f"No image of a batch could be read (for example {batch['bad'][0][1]}); under torchrun "
                    f"every process must take every step. Remove the unreadable images from the split."
                )
            continue
        x = handover.finished(batch, device, finish)["images"].to(device, non_blocking=True)
        y = torch.from_numpy(train_split.labels[batch["rows"].numpy()]).to(device)
        losses.append(step(x, y))
        seen += len(y)
    mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    if not math.isfinite(mean_loss):
        raise VlmcacheError(f"The loss became {mean_loss} in epoch {epoch}; lower --lr (now {lr}).")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return mean_loss, seen, skipped


def _save_checkpoint(cfg, run_dir: Path, epoch: int, parts: dict, history: list, train_seconds: float) -> None:
    """Everything a resume needs after `epoch`, written atomically (rank 0)."""
    atomic.save_torch_atomic(
        {
            "config_hash": cfg.hash(),
            "epoch": epoch,
            **{name: part.state_dict() for name, part in parts.items()},
            "history": history,
            "train_seconds": train_seconds,
        },
        run_dir / CHECKPOINT,
    )
    faults.hit("epoch_saved")


def _finish(cfg, run_dir, encoder, model, dataset, eval_split, counts, history, cost) -> dict:
    """Evaluate and write the run's files but metrics.json (rank 0 only)."""
    check_finite_parameters(model)
    metrics, table, skipped = _evaluate(model, eval_split, encoder, counts, dataset.classnames, cfg, cost["precision"])
    device = encoder.device
    # the tuned weights as an open_clip checkpoint: `vlmcache extract --pretrained FILE` reads it
    weights = run_dir / f"{cfg.model}-ft-{cfg.hash()}.pt"
    atomic.save_torch_atomic(encoder.model.state_dict(), weights)
    head_params = full_head_params(cfg.head, cfg.head_params)
    in_dim = model.head.classifier.weight.shape[1]
    save_run_files(run_dir, cfg, cfg.head, in_dim, dataset.num_classes, head_params, model.head, table, weights,
                   eval_split.name, counts)  # fmt: skip
    samples = sum(h["samples_per_s"] * h["seconds"] for h in history)
    cost.update(
        samples_per_s=round(samples / cost["train_seconds"], 1) if cost["train_seconds"] > 0 else None,
        device=str(device),
        eval_skipped_images=skipped,
        peak_rss_mb=peak_rss_mb(),
    )
    if device.type == "cuda":
        cost["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {"run": str(run_dir), "metrics": metrics, "cost": cost, "history": history, "weights": str(weights)}


def save_run_files(
    run_dir: Path,
    cfg,
    head: str,
    in_dim: int,
    num_classes: int,
    head_params: dict,
    module: nn.Module,
    table,
    weights: Path | None,
    eval_split: str,
    counts: np.ndarray,
) -> None:
    """A fine-tuning run's head.pt, per_class.csv and config.json (metrics.json, last, is the caller's): the
    whole tower's run and a tail run (`weights` None: the tuned tail lives in head.pt) write the same files."""
    saved = {
        "head": head,
        "in_dim": in_dim,
        "num_classes": num_classes,
        "head_params": head_params,
        "head_state": module.state_dict(),
        "stage2": None,
        "stage2_params": None,
        "stage2_state": None,
    }
    atomic.save_torch_atomic(saved, run_dir / "head.pt")
    atomic.write_bytes_atomic(run_dir / "per_class.csv", table.to_csv(index=False).encode())
    config = {
        "config": asdict(cfg),
        "kind": "finetune",
        "weights": None if weights is None else str(weights),
        "eval_split": eval_split,
        "train_counts": counts.tolist(),
        "argv": sys.argv,
    }
    atomic.write_json_atomic(run_dir / "config.json", config)


def _preprocess_tag(cfg: FinetuneConfig) -> str | None:
    """The pretrained tag whose preprocessing (and QuickGELU) the tuned weights file must be loaded with."""
    base = cfg.pretrained if cfg.pretrained and not Path(cfg.pretrained).is_file() else cfg.preprocess_from
    return None if base in (None, "none", "random") else base


def evaluate_finetuned(
    run_dir: str | Path,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    split: str | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate a finished fine-tuning run again (its tuned tower and head), as `vlmcache eval RUN` does."""
    run_dir = Path(run_dir)
    meta, cfg = runs.read_config(run_dir, FinetuneConfig)
    try:
        cfg.resolve()
    except VlmcacheError as e:
        raise VlmcacheError(f"'{run_dir}/config.json': {e}") from None
    if cfg.tail_blocks:
        raise VlmcacheError(
            f"'{run_dir}' is a finetune --tail-blocks run: its metrics.json holds its evaluation, and evaluating it "
            f"again is not supported yet (its tuned tail is in head.pt)."
        )
    weights = run_dir / Path(str(meta.get("weights"))).name  # the tuned tower lives in the run folder, by name
    if not weights.is_file():
        raise VlmcacheError(f"'{run_dir}' has no tuned weights '{weights.name}'; is it a finished fine-tuning run?")
    dataset = finetune_dataset(cfg)
    eval_split = dataset.split(split or meta["eval_split"])
    encoder = load_encoder(cfg.model, str(weights), device, "fp32", _preprocess_tag(cfg))
    saved = upgrade_head_file(runs.load_head_file(run_dir, encoder.device))
    if saved["num_classes"] != dataset.num_classes or len(meta["train_counts"]) != dataset.num_classes:
        raise VlmcacheError(
            f"'{run_dir}/head.pt' is a head for {saved['num_classes']} classes; "
            f"{cfg.dataset} has {dataset.num_classes}."
        )
    try:
        head = build_head(saved["head"], saved["in_dim"], saved["num_classes"], **saved["head_params"])
        head.load_state_dict(saved["head_state"])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise VlmcacheError(f"The weights in '{run_dir}/head.pt' do not fit this vlmcache's heads: {e}") from None
    if tau_norm is not None:
        if cfg.head != "linear":
            raise VlmcacheError("--tau-norm applies to a linear classifier (cosine weights are unit norm).")
        head.classifier = tau_normalized(head.classifier, tau_norm)
    model = TunedModel(encoder.model.visual, head).to(encoder.device)
    counts = np.asarray(meta["train_counts"])
    precision = pick_precision(cfg.precision, encoder.device)
    metrics, _, _ = _evaluate(model, eval_split, encoder, counts, dataset.classnames, cfg, precision, logit_adjust)
    return {
        "run": str(run_dir),
        "split": eval_split.name,
        "tau_norm": tau_norm,
        "logit_adjust": logit_adjust,
        "metrics": metrics,
    }


def reextract(cfg: FinetuneConfig, weights: Path, log=print) -> dict:
    """A new cache of every split from the tuned tower (a new key: its fingerprint holds the file's sha256)."""
    ecfg = ExtractConfig(
        dataset=cfg.dataset,
        root=cfg.root,
        split_files=cfg.split_files,
        classnames_file=cfg.classnames_file,
        holdout=cfg.holdout,
        seed=cfg.holdout_seed,
        model=cfg.model,
        pretrained=str(weights),
        preprocess_from=_preprocess_tag(cfg),
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        tokens=cfg.reextract_tokens,
        device=cfg.device,
    )
    summary = run_extract(ecfg, log=log)
    return {"path": summary["cache"], "key": summary["key"]}
