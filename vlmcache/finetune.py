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

import math
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vlmcache import atomic, distributed, faults, handover, runlock, runs
from vlmcache.encoders import Encoder, load_encoder, pick_precision
from vlmcache.errors import VlmcacheError
from vlmcache.extract import probe_dims
from vlmcache.finetune_config import FinetuneConfig
from vlmcache.finetune_data import AugmentedRows, EpochBatches, finetune_dataset, training_loader
from vlmcache.finetune_eval import TunedModel, autocast, evaluate, reextract
from vlmcache.heads import build_head, full_head_params
from vlmcache.losses import build_loss
from vlmcache.memory import peak_rss_mb, start_peak_memory
from vlmcache.recipe import check_finite_parameters, last_step_lr, lr_factor, param_groups
from vlmcache.samplers import build_sampler
from vlmcache.splits import Split
from vlmcache.templates import get_templates

CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------- the model


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


# --------------------------------------------------------------------------- checkpoints


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:  # weights_only: a checkpoint from elsewhere cannot run code when it is loaded
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache fine-tuning checkpoint (refused to load it: {e}).") from None


# --------------------------------------------------------------------------- the job


def finetune(cfg: FinetuneConfig, log: Callable[[str], None] = print, on_epoch=None, wait: bool = False) -> dict:
    """Fine-tune, evaluate and save one run (resuming from its checkpoint); returns the run's summary.

    The folder the run goes into is held (`runlock`, by rank 0 for every process of a torchrun run) from before
    its checkpoint is read until the run is saved: another vlmcache process there makes this one refuse, or wait
    with `wait`."""
    cfg.resolve()
    run_dir = _run_dir(cfg)  # the output guard, before any work
    dataset = finetune_dataset(cfg)
    train_split = dataset.split(cfg.train_split)
    eval_name = cfg.eval_split or next((s for s in ("test", "val") if s in dataset.splits), None)
    if eval_name is None:
        raise VlmcacheError(f"{cfg.dataset} has no test or val split to evaluate on; name one with --split.")
    eval_split = dataset.split(eval_name)
    distributed.init_from_env()
    with _hold_runs_folder(run_dir.parent, wait, log):
        return _finetune(cfg, run_dir, dataset, train_split, eval_split, log, on_epoch)


@contextmanager
def _hold_runs_folder(folder: Path, wait: bool, log):
    """The runs folder's lock, taken by rank 0 for every process; a refusal is raised on every rank."""
    with ExitStack() as stack:
        error = None
        if distributed.rank_world()[0] == 0:
            try:
                stack.enter_context(runlock.hold(folder, "vlmcache finetune", wait, log))
            except VlmcacheError as e:
                error = str(e)
        error = distributed.broadcast(error)
        if error is not None:
            raise VlmcacheError(error)
        yield


def _finetune(cfg: FinetuneConfig, run_dir: Path, dataset, train_split, eval_split, log, on_epoch) -> dict:
    """The run itself, in its held folder: the tower, the epochs from the checkpoint on, evaluation, the files."""
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
        with autocast(self.device, self.precision):
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
    metrics, table, skipped = evaluate(model, eval_split, encoder, counts, dataset.classnames, cfg, cost["precision"])
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
