"""`vlmcache finetune`: the one stage that streams images again.

A command is as long as its list of options, one per line (typer reads them from the signature); its body is
a few lines that build the job's config and print the result.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcache.choices import TUNE
from vlmcache.cli.common import (
    CACHE_DIR,
    CLASSNAMES,
    DATASET,
    DEVICE,
    ENCODE_MODEL,
    ENCODE_PRETRAINED,
    EVAL_SPLIT,
    HEAD_PARAM,
    HOLDOUT,
    JSON,
    LOSS,
    LOSS_PARAM,
    NPROC,
    OUT_RUN,
    PRECISION,
    PREPROCESS_FROM,
    PROTOCOL,
    ROOT,
    RUNS_DIR,
    SAMPLER,
    SAMPLER_PARAM,
    SCHEDULE,
    SPLIT_FILES,
    TEXT_INIT,
    WAIT,
    WARMUP_ITERS,
    WEIGHT_DECAY,
    WORKERS,
    DatasetName,
    app,
    build_config,
    check_nproc,
    log,
    metrics_table,
    out,
    print_json,
    switch,
    user_errors,
)


@app.command(rich_help_panel="Stage 2: heads")
@user_errors
def finetune(
    dataset: DatasetName = DATASET,
    root: Path = ROOT,
    split_file: list[str] = SPLIT_FILES,
    classnames: Path = CLASSNAMES,
    model: str = ENCODE_MODEL,
    pretrained: str = ENCODE_PRETRAINED,
    preprocess_from: str = PREPROCESS_FROM,
    tune: str = typer.Option(
        "all",
        "--tune",
        help="What of the image tower trains: "
        + "; ".join(f"{k}: {v}" for k, v in TUNE.items())
        + ". With --tail-blocks: adapter, lora, full or none (the tail head's module).",
    ),
    last_k: int = typer.Option(1, "--last-k", help="Blocks that train with --tune last."),
    tail_blocks: int = typer.Option(
        0,
        "--tail-blocks",
        help="K: freeze blocks 0..L-K-1 and train the tail head's module (--tune adapter, lora, "
        "full or none) in the last K, with train-head --head tail's recipe (docs/tail.md).",
    ),
    views: int = typer.Option(0, "--views", help="With --tail-blocks: one of V views per row and epoch, as extract's."),
    view_seed: int = typer.Option(0, "--view-seed", help="With --tail-blocks: the views' seed, as extract's."),
    round_prefix: bool = typer.Option(
        True,
        "--round-prefix/--no-round-prefix",
        help="With --tail-blocks: round the prefix to float16 as the cache does.",
    ),
    head: str = typer.Option("linear", "--head", help="Head on the pooled embedding: linear or cosine."),
    head_param: list[str] = HEAD_PARAM,
    text_init: str = TEXT_INIT,
    loss: str = LOSS,
    loss_param: list[str] = LOSS_PARAM,
    sampler: str = SAMPLER,
    sampler_param: list[str] = SAMPLER_PARAM,
    protocol: str = PROTOCOL,
    epochs: int = typer.Option(10, "--epochs", help="Passes over the training split."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate of the tower (default 1e-5)."),
    head_lr: float = typer.Option(None, "--head-lr", help="Peak learning rate of the head (default 1e-3)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per step and process."),
    weight_decay: float = WEIGHT_DECAY,
    warmup_iters: int = WARMUP_ITERS,
    schedule: str = SCHEDULE,
    crop_min: float = typer.Option(0.08, "--crop-min", help="Smallest area fraction of the random resized crop."),
    seed: int = typer.Option(0, "--seed", help="Seed of the head, the sampler and the augmentation."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    precision: str = PRECISION,
    grad_checkpointing: bool = switch(
        "grad-checkpointing", "Recompute the tower's activations in backward: less memory, more time."
    ),
    workers: int = WORKERS,
    nproc: int = NPROC,
    runs_dir: Path = RUNS_DIR,
    out_dir: Path = OUT_RUN,
    overwrite: bool = switch("overwrite", "Start again even if the run has a checkpoint."),
    wait: bool = WAIT,
    reextract: bool = switch("reextract", "Afterwards, extract a new cache with the tuned tower (a new key)."),
    reextract_tokens: bool = switch("reextract-tokens", "With --reextract: cache tokens too."),
    cache_dir: Path = CACHE_DIR,
    holdout: float = HOLDOUT,
    holdout_seed: int = typer.Option(
        0, "--holdout-seed", help="Seed of that hold-out (as extract's --seed), never the training --seed."
    ),
    as_json: bool = JSON,
):
    """Fine-tune the image tower and a head on augmented images: the one stage that streams images again.

    Example: [bold]vlmcache finetune -d places_lt --root /data/places365 -m ViT-B-16 --tune last --last-k 2
    --loss balanced_softmax --epochs 10 --reextract[/]

    A checkpoint is written after every epoch; the same command again resumes after the last one.
    Many GPUs: [bold]--nproc 4[/] or [bold]torchrun --nproc_per_node 4 -m vlmcache finetune ...[/]
    """
    from vlmcache import distributed
    from vlmcache.choices import default_workers
    from vlmcache.datasets import parse_split_files
    from vlmcache.finetune import finetune as run
    from vlmcache.finetune_config import FinetuneConfig
    from vlmcache.memory import keep_heap_on_cpu

    check_nproc("finetune", nproc)
    cfg = build_config(
        FinetuneConfig,
        locals(),
        split_files=parse_split_files(split_file),
        classnames_file=str(classnames) if classnames else None,
        loss=loss or "ce",
        sampler=sampler or "instance",
        crop_scale=(crop_min, 1.0),
        eval_split=split,
        workers=default_workers() if workers is None else workers,
        out=str(out_dir) if out_dir else None,
    )

    def on_epoch(row: dict) -> None:
        log(f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f}  {row['samples_per_s']:>10,.1f} img/s")

    keep_heap_on_cpu(cfg.device)
    result = run(cfg, log=log, on_epoch=on_epoch, wait=wait)
    if distributed.rank_world()[0] != 0:
        return
    if as_json:
        print_json(result)
        return
    out.print(metrics_table(result["run"], result["metrics"]))
    cost = result["cost"]
    out.print(
        f"train {cost['train_seconds']:.1f} s, {cost['samples_per_s'] or 0:,.1f} img/s on {cost['device']} "
        f"({cost['precision']}); tuned weights: {result['weights'] or 'the tail, in the run folder head.pt'}",
        highlight=False,
    )
    if "cache" in result:
        out.print(f"new cache: {result['cache']['path']}", highlight=False)
