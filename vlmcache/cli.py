"""The `vlmcache` command: parses, validates and calls the library. Nothing here that tests cannot call directly."""

from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from vlmcache import cache, distributed
from vlmcache.datasets import DATASETS, load_dataset, parse_split_files, read_split_file, split_stats
from vlmcache.errors import VlmcacheError, parse_key_values
from vlmcache.extract import ExtractConfig, default_workers, run_extract
from vlmcache.finetune import TUNE, FinetuneConfig
from vlmcache.finetune import finetune as run_finetune
from vlmcache.heads import HEADS
from vlmcache.knn import knn
from vlmcache.losses import LOSSES
from vlmcache.samplers import SAMPLERS
from vlmcache.stage2 import STAGE2
from vlmcache.templates import DEFAULT_TEMPLATE_SETS, TEMPLATE_SETS
from vlmcache.train import TrainConfig, evaluate_run, train_head
from vlmcache.zeroshot import zero_shot

app = typer.Typer(
    help="Long-tailed classification with frozen CLIP encoders: extract features once, then train heads on the cache.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
datasets_app = typer.Typer(
    help="List the datasets, or show one dataset's class-frequency statistics. "
    "Example: [bold]vlmcache datasets info places_lt[/]"
)
cache_app = typer.Typer(
    help="Inspect and verify the feature cache. Example: [bold]vlmcache cache ls[/]", no_args_is_help=True
)
app.add_typer(datasets_app, name="datasets")
app.add_typer(cache_app, name="cache")

out = Console(soft_wrap=True)  # paths and commands stay on one line, for copying
err = Console(stderr=True, soft_wrap=True)

DatasetName = Enum("DatasetName", {k: k for k in DATASETS}, type=str)


def user_errors(fn):
    """Print a VlmcacheError as one line on stderr and exit 2; a user mistake never shows a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlmcacheError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- shared options

CACHE_DIR = typer.Option("cache", "--cache-dir", help="Root of the feature cache.")
ROOT = typer.Option(None, "--root", help="Image folder that the split files' paths start from.")
SPLIT_FILES = typer.Option(
    None, "--split-file", help="NAME=PATH of a split file ('relative/path label' lines); repeat for each split."
)
CLASSNAMES = typer.Option(None, "--classnames", help="Class names, one per line (the 'split' dataset only).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
# options train-head and finetune share
SAMPLER_PARAM = typer.Option(
    None, "--sampler-param", help="Sampler setting KEY=VALUE: replacement=false, num_samples=N; repeat."
)
WARMUP_ITERS = typer.Option(None, "--warmup-iters", help="Linear warm-up steps (seed protocol: 512).")
SCHEDULE = typer.Option(None, "--schedule", help="cosine (to zero) or seed_cosine (cos(7 pi t / 16)).")


# --------------------------------------------------------------------------- extract


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.1f} img/s" if task.speed else "- img/s", style="cyan")


class RichProgress:
    """The extraction's progress bar (images/s and ETA), on stderr so that --json stays clean."""

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            speed_estimate_period=10,
        )
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def start(self, split: str, total: int, completed: int = 0) -> None:
        self.task = self.bar.add_task(f"extract {split}", total=total, completed=completed)

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)


