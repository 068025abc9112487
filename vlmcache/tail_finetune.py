"""`vlmcache finetune --tail-blocks K --tune adapter|lora|full|none`: fine-tuning with the tower's blocks 0..L-K-1
frozen and a tuned module in its last K blocks, the third leg of issue 28's equality.

This is a real fine-tuning run: every step decodes the images, draws their augmented views and runs the whole tower
on them. Only what it trains is the tail head's: the same `tail.TailTuner` (the last K blocks with AdaptFormer
adapters, LoRA, the blocks themselves, or nothing) and classifier that `train-head --head tail` trains on a cached
prefix, with train-head's recipe (`loop.fit`: one optimiser over the head's parameters, its learning-rate schedule,
its sampler order from one generator seeded once). The views are drawn as `extract --views V --view-seed S` draws
them (`--views`, `--view-seed`, the crop scale from `--crop-min`), and the prefix is rounded to float16 as the cache
stores it (`round_prefix`), so for the same seed and views the run equals the cached run and its `--stream` twin
(tests/test_tail.py). The frozen prefix runs under inference mode: nothing before block L-K can train.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vlmcache import atomic, distributed
from vlmcache.errors import VlmcacheError
from vlmcache.finetune import save_run_files
from vlmcache.heads import CosineClassifier, build_head, full_head_params
from vlmcache.loop import OnRawCosines, RunModel, evaluate, fit
from vlmcache.losses import build_loss
from vlmcache.memory import peak_rss_mb
from vlmcache.samplers import build_sampler
from vlmcache.streaming import StreamedImages
from vlmcache.tail import check_tail_blocks
from vlmcache.templates import get_templates
from vlmcache.train_config import TrainConfig


def tail_recipe(cfg) -> TrainConfig:
    """train-head's recipe for what `fit` reads, from a fine-tuning config: the tail module and the classifier train
    together at --head-lr (train-head has one learning rate), for exactly --epochs (no train-head min_steps floor)."""
    return TrainConfig(
        dataset=cfg.dataset, head="tail", epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.head_lr,
        weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, momentum=cfg.momentum, nesterov=cfg.nesterov,
        warmup_iters=cfg.warmup_iters, schedule=cfg.schedule, iters=0, min_steps=0, seed=cfg.seed,
    )  # fmt: skip


def finetune_tail(
    cfg, encoder, dataset, train_split, eval_split, run_dir: Path, memory_scope: str, log: Callable[[str], None],
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:  # fmt: skip
    """Train, evaluate and save one tail fine-tuning run (rank 0 only: no torchrun yet); returns its summary."""
    if distributed.rank_world()[1] > 1:
        raise VlmcacheError("finetune --tail-blocks runs in one process for now; drop --nproc / torchrun.")
    device, k = encoder.device, cfg.tail_blocks
    n_blocks = check_tail_blocks(encoder.model.visual, k, encoder.name)
    rows = np.arange(len(train_split))
    train = StreamedImages.of_rows(
        train_split.source, rows, train_split.labels, encoder, cfg.workers, True, k, cfg.views, cfg.view_seed,
        cfg.crop_scale, cfg.round_prefix,
    )  # fmt: skip
    test = StreamedImages.of_rows(
        eval_split.source, np.arange(len(eval_split)), eval_split.labels, encoder, cfg.workers, False, k,
        round_prefix=cfg.round_prefix,
    )  # fmt: skip
    which = f"one of {cfg.views} views (view seed {cfg.view_seed})" if cfg.views else "a fresh view"
    log(f"tuning the tower's last {k} of {n_blocks} blocks ({cfg.tune}); blocks before them frozen; {which} per row")
    counts = np.bincount(train_split.labels, minlength=dataset.num_classes)

    torch.manual_seed(cfg.seed)  # as train-head seeds its head: the tuned modules start alike
    head_params = full_head_params("tail", cfg.head_params)
    head = build_head("tail", train.dim, dataset.num_classes, **head_params).to(device)
    head.bind_tower(encoder.model.visual, k, encoder.name)
    head.to(device)
    if cfg.text_init:
        text = encoder.encode_classnames(dataset.classnames, get_templates(cfg.text_init))
        head.init_from_text(text.to(device), float(encoder.model.logit_scale.exp()))
    loss_fn = build_loss(cfg.loss, counts, **cfg.loss_params).to(device)
    if cfg.loss == "ldam" and isinstance(head.classifier, CosineClassifier):
        loss_fn = OnRawCosines(loss_fn, head.classifier)
    sampler = build_sampler(cfg.sampler, train.y, **cfg.sampler_params)
    model = RunModel(head)

    t0 = time.perf_counter()
    history, _ = fit(model, train, loss_fn, sampler, tail_recipe(cfg), device, on_epoch)
    train_seconds = time.perf_counter() - t0
    metrics, table = evaluate(model, test, counts, dataset.classnames, None, cfg.many, cfg.few)

    # the tuned tail lives in head.pt (the tower's own weights never change): no weights file
    save_run_files(run_dir, cfg, "tail", train.dim, dataset.num_classes, head_params, head, table, None,
                   eval_split.name, counts)  # fmt: skip
    seen = sum(h["samples_per_s"] * h["seconds"] for h in history)
    cost = {
        "train_seconds": round(train_seconds, 3),
        "tuned_tower_params": sum(p.numel() for p in head.tuner.parameters() if p.requires_grad),
        "precision": "fp32",
        "peak_rss_scope": memory_scope,
        "samples_per_s": round(seen / train_seconds, 1) if train_seconds > 0 else None,
        "device": str(device),
        "eval_skipped_images": 0,
        "peak_rss_mb": peak_rss_mb(),
    }
    result = {"run": str(run_dir), "metrics": metrics, "cost": cost, "history": history, "weights": None}
    atomic.write_json_atomic(run_dir / "metrics.json", result)  # last: a run with metrics.json is complete
    return result
