"""`vlmcache train-head`, `eval`, `zero-shot` and `knn`: stage 2 on one cache.

A command is as long as its list of options, one per line (typer reads them from the signature); its body is
a few lines that build the job's config and print the result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from vlmcache.cli.common import (
    CACHE_PREPROCESS,
    DEVICE,
    EVAL_SPLIT,
    HEAD_HELP,
    HEAD_PARAM,
    JSON,
    KNN_THREADS,
    LOGIT_ADJUST,
    LOSS,
    LOSS_PARAM,
    LR,
    OUT_RUN,
    PROTOCOL,
    RUNS_DIR,
    SAMPLER,
    SAMPLER_PARAM,
    SCHEDULE,
    SEED,
    STAGE2_HELP,
    TAU_NORM,
    TEXT_INIT,
    THREADS,
    WAIT,
    WARMUP_ITERS,
    WEIGHT_DECAY,
    WORKERS,
    CacheRef,
    EpochProgress,
    app,
    build_config,
    cache_options,
    log,
    metrics_table,
    out,
    print_json,
    print_result,
    switch,
    use_threads,
    user_errors,
)
from vlmcache.guard import check_name


@app.command("train-head", rich_help_panel="Stage 2: heads")
@user_errors
@cache_options
def train_head(
    cache: CacheRef,
    root: Path = typer.Option(
        None,
        "--root",
        help="imagefolder, split and wds: the --root given to extract, which named the cache (unless --name did); "
        "with --stream also the image folder, if it moved since extraction.",
    ),
    preprocess: str = CACHE_PREPROCESS,
    head: str = typer.Option("linear", "--head", help=HEAD_HELP),
    head_param: list[str] = HEAD_PARAM,
    tune: str = typer.Option(
        None,
        "--tune",
        help="--head tail: what trains in the tower's last K blocks: adapter (default), lora, full or "
        "none (docs/tail.md).",
    ),
    text_init: str = TEXT_INIT,
    loss: str = LOSS,
    loss_param: list[str] = LOSS_PARAM,
    sampler: str = SAMPLER,
    sampler_param: list[str] = SAMPLER_PARAM,
    stage2: str = typer.Option(None, "--stage2", help=STAGE2_HELP),
    from_run: Path = typer.Option(
        None, "--from", help="The first-stage run folder that --stage2 builds on (its cache and head come with it)."
    ),
    stage2_param: list[str] = typer.Option(
        None, "--stage2-param", help="Second-stage setting KEY=VALUE, e.g. reinit=false for crt; repeat."
    ),
    protocol: str = PROTOCOL,
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training split (default protocol: 30)."),
    iters: int = typer.Option(None, "--iters", help="Optimiser steps instead of epochs (seed protocol: 8192)."),
    min_steps: int = typer.Option(
        None,
        "--min-steps",
        help="With the protocol's epochs, train at least this many steps: more epochs on a small split "
        "(default protocol: 2000; off when --epochs or --iters is given).",
    ),
    warmup_iters: int = WARMUP_ITERS,
    schedule: str = SCHEDULE,
    select_on: str = typer.Option(
        None, "--select-on", help="Keep the epoch that scores best on this split (seed protocol: val); none: the last."
    ),
    eval_every: int = typer.Option(
        None,
        "--eval-every",
        help="With --select-on, score every N steps and at the last step (seed protocol: 256, its num_eval_iter); "
        "0: after each epoch (default protocol).",
    ),
    drop_last: bool = switch(
        "drop-last", "Drop each epoch's last partial batch, as the seed's DataLoader does (seed protocol: on).", None
    ),
    lr: float = LR,
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Samples per step (default: 256)."),
    weight_decay: float = WEIGHT_DECAY,
    optimizer: str = typer.Option(None, "--optimizer", help="adamw or sgd (default protocol: adamw)."),
    nesterov: bool = switch("nesterov", "SGD with Nesterov momentum.", None),
    seed: int = SEED,
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    threads: int = THREADS,
    runs_dir: Path = RUNS_DIR,
    out_dir: Path = OUT_RUN,
    overwrite: bool = switch("overwrite", "Run again even if this run folder is finished."),
    stream_tokens: bool = switch("stream-tokens", "Read tokens from disk even if they fit in RAM."),
    stream: bool = switch(
        "stream",
        "Baseline: encode the cached rows' images again with the frozen tower on every step, as the seed's "
        "code does (same metrics as the cache for the same seed, slower by the tower's time).",
    ),
    augment: bool = switch(
        "augment",
        "Train on augmented views: one of the cache's --views per row and epoch (the default when the cache has "
        "them), or with --stream a fresh crop and flip every epoch, as the seed's code does.",
        None,
    ),
    workers: int = WORKERS,
    tau_norm: float = TAU_NORM,
    logit_adjust: float = LOGIT_ADJUST,
    save_predictions: bool = switch(
        "save-predictions", "Write predictions.parquet into the run folder: per test image, its top-5 and scores."
    ),
    log_to: str = typer.Option(
        None,
        "--log",
        help="Per-epoch loss, learning rate and (with --select-on) accuracy: tensorboard or csv, into the run's "
        "logs/ (live in its staging folder RUNS/<run>.tmp-* while it trains).",
    ),
    wait: bool = WAIT,
    as_json: bool = JSON,
):
    """Train a head (and optionally a second stage) on cached features; evaluate overall / many / medium / few.

    Example: [bold]vlmcache train-head --loss focal[/] (the one cache there is), or
    [bold]vlmcache train-head -d places_lt -m ViT-B-16 -p openai --head linear --loss focal --sampler sqrt[/]

    Second stage: [bold]vlmcache train-head --stage2 crt --from runs/places_lt__linear-ce-instance__s0__1a2b3c4d[/]
    """
    use_threads(threads)
    from vlmcache.train import train_head as run
    from vlmcache.train_config import TrainConfig

    cfg = build_config(
        TrainConfig, {**locals(), **dataclasses.asdict(cache)}, from_run=str(from_run) if from_run else None,
        eval_split=split, out=str(out_dir) if out_dir else None, log=log_to,
    )  # fmt: skip

    with EpochProgress(cfg.select_on) as progress:
        result = run(cfg, log=log, on_epoch=progress.on_epoch, hold="vlmcache train-head", wait=wait)
    if as_json:
        print_json(result)
        return
    out.print(metrics_table(f"{result['run']}", result["metrics"]))
    cost = result["cost"]
    out.print(
        f"train {cost['train_seconds']:.2f} s, {cost['samples_per_s'] or 0:,.0f} samples/s on {cost['device']}, "
        f"peak RSS {cost['peak_rss_mb']:,.0f} MB",
        highlight=False,
    )


def split_name(split: str | None) -> None:
    """--split passes the name rule before any import: a split is one folder of its cache, never a path."""
    if split is not None:
        check_name(split, "--split")


@app.command("eval", rich_help_panel="Stage 2: heads")
@user_errors
def eval_run(
    run: Path = typer.Argument(..., help="A run folder written by `vlmcache train-head` or `vlmcache finetune`."),
    tau_norm: float = TAU_NORM,
    logit_adjust: float = LOGIT_ADJUST,
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    save_predictions: bool = switch(
        "save-predictions", "Write this evaluation's per-image predictions to the run folder's predictions.parquet."
    ),
    as_json: bool = JSON,
):
    """Evaluate a saved run again, optionally with post-hoc corrections.

    Example: [bold]vlmcache eval runs/places_lt__linear-ce-instance__s0__1a2b3c4d --logit-adjust 1.0[/]
    """
    from vlmcache.runs import evaluate_run

    split_name(split)
    result = evaluate_run(run, tau_norm, logit_adjust, split, device, save_predictions)
    print_result(result, as_json, f"{run} ({result['split']})")


PREDICTIONS_FILE = typer.Option(
    None,
    "--save-predictions",
    help="A new .parquet file for the per-image predictions (row, path, label, top-5, scores); not inside a cache "
    "or run folder.",
)
PREDICTIONS_OVERWRITE = switch("overwrite", "--save-predictions may replace a predictions file vlmcache wrote.")


@app.command("zero-shot", rich_help_panel="Stage 2: heads")
@user_errors
@cache_options
def zero_shot(
    cache: CacheRef,
    templates: str = typer.Option("openai", "--templates", help="Template set of the class texts."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    save_predictions: Path = PREDICTIONS_FILE,
    overwrite: bool = PREDICTIONS_OVERWRITE,
    as_json: bool = JSON,
):
    """Zero-shot accuracy from the cached image and class-text embeddings.

    Example: [bold]vlmcache zero-shot -d inat18 -m ViT-B-16 -p openai --templates openai[/]
    """
    split_name(split)  # before torch: a split is one folder of its cache
    from vlmcache.zeroshot import zero_shot as run

    result = run(
        str(cache.cache_dir), cache.dataset, cache.model, cache.pretrained, cache.cache_key, templates, split, device,
        predictions=str(save_predictions) if save_predictions else None, overwrite=overwrite,
    )  # fmt: skip
    print_result(result, as_json, f"zero-shot {result['dataset']} ({result['split']}, templates {templates})")


@app.command("knn", rich_help_panel="Stage 2: heads")
@user_errors
@cache_options
def knn(
    cache: CacheRef,
    k: int = typer.Option(20, "--k", help="Neighbours per query."),
    temperature: float = typer.Option(0.07, "--temperature", help="Votes are exp(cosine / temperature)."),
    balanced: bool = switch("balanced", "Divide each class's votes by its training images."),
    blend: Path = typer.Option(None, "--blend", help="A run whose softmax is blended with the kNN votes."),
    blend_weight: float = typer.Option(0.5, "--blend-weight", help="Weight of the kNN votes in the blend."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    threads: int = KNN_THREADS,
    save_predictions: Path = PREDICTIONS_FILE,
    index: str = typer.Option(
        "auto", "--index", help="auto (torch's exact search on a GPU, faiss on the CPU), faiss, or torch."
    ),
    overwrite: bool = PREDICTIONS_OVERWRITE,
    as_json: bool = JSON,
):
    """k-nearest-neighbour classification over the cached training features (cosine; faiss, or torch on a GPU).

    Example: [bold]vlmcache knn -d places_lt -m ViT-B-16 --k 20 --balanced --blend runs/<run>[/]
    """
    use_threads(threads, default=0)  # measured: no gain from one thread (docs/cli.md), and faiss searches use the cores
    split_name(split)
    from vlmcache.knn import knn as run

    result = run(
        str(cache.cache_dir), cache.dataset, cache.model, cache.pretrained, cache.cache_key, k, temperature, balanced,
        str(blend) if blend else None, blend_weight, split, device,
        predictions=str(save_predictions) if save_predictions else None, index=index, overwrite=overwrite,
    )  # fmt: skip
    balance = ", balanced" if balanced else ""
    print_result(result, as_json, f"kNN {result['dataset']} (k={k}, T={temperature}{balance}; {result['index']})")