@app.command()
@user_errors
def extract(
    dataset: DatasetName = typer.Option(..., "--dataset", "-d", help="Dataset name (see `vlmcache datasets`)."),
    root: Path = ROOT,
    split_file: list[str] = SPLIT_FILES,
    classnames: Path = CLASSNAMES,
    split: list[str] = typer.Option(None, "--split", help="Extract only this split; repeat for several. Default: all."),
    model: str = typer.Option("ViT-B-16", "--model", "-m", help="open_clip model name (open_clip.list_models())."),
    pretrained: str = typer.Option(
        "openai", "--pretrained", "-p", help="open_clip pretrained tag, a local weights file, or 'none' (random)."
    ),
    preprocess_from: str = typer.Option(
        None, "--preprocess-from", help="For a local weights file: the pretrained tag whose preprocessing it uses."
    ),
    preprocess: str = typer.Option(
        "model",
        "--preprocess",
        help="model (the weights' own: size, mean, std, interpolation) or seed (the seed study's: ImageNet mean and "
        "std, Resize 256 + CenterCrop 224); seed is a cache of its own, named <model>__<weights>+seedprep__<hash>.",
    ),
    cache_dir: Path = CACHE_DIR,
    tokens: bool = typer.Option(False, "--tokens", help="Also cache the final block's tokens (for the decoder head)."),
    views: int = typer.Option(0, "--views", help="Augmented views (random resized crop + flip) per training image."),
    view_seed: int = typer.Option(0, "--view-seed", help="Seed of the augmented views."),
    templates: str = typer.Option(
        ",".join(DEFAULT_TEMPLATE_SETS),
        "--templates",
        help=f"Template sets, comma-separated: {', '.join(TEMPLATE_SETS)}.",
    ),
    shard_size: int = typer.Option(1024, "--shard-size", help="Rows per HDF5 shard."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = typer.Option(default_workers(), "--workers", help="Image-loading processes (0: in the main one)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto (bf16/fp16 autocast on GPU, fp32 on CPU), fp32, fp16, bf16."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Discard a cache made with other settings and start again."
    ),
    verify: bool = typer.Option(
        False, "--verify", help="On resume, re-hash finished shards instead of trusting sizes."
    ),
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs) to extract with; launches torchrun for you."),
    holdout: float = typer.Option(
        0.2, "--holdout", help="imagefolder without train/ and val/: test fraction per class."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of generated splits (imagefolder hold-out, digits_lt)."),
    as_json: bool = JSON,
):
    """Run the frozen encoders once over a dataset and cache image and class-text embeddings.

    Example: [bold]vlmcache extract -d places_lt --root /data/places365 -m ViT-B-16 -p openai --tokens[/]

    A killed run resumes where it stopped when given the same command again. Many GPUs:
    [bold]vlmcache extract ... --nproc 4[/] or [bold]torchrun --nproc_per_node 4 -m vlmcache extract ...[/]
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun("extract", nproc))
    if nproc < 1:
        raise VlmcacheError(f"--nproc must be at least 1, got {nproc}.")
    cfg = ExtractConfig(
        dataset=dataset.value,
        root=str(root) if root else None,
        split_files=parse_split_files(split_file),
        classnames_file=str(classnames) if classnames else None,
        splits=split or None,
        model=model,
        pretrained=pretrained,
        preprocess_from=preprocess_from,
        preprocess=preprocess,
        cache_dir=str(cache_dir),
        shard_size=shard_size,
        batch_size=batch_size,
        workers=workers,
        tokens=tokens,
        views=views,
        view_seed=view_seed,
        templates=[t.strip() for t in templates.split(",") if t.strip()],
        device=device,
        precision=precision,
        overwrite=overwrite,
        verify=verify,
        holdout=holdout,
        seed=seed,
    )
    log = functools.partial(err.print, highlight=False)
    with RichProgress(err) as progress:
        summary = run_extract(cfg, progress=progress, log=log)
    if summary["rank"] != 0:  # under torchrun, rank 0 speaks for all
        return
    if as_json:
        _print_json(summary)
        return
    _print_extract_summary(summary)


def _launch_torchrun(command: str, nproc: int) -> int:
    """Run this same command under torchrun with `nproc` processes; returns its exit code."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[2:]:  # drop --nproc N / --nproc=N; torchrun's own variables tell each rank its place
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "vlmcache",
        command,
        *args,
    ]
    err.print(f"launching: {' '.join(cmd)}", highlight=False)
    return subprocess.call(cmd)


def _print_extract_summary(summary: dict) -> None:
    table = Table(title=f"{summary['dataset']} / {summary['key']}  ({summary['device']}, {summary['precision']})")
    for col in ("split", "rows", "skipped", "shards", "resumed", "size", "time", "img/s"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for s in summary["splits"]:
        table.add_row(
            s["split"],
            f"{s['rows']:,}",
            str(s["skipped"]),
            str(s["shards"]),
            str(s["resumed_shards"]),
            _size(s["bytes"]),
            f"{s['seconds']:.1f} s",
            f"{s['images_per_s']:,.0f}" if s["images_per_s"] else "-",
        )
    out.print(table)
    for note in summary["notes"]:
        out.print(f"note: {note}", highlight=False)
    if summary["pretrained"] == "random":
        out.print("note: random weights: the features exercise the pipeline, they do not carry CLIP's knowledge.")
    out.print(f"cache: {summary['cache']}", highlight=False)
    out.print(
        f"class texts: {', '.join(summary['text']['template_sets'])} in {summary['text']['path']}", highlight=False
    )


# --------------------------------------------------------------------------- stage 2

MODEL = typer.Option("ViT-B-16", "--model", "-m", help="open_clip model the cache was extracted with.")
PRETRAINED = typer.Option(
    "openai", "--pretrained", "-p", help="Weights the cache was extracted with (tag, file, none)."
)
CACHE_KEY = typer.Option(None, "--cache-key", help="Which cache, when several match the model and weights.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
EVAL_SPLIT = typer.Option(None, "--split", help="Split to evaluate on (default: test, else val).")


def _metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    cols = ("overall", "many", "medium", "few", "top5", "mean_per_class")
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    table.add_row(*("-" if metrics.get(c) is None else f"{100 * metrics[c]:.2f}" for c in cols))
    return table


@app.command("train-head")
@user_errors
def train_head_cmd(
    dataset: DatasetName = typer.Option(
        None, "--dataset", "-d", help="Dataset of the cache (see `vlmcache cache ls`)."
    ),
    root: Path = typer.Option(
        None, "--root", help="With --stream: the image folder, if it moved since extraction (else unused)."
    ),
    model: str = MODEL,
    pretrained: str = PRETRAINED,
    cache_dir: Path = CACHE_DIR,
    cache_key: str = CACHE_KEY,
    preprocess: str = typer.Option(
        "model",
        "--preprocess",
        help="Which cache: model (the weights' own preprocessing) or seed (extract --preprocess seed).",
    ),
    head: str = typer.Option("linear", "--head", help=f"Head: {', '.join(HEADS)}."),
    head_param: list[str] = typer.Option(None, "--head-param", help="Head setting KEY=VALUE, e.g. depth=2; repeat."),
    text_init: str = typer.Option(None, "--text-init", help="Template set that initialises the cosine head."),
    loss: str = typer.Option(None, "--loss", help=f"Loss: {', '.join(LOSSES)} (default ce)."),
    loss_param: list[str] = typer.Option(None, "--loss-param", help="Loss parameter KEY=VALUE, e.g. gamma=1; repeat."),
    sampler: str = typer.Option(None, "--sampler", help=f"Sampler: {', '.join(SAMPLERS)} (default instance)."),
    stage2: str = typer.Option(None, "--stage2", help=f"Second stage on the run named by --from: {', '.join(STAGE2)}."),
    from_run: Path = typer.Option(
        None, "--from", help="The first-stage run folder that --stage2 builds on (its cache and head come with it)."
    ),
    stage2_param: list[str] = typer.Option(
        None, "--stage2-param", help="Second-stage setting KEY=VALUE, e.g. reinit=false for crt; repeat."
    ),
    sampler_param: list[str] = SAMPLER_PARAM,
    protocol: str = typer.Option(
        "default",
        "--protocol",
        help="default (the method papers' losses, AdamW, 30 epochs, cosine decay, last epoch) or seed (the seed "
        "study's code: each method's seed form, SGD Nesterov lr 0.03, 8192 steps, warm-up, best on val). "
        "Any option given explicitly wins over the protocol.",
    ),
    epochs: int = typer.Option(None, "--epochs", help="Passes over the training split (protocol default: 30)."),
    iters: int = typer.Option(None, "--iters", help="Optimiser steps instead of epochs (seed protocol: 8192)."),
    warmup_iters: int = WARMUP_ITERS,
    schedule: str = SCHEDULE,
    select_on: str = typer.Option(
        None, "--select-on", help="Keep the epoch that scores best on this split (seed protocol: val); none: the last."
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default protocol: 1e-3)."),
    batch_size: int = typer.Option(None, "--batch-size", "-b", help="Samples per step (default: 256)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="Weight decay on matrices (default: 1e-4)."),
    optimizer: str = typer.Option(None, "--optimizer", help="adamw or sgd (default protocol: adamw)."),
    nesterov: bool = typer.Option(None, "--nesterov/--no-nesterov", help="SGD with Nesterov momentum."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same result on CPU."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    runs_dir: Path = typer.Option("runs", "--runs-dir", help="Where run folders go."),
    out_dir: Path = typer.Option(None, "--out", help="This run's folder (default: RUNS_DIR/<name>__<config hash>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Run again even if this run folder is finished."),
    stream_tokens: bool = typer.Option(False, "--stream-tokens", help="Read tokens from disk even if they fit in RAM."),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Baseline: encode the cached rows' images again with the frozen tower on every step, as the seed's "
        "code does (same metrics as the cache for the same seed, slower by the tower's time).",
    ),
    augment: bool = typer.Option(
        None,
        "--augment/--no-augment",
        help="Train on augmented views: one of the cache's --views per row and epoch (the default when the cache has "
        "them), or with --stream a fresh crop and flip every epoch, as the seed's code does.",
    ),
    workers: int = typer.Option(None, "--workers", help="Image loader processes for --stream (default min(8, CPUs))."),
    tau_norm: float = typer.Option(None, "--tau-norm", help="Post-hoc tau-normalisation of a linear classifier."),
    logit_adjust: float = typer.Option(
        None, "--logit-adjust", help="Post-hoc logit adjustment: logits - tau log prior."
    ),
    as_json: bool = JSON,
):
    """Train a head (and optionally a second stage) on cached features; evaluate overall / many / medium / few.

    Example: [bold]vlmcache train-head -d places_lt -m ViT-B-16 --head linear --loss focal --sampler sqrt[/]

    Second stage: [bold]vlmcache train-head --stage2 crt --from runs/places_lt__linear-ce-instance__s0__1a2b3c4d[/]
    """
    cfg = TrainConfig(
        dataset=dataset.value if dataset else None,
        root=str(root) if root else None,
        model=model,
        pretrained=pretrained,
        cache_dir=str(cache_dir),
        cache_key=cache_key,
        preprocess=preprocess,
        head=head,
        head_params=parse_key_values(head_param, "--head-param"),
        text_init=text_init,
        loss=loss,
        loss_params=parse_key_values(loss_param, "--loss-param"),
        sampler=sampler,
        stage2=stage2,
        stage2_params=parse_key_values(stage2_param, "--stage2-param"),
        sampler_params=parse_key_values(sampler_param, "--sampler-param"),
        from_run=str(from_run) if from_run else None,
        protocol=protocol,
        epochs=epochs,
        iters=iters,
        warmup_iters=warmup_iters,
        schedule=schedule,
        select_on=select_on,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        optimizer=optimizer,
        nesterov=nesterov,
        seed=seed,
        eval_split=split,
        device=device,
        runs_dir=str(runs_dir),
        out=str(out_dir) if out_dir else None,
        overwrite=overwrite,
        stream_tokens=stream_tokens,
        stream=stream,
        augment=augment,
        workers=workers,
        tau_norm=tau_norm,
        logit_adjust=logit_adjust,
    )

    def on_epoch(row: dict) -> None:
        err.print(
            f"epoch {row['epoch']:>3}  step {row['step']:>6}  loss {row['loss']:.4f}  "
            f"{row['samples_per_s']:>12,.0f} samples/s"
            + (f"  {cfg.select_on} {100 * row['select_score']:.2f}" if "select_score" in row else ""),
            highlight=False,
        )

    result = train_head(cfg, log=functools.partial(err.print, highlight=False), on_epoch=on_epoch)
    if as_json:
        _print_json(result)
        return
    out.print(_metrics_table(f"{result['run']}", result["metrics"]))
    cost = result["cost"]
    out.print(
        f"train {cost['train_seconds']:.2f} s, {cost['samples_per_s'] or 0:,.0f} samples/s on {cost['device']}, "
        f"peak RSS {cost['peak_rss_mb']:,.0f} MB",
        highlight=False,
    )


@app.command()
@user_errors
def finetune(
    dataset: DatasetName = typer.Option(..., "--dataset", "-d", help="Dataset name (see `vlmcache datasets`)."),
    root: Path = ROOT,
    split_file: list[str] = SPLIT_FILES,
    classnames: Path = CLASSNAMES,
    model: str = typer.Option("ViT-B-16", "--model", "-m", help="open_clip model name."),
    pretrained: str = typer.Option(
        "openai", "--pretrained", "-p", help="open_clip pretrained tag, a local weights file, or 'none' (random)."
    ),
    preprocess_from: str = typer.Option(
        None, "--preprocess-from", help="For a local weights file: the pretrained tag whose preprocessing it uses."
    ),
    tune: str = typer.Option(
        "all", "--tune", help="What of the image tower trains: " + "; ".join(f"{k}: {v}" for k, v in TUNE.items())
    ),
    last_k: int = typer.Option(1, "--last-k", help="Blocks that train with --tune last."),
    head: str = typer.Option("linear", "--head", help="Head on the pooled embedding: linear or cosine."),
    head_param: list[str] = typer.Option(None, "--head-param", help="Head setting KEY=VALUE; repeat."),
    text_init: str = typer.Option(None, "--text-init", help="Template set that initialises the cosine head."),
    loss: str = typer.Option("ce", "--loss", help=f"Loss: {', '.join(LOSSES)}."),
    loss_param: list[str] = typer.Option(None, "--loss-param", help="Loss parameter KEY=VALUE; repeat."),
    sampler: str = typer.Option("instance", "--sampler", help=f"Sampler: {', '.join(SAMPLERS)}."),
    sampler_param: list[str] = SAMPLER_PARAM,
    protocol: str = typer.Option(
        "default",
        "--protocol",
        help="default (AdamW, cosine decay) or seed (the seed study's SGD Nesterov, warm-up and cos(7 pi t / 16), "
        "head lr 0.03, each loss's and the sampler's seed form); explicit options win.",
    ),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the training split."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate of the tower (default 1e-5)."),
    head_lr: float = typer.Option(None, "--head-lr", help="Peak learning rate of the head (default 1e-3)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per step and process."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="Weight decay on matrices (default 0.1)."),
    warmup_iters: int = WARMUP_ITERS,
    schedule: str = SCHEDULE,
    crop_min: float = typer.Option(0.08, "--crop-min", help="Smallest area fraction of the random resized crop."),
    seed: int = typer.Option(0, "--seed", help="Seed of the head, the sampler and the augmentation."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 or fp16 autocast on GPU, fp32 on CPU)."),
    grad_checkpointing: bool = typer.Option(
        False, "--grad-checkpointing", help="Recompute the tower's activations in backward: less memory, more time."
    ),
    workers: int = typer.Option(default_workers(), "--workers", help="Image-loading processes per process."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (GPUs), DistributedDataParallel; launches torchrun."),
    runs_dir: Path = typer.Option("runs", "--runs-dir", help="Where run folders go."),
    out_dir: Path = typer.Option(None, "--out", help="This run's folder (default: RUNS_DIR/<name>__<config hash>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again even if the run has a checkpoint."),
    reextract: bool = typer.Option(
        False, "--reextract", help="Afterwards, extract a new cache with the tuned tower (a new cache key)."
    ),
    reextract_tokens: bool = typer.Option(False, "--reextract-tokens", help="With --reextract: cache tokens too."),
    cache_dir: Path = CACHE_DIR,
    holdout: float = typer.Option(0.2, "--holdout", help="imagefolder without val/: test fraction per class."),
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
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun("finetune", nproc))
    if nproc < 1:
        raise VlmcacheError(f"--nproc must be at least 1, got {nproc}.")
    cfg = FinetuneConfig(
        dataset=dataset.value,
        root=str(root) if root else None,
        split_files=parse_split_files(split_file),
        classnames_file=str(classnames) if classnames else None,
        holdout=holdout,
        holdout_seed=holdout_seed,
        model=model,
        pretrained=pretrained,
        preprocess_from=preprocess_from,
        tune=tune,
        last_k=last_k,
        head=head,
        head_params=parse_key_values(head_param, "--head-param"),
        text_init=text_init,
        loss=loss,
        loss_params=parse_key_values(loss_param, "--loss-param"),
        sampler=sampler,
        epochs=epochs,
        batch_size=batch_size,
        sampler_params=parse_key_values(sampler_param, "--sampler-param"),
        protocol=protocol,
        warmup_iters=warmup_iters,
        schedule=schedule,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        crop_scale=(crop_min, 1.0),
        seed=seed,
        eval_split=split,
        device=device,
        precision=precision,
        grad_checkpointing=grad_checkpointing,
        workers=workers,
        runs_dir=str(runs_dir),
        out=str(out_dir) if out_dir else None,
        overwrite=overwrite,
        reextract=reextract,
        reextract_tokens=reextract_tokens,
        cache_dir=str(cache_dir),
    )

    def on_epoch(row: dict) -> None:
        err.print(
            f"epoch {row['epoch']:>3}/{epochs}  loss {row['loss']:.4f}  {row['samples_per_s']:>10,.1f} img/s",
            highlight=False,
        )

    result = run_finetune(cfg, log=functools.partial(err.print, highlight=False), on_epoch=on_epoch)
    if distributed.rank_world()[0] != 0:
        return
    if as_json:
        _print_json(result)
        return
    out.print(_metrics_table(result["run"], result["metrics"]))
    cost = result["cost"]
    out.print(
        f"train {cost['train_seconds']:.1f} s, {cost['samples_per_s'] or 0:,.1f} img/s on {cost['device']} "
        f"({cost['precision']}); tuned weights: {result['weights']}",
        highlight=False,
    )
    if "cache" in result:
        out.print(f"new cache: {result['cache']['path']}", highlight=False)


@app.command("eval")
@user_errors
def eval_cmd(
    run: Path = typer.Argument(..., help="A run folder written by `vlmcache train-head` or `vlmcache finetune`."),
    tau_norm: float = typer.Option(None, "--tau-norm", help="Post-hoc tau-normalisation of a linear classifier."),
    logit_adjust: float = typer.Option(
        None, "--logit-adjust", help="Post-hoc logit adjustment: logits - tau log prior."
    ),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """Evaluate a saved run again, optionally with post-hoc corrections.

    Example: [bold]vlmcache eval runs/places_lt__linear-ce-instance__s0__1a2b3c4d --logit-adjust 1.0[/]
    """
    result = evaluate_run(run, tau_norm, logit_adjust, split, device)
    if as_json:
        _print_json(result)
        return
    out.print(_metrics_table(f"{run} ({result['split']})", result["metrics"]))


@app.command("zero-shot")
@user_errors
def zero_shot_cmd(
    dataset: DatasetName = typer.Option(..., "--dataset", "-d", help="Dataset of the cache."),
    model: str = MODEL,
    pretrained: str = PRETRAINED,
    cache_dir: Path = CACHE_DIR,
    cache_key: str = CACHE_KEY,
    templates: str = typer.Option("openai", "--templates", help="Template set of the class texts."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """Zero-shot accuracy from the cached image and class-text embeddings.

    Example: [bold]vlmcache zero-shot -d inat18 -m ViT-B-16 -p openai --templates openai[/]
    """
    result = zero_shot(str(cache_dir), dataset.value, model, pretrained, cache_key, templates, split, device)
    result.pop("per_class")
    if as_json:
        _print_json(result)
        return
    out.print(
        _metrics_table(f"zero-shot {dataset.value} ({result['split']}, templates {templates})", result["metrics"])
    )


@app.command("knn")
@user_errors
def knn_cmd(
    dataset: DatasetName = typer.Option(..., "--dataset", "-d", help="Dataset of the cache."),
    model: str = MODEL,
    pretrained: str = PRETRAINED,
    cache_dir: Path = CACHE_DIR,
    cache_key: str = CACHE_KEY,
    k: int = typer.Option(20, "--k", help="Neighbours per query."),
    temperature: float = typer.Option(0.07, "--temperature", help="Votes are exp(cosine / temperature)."),
    balanced: bool = typer.Option(False, "--balanced", help="Divide each class's votes by its training images."),
    blend: Path = typer.Option(None, "--blend", help="A run whose softmax is blended with the kNN votes."),
    blend_weight: float = typer.Option(0.5, "--blend-weight", help="Weight of the kNN votes in the blend."),
    split: str = EVAL_SPLIT,
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """k-nearest-neighbour classification over the cached training features (faiss, cosine).

    Example: [bold]vlmcache knn -d places_lt -m ViT-B-16 --k 20 --balanced --blend runs/<run>[/]
    """
    result = knn(
        str(cache_dir),
        dataset.value,
        model,
        pretrained,
        cache_key,
        k,
        temperature,
        balanced,
        str(blend) if blend else None,
        blend_weight,
        split,
        device,
    )
    result.pop("per_class")
    if as_json:
        _print_json(result)
        return
    out.print(
        _metrics_table(
            f"kNN {dataset.value} (k={k}, T={temperature}{', balanced' if balanced else ''})", result["metrics"]
        )
    )


# --------------------------------------------------------------------------- ablation grids and reports


class RunProgress:
    """Runs done of total, with an ETA, on stderr."""

    def __init__(self, console: Console):
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def start(self, total: int) -> None:
        self.task = self.bar.add_task("ablate", total=total)

    def advance(self, method: str) -> None:
        self.bar.update(self.task, advance=1, description=f"ablate: {method[:40]:<40}")


@app.command()
@user_errors
def ablate(
    pipeline: str = typer.Argument(..., help="A pipeline YAML file, or the name of a shipped one (demo, quick, ...)."),
    out_dir: Path = typer.Option(None, "--out", help="Runs folder (default: the pipeline's runs_dir)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache root (default: the pipeline's cache_dir)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the pipeline and list its runs; train nothing."),
    max_runs: int = typer.Option(5000, "--max-runs", help="Refuse a grid of more runs than this (counted first)."),
    as_json: bool = JSON,
):
    """Run a grid of heads x losses x samplers x second stages x seeds (x models) and write one table.

    Example: [bold]vlmcache ablate pipelines/paper_stage1.yaml --out runs/stage1[/]

    A re-run skips finished runs; a failed run is recorded with its error and the grid goes on.
    """
    import dataclasses

    from vlmcache.ablate import load_pipeline, plan, run_pipeline
    from vlmcache.report import summarize

    pipe = load_pipeline(pipeline, max_runs)
    if cache_dir:
        pipe = dataclasses.replace(pipe, cache_dir=str(cache_dir))
    runs = plan(pipe)
    if dry_run:
        listing = [{"dataset": r.dataset, "model": r.model, "seed": r.seed, "method": r.method} for r in runs]
        if as_json:
            _print_json({"pipeline": pipe.source, "runs": listing})
            return
        out.print(f"{pipe.source}: valid, {len(runs)} runs.", highlight=False)
        for r in listing:
            out.print(
                f"{r['dataset']}  {r['model']['model']} ({r['model'].get('pretrained')})  seed {r['seed']}  "
                f"{r['method']}",
                highlight=False,
                markup=False,  # grid labels are in brackets, which rich would take for markup
            )
        return
    quiet = functools.partial(err.print, highlight=False)
    with RunProgress(err) as progress:
        table = run_pipeline(pipe, str(out_dir) if out_dir else None, progress, log=quiet)
    runs_dir = Path(out_dir) if out_dir else Path(pipe.runs_dir)
    summary = summarize(table)
    counts = table["status"].value_counts().to_dict()
    if as_json:
        _print_json(
            {
                "runs_dir": str(runs_dir),
                "results": str(runs_dir / "results.csv"),
                "status": counts,
                "summary": json.loads(summary.to_json(orient="records")),
            }
        )
    else:
        from vlmcache.report import paper_table

        out.print(paper_table(summary), markup=False, highlight=False, soft_wrap=True)
        out.print(f"{counts}. Table: {runs_dir / 'results.csv'}. Report: vlmcache report {runs_dir}", highlight=False)
    if counts.get("failed"):  # the grid went on and wrote its table; the exit code still says a run failed
        raise typer.Exit(1)


@app.command()
@user_errors
def report(
    runs_dir: Path = typer.Argument(..., help="A folder of runs (from `vlmcache ablate` or `train-head`)."),
    as_json: bool = JSON,
):
    """Write report.md with the results tables and PNG plots (per-class accuracy against frequency, shot
    groups per method, accuracy against training cost).

    Example: [bold]vlmcache report runs/demo[/]
    """
    from vlmcache.report import write_report

    result = write_report(runs_dir, log=functools.partial(err.print, highlight=False))
    if as_json:
        _print_json(result)
        return
    out.print(result["table"], markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {result['report']}  plots: {', '.join(result['plots'].values())}", highlight=False)


# --------------------------------------------------------------------------- datasets


@datasets_app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context):
    """List the datasets."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table(title="datasets (--dataset NAME)")
    table.add_column("name")
    table.add_column("what")
    for name, info in DATASETS.items():
        table.add_row(name, info.description)
    out.print(table)


@datasets_app.command("info")
@user_errors
def datasets_info(
    name: DatasetName = typer.Argument(..., help="Dataset name."),
    root: Path = ROOT,
    split_file: Path = typer.Option(None, "--split-file", help="Statistics of this split file instead."),
    as_json: bool = JSON,
):
    """Images, classes, largest and smallest class, and many (>100) / medium (20-100) / few (<20) shot classes.

    Example: [bold]vlmcache datasets info places_lt --split-file Places_LT_train.txt --json[/]
    """
    if split_file is not None:
        if name.value in ("imagefolder", "digits_lt"):
            raise VlmcacheError(f"--split-file does not apply to {name.value}.")
        _, labels = read_split_file(split_file)
        result = {"dataset": name.value, "split_file": str(split_file), **split_stats(labels)}
        rows = {split_file.name: split_stats(labels)}
        notes = []
    else:
        ds = load_dataset(name.value, root)
        rows = {s: split_stats(sp.labels) for s, sp in ds.splits.items()}
        result = {"dataset": name.value, "num_classes": ds.num_classes, "splits": rows, "notes": ds.notes}
        notes = ds.notes
    if as_json:
        _print_json(result)
        return
    table = Table(title=name.value)
    for col in ("split", "images", "classes", "max / min per class", "many / medium / few"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for s, st in rows.items():
        table.add_row(
            s,
            f"{st['images']:,}",
            f"{st['classes']:,}",
            f"{st['max_per_class']:,} / {st['min_per_class']:,}",
            f"{st['many']} / {st['medium']} / {st['few']}",
        )
    out.print(table)
    for note in notes:
        out.print(f"note: {note}", highlight=False)


# --------------------------------------------------------------------------- cache


@cache_app.command("ls")
@user_errors
def cache_ls(cache_dir: Path = CACHE_DIR, as_json: bool = JSON):
    """List the caches under the cache root. Example: [bold]vlmcache cache ls --cache-dir cache[/]"""
    found = [cache.summarize(p) for p in cache.iter_caches(cache_dir)]
    if as_json:
        _print_json({"cache_dir": str(cache_dir), "caches": found})
        return
    if not found:
        out.print(f"No caches under '{cache_dir}'. Make one with `vlmcache extract` (or `vlmcache demo`).")
        return
    table = Table(title=f"caches in {cache_dir}")
    for col in ("dataset", "key", "splits", "text", "size"):
        table.add_column(col, no_wrap=col == "key")
    for c in found:
        splits = ", ".join(
            f"{s} {v.get('rows', 0):,}"
            + ("" if v.get("complete") else f" ({v.get('shards', 'broken')}, incomplete)")
            + (" +tokens" if v.get("tokens") else "")
            for s, v in c["splits"].items()
        )
        table.add_row(c["dataset"], c["key"], splits, "yes" if c["text"] else "no", _size(c["bytes"]))
    out.print(table)


@cache_app.command("info")
@user_errors
def cache_info(
    ref: str = typer.Argument(..., help="A cache: its path, DATASET/KEY, or a unique key prefix."),
    cache_dir: Path = CACHE_DIR,
    as_json: bool = JSON,
):
    """Fingerprint, splits, shards and skipped images of one cache.

    Example: [bold]vlmcache cache info digits_lt/vlmcache-tiny__random__50f14ae9[/]
    """
    model_dir = cache.resolve_cache(cache_dir, ref)
    summary = cache.summarize(model_dir)
    manifests = {s: cache.read_manifest(model_dir / s) for s in summary["splits"]}
    skipped = {s: [x for e in m["shards"] for x in e["skipped"]] for s, m in manifests.items() if m}
    fingerprint = next((m["fingerprint"]["encoder"] for m in manifests.values() if m), None)
    if as_json:
        _print_json({**summary, "encoder": fingerprint, "skipped_images": skipped})
        return
    out.print(f"[bold]{summary['dataset']} / {summary['key']}[/]  ({_size(summary['bytes'])})  {summary['path']}")
    if fingerprint:
        out.print_json(json.dumps(fingerprint))
    table = Table()
    for col in ("split", "rows", "of", "skipped", "shards", "complete", "tokens", "views", "size"):
        table.add_column(col)
    for s, v in summary["splits"].items():
        if "error" in v:
            table.add_row(s, v["error"], "", "", "", "", "", "", "")
            continue
        table.add_row(
            s,
            f"{v['rows']:,}",
            f"{v['n_rows']:,}",
            str(v["skipped"]),
            v["shards"],
            "yes" if v["complete"] else "NO",
            "yes" if v["tokens"] else "no",
            str(v["views"]),
            _size(v["bytes"]),
        )
    out.print(table)
    for s, items in skipped.items():
        for x in items[:20]:
            out.print(f"skipped {s} row {x['row']}: {x['path']}: {x['reason']}", highlight=False)
        if len(items) > 20:
            out.print(f"... and {len(items) - 20} more skipped in {s} (see --json)")


@cache_app.command("verify")
@user_errors
def cache_verify(
    ref: str = typer.Argument(None, help="A cache (path, DATASET/KEY or key prefix); default: every cache."),
    cache_dir: Path = CACHE_DIR,
    repair: bool = typer.Option(
        False, "--repair", help="Extract the damaged or missing shards again, into this cache (needs the images)."
    ),
    root: Path = typer.Option(None, "--root", help="With --repair: the images' folder, if it moved since extraction."),
    as_json: bool = JSON,
):
    """Re-hash every shard against its manifest; exit 1 and name the shards that differ.

    Example: [bold]vlmcache cache verify places_lt/ViT-B-16__openai__3f9a2c1e --repair[/]
    """
    from vlmcache.extract import repair_split

    targets = [cache.resolve_cache(cache_dir, ref)] if ref else list(cache.iter_caches(cache_dir))
    problems, checked, repaired = [], 0, []
    for model_dir in targets:
        for split_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            found = cache.verify_split(split_dir)
            if found and repair:
                fixed = repair_split(split_dir, str(root) if root else None, log=err.print)
                repaired += [str(split_dir / name) for name in fixed]
                found = cache.verify_split(split_dir)
            problems += found
            checked += 1
    if as_json:
        _print_json({"checked_splits": checked, "problems": problems, "repaired": repaired, "ok": not problems})
    else:
        for path in repaired:
            out.print(f"repaired {path}", highlight=False)
        for p in problems:
            out.print(f"[red]BAD[/] {p}", highlight=False)
        out.print(
            f"{checked} split(s) checked: "
            + ("all shards match their manifest." if not problems else f"{len(problems)} problem(s).")
        )
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- benchmarks


@app.command()
@user_errors
def bench(
    scale: str = typer.Option("default", "--scale", help="smoke (seconds), default (minutes on a CPU), full."),
    out_file: Path = typer.Option("BENCHMARKS.md", "--out", help="Where the Markdown report goes."),
    device: str = DEVICE,
    as_json: bool = JSON,
):
    """Speed, memory and cache size, each figure as a ratio to its limit measured in the same run.

    Example: [bold]vlmcache bench --scale default --out BENCHMARKS.md[/]
    """
    from vlmcache.bench import run_bench, to_markdown

    results = run_bench(scale, device, log=functools.partial(err.print, highlight=False))
    Path(out_file).write_text(to_markdown(results))
    if as_json:
        _print_json({**results, "markdown": str(out_file)})
        return
    out.print(to_markdown(results), markup=False, highlight=False)
    out.print(f"written: {out_file}", highlight=False)


# --------------------------------------------------------------------------- demo


@app.command()
@user_errors
def demo(
    cache_dir: Path = CACHE_DIR,
    runs_dir: Path = typer.Option("runs/demo", "--runs-dir", help="Where the demo's run folders and report go."),
    workers: int = typer.Option(0, "--workers", help="Image-loading processes."),
    as_json: bool = JSON,
):
    """Run the whole loop on the built-in digits_lt data with the tiny random-weight model: extract, zero-shot,
    the demo pipeline (every loss on a linear head, a decoder, a cRT stage) and its report.

    Example: [bold]vlmcache demo[/]
    """
    from vlmcache import demo as demo_loop

    err.print(
        "[bold]vlmcache demo[/]: digits_lt (scikit-learn digits, long-tailed) with vlmcache-tiny.\n"
        "vlmcache-tiny has [bold]random weights[/]: its numbers show that the pipeline runs, not CLIP's accuracy.",
    )
    log = functools.partial(err.print, highlight=False)
    with RichProgress(err) as progress:
        extracted = demo_loop.extract(str(cache_dir), workers, progress, log)
    with RunProgress(err) as progress:
        result = demo_loop.evaluate(str(cache_dir), str(runs_dir), progress, log)
    if as_json:
        _print_json({"cache": extracted["cache"], **{k: v for k, v in result.items() if k != "table"}})
        return
    _print_extract_summary(extracted)
    zs = result["zero_shot"]
    out.print(f"zero-shot (openai templates): overall {100 * zs['overall']:.1f}, few {100 * zs['few']:.1f}")
    out.print(result["table"], markup=False, highlight=False, soft_wrap=True)
    out.print(
        f"report: {result['report']}  (runs in {runs_dir}; re-evaluate one with `vlmcache eval RUN`)", highlight=False
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
