"""`vlmcache extract`, `vlmcache datasets` and `vlmcache cache`: stage 1 and what it leaves on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from vlmcache.choices import DEFAULT_TEMPLATE_SETS, TEMPLATE_SETS
from vlmcache.cli.common import (
    CACHE_DIR,
    CLASSNAMES,
    DATASET,
    DEVICE,
    ENCODE_MODEL,
    ENCODE_PRETRAINED,
    HOLDOUT,
    JSON,
    NAME,
    NPROC,
    PRECISION,
    PREPROCESS_FROM,
    ROOT,
    SPLIT_FILES,
    WORKERS,
    DatasetName,
    RichProgress,
    app,
    build_config,
    check_nproc,
    err,
    log,
    out,
    print_json,
    size,
    switch,
    user_errors,
)
from vlmcache.errors import VlmcacheError

datasets_app = typer.Typer(
    help="List the datasets, or show one dataset's class-frequency statistics and where its data comes from. "
    "Example: [bold]vlmcache datasets info places_lt[/]"
)
cache_app = typer.Typer(
    help="Inspect and verify the feature cache. Example: [bold]vlmcache cache ls[/]", no_args_is_help=True
)
app.add_typer(datasets_app, name="datasets", rich_help_panel="Stage 1: features")
app.add_typer(cache_app, name="cache", rich_help_panel="Stage 1: features")


@app.command(rich_help_panel="Stage 1: features")
@user_errors
def extract(
    dataset: DatasetName = DATASET,
    root: Path = ROOT,
    name: str = NAME,
    split_file: list[str] = SPLIT_FILES,
    classnames: Path = CLASSNAMES,
    shards: list[str] = typer.Option(
        None,
        "--shards",
        help="wds: SPLIT=PATTERN of webdataset tar shards, braces expanded (train='train-{000000..000099}.tar'), "
        "relative to --root if given; repeat for each split.",
    ),
    label_key: str = typer.Option("cls", "--label-key", help="wds: the extension of each sample's label member."),
    decode: str = typer.Option(
        "pil",
        "--decode",
        help="pil (full decode, the reference), draft (JPEGs at a reduced DCT scale, not below the encoder's "
        "input size: faster on large photos) or gpu (JPEGs decoded, resized and normalised on the CUDA device). "
        "draft and gpu give slightly different numbers: each a cache of its own.",
    ),
    splits: list[str] = typer.Option(
        None, "--splits", help="Extract only this split; repeat for several. Default: all."
    ),
    model: str = ENCODE_MODEL,
    pretrained: str = ENCODE_PRETRAINED,
    preprocess_from: str = PREPROCESS_FROM,
    preprocess: str = typer.Option(
        "model",
        "--preprocess",
        help="model (the weights' own: size, mean, std, interpolation) or seed (the seed study's: ImageNet mean and "
        "std, Resize 256 + CenterCrop 224); seed is a cache of its own, named <model>__<weights>+seedprep__<hash>.",
    ),
    cache_dir: Path = CACHE_DIR,
    tokens: bool = switch("tokens", "Also cache the final block's tokens (for the decoder head)."),
    tail_blocks: int = typer.Option(
        0,
        "--tail-blocks",
        help="Also cache the prefix entering the ViT tower's last K blocks, for the tail head "
        "(train-head --head tail; docs/tail.md).",
    ),
    views: int = typer.Option(0, "--views", help="Augmented views (random resized crop + flip) per training image."),
    view_seed: int = typer.Option(0, "--view-seed", help="Seed of the augmented views."),
    templates: str = typer.Option(
        ",".join(DEFAULT_TEMPLATE_SETS),
        "--templates",
        help=f"Template sets, comma-separated: {', '.join(TEMPLATE_SETS)}.",
    ),
    shard_size: int = typer.Option(1024, "--shard-size", help="Rows per HDF5 shard."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass."),
    workers: int = WORKERS,
    device: str = DEVICE,
    precision: str = PRECISION,
    overwrite: bool = switch("overwrite", "Discard a cache made with other settings and start again."),
    verify: bool = switch("verify", "On resume, re-hash finished shards instead of trusting sizes."),
    nproc: int = NPROC,
    holdout: float = HOLDOUT,
    seed: int = typer.Option(0, "--seed", help="Seed of generated splits (imagefolder hold-out, digits_lt)."),
    as_json: bool = JSON,
):
    """Run the frozen encoders once over a dataset and cache image and class-text embeddings.

    Example: [bold]vlmcache extract -d places_lt --root /data/places365 -m ViT-B-16 -p openai --tokens[/]

    Your own images: [bold]vlmcache extract -d imagefolder --root /data/birds --name birds[/]. A killed run resumes
    where it stopped when given the same command again. Many GPUs: [bold]--nproc 4[/] or
    [bold]torchrun --nproc_per_node 4 -m vlmcache extract ...[/]
    """
    from vlmcache.choices import default_workers
    from vlmcache.extract_config import ExtractConfig, prepare

    check_nproc("extract", nproc)
    cfg = build_config(
        ExtractConfig,
        locals(),
        split_files=_split_definitions(dataset, split_file, shards),
        classnames_file=str(classnames) if classnames else None,
        splits=splits or None,
        templates=[t.strip() for t in templates.split(",") if t.strip()],
        workers=default_workers() if workers is None else workers,
    )
    prepared = prepare(cfg)  # every mistake that needs no torch, answered before torch is imported

    from vlmcache.extract import run_extract
    from vlmcache.memory import keep_heap_on_cpu

    keep_heap_on_cpu(cfg.device)
    try:
        with RichProgress() as progress:
            summary = run_extract(cfg, progress=progress, log=log, prepared=prepared)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all (Ctrl-C reaches each rank)
            log(
                f"interrupted: the shards finished so far are kept in {Path(cfg.cache_dir) / cfg.name}; the same "
                "command again resumes from them.",
                markup=False,
            )
        raise typer.Exit(130) from None
    if summary["rank"] != 0:  # under torchrun, rank 0 speaks for all
        return
    if as_json:
        print_json(summary)
        return
    print_extract_summary(summary)


def _split_definitions(dataset, split_file: list[str] | None, shards: list[str] | None) -> dict[str, str]:
    """--split-file for the split dataset, --shards for wds; each refused where it does not apply."""
    from vlmcache.datasets import parse_split_files

    name = getattr(dataset, "value", dataset)
    if shards and name != "wds":
        raise VlmcacheError(f"--shards names webdataset tar shards: use it with --dataset wds, not {name}.")
    if name == "wds":
        if split_file:
            raise VlmcacheError("--dataset wds reads --shards SPLIT=PATTERN, not --split-file.")
        return parse_split_files(shards, "--shards")
    return parse_split_files(split_file)


def print_extract_summary(summary: dict) -> None:
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
            size(s["bytes"]),
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


# --------------------------------------------------------------------------- datasets


@datasets_app.callback(invoke_without_command=True)
def datasets(ctx: typer.Context):
    """List the datasets."""
    if ctx.invoked_subcommand is not None:
        return
    from vlmcache.datasets import DATASETS

    table = Table(title="datasets (--dataset NAME)")
    table.add_column("name")
    table.add_column("what")
    for name, info in DATASETS.items():
        table.add_row(name, info.description)
    out.print(table)
    out.print("Where a benchmark's images and split files come from: vlmcache datasets info NAME")


@datasets_app.command("info")
@user_errors
def datasets_info(
    name: DatasetName = typer.Argument(..., help="Dataset name."),
    root: Path = ROOT,
    split_file: Path = typer.Option(None, "--split-file", help="Statistics of this split file instead."),
    train_split_file: Path = typer.Option(
        None,
        "--train-split-file",
        help="With --split-file of a val or test split: the training split file whose counts define its shot groups.",
    ),
    as_json: bool = JSON,
):
    """Images, classes, largest and smallest class, and many (>100) / medium (20-100) / few (<20) shot classes,
    grouped by the training split's counts (as evaluation groups them, also for val and test splits); for a
    benchmark, where its images and split files are published and the layout expected under --root.

    Example: [bold]vlmcache datasets info places_lt --split-file Places_LT_train.txt --json[/]
    """
    import numpy as np

    from vlmcache.datasets import load_dataset
    from vlmcache.lt_benchmarks import where_data
    from vlmcache.splits import read_split_file, split_stats

    source = where_data(name.value)
    if split_file is not None:
        if name.value in ("imagefolder", "digits_lt"):
            raise VlmcacheError(f"--split-file does not apply to {name.value}.")
        _, labels = read_split_file(split_file)
        train = None
        if train_split_file is not None:
            train = np.bincount(read_split_file(train_split_file)[1])
        stats = split_stats(labels, train_counts=train)
        result = {"dataset": name.value, "split_file": str(split_file), **stats}
        rows = {split_file.name: stats}
        notes = (
            []
            if train is not None
            else [
                "shot groups by this file's own counts: right for a training split; "
                "for val or test add --train-split-file"
            ]
        )
    else:
        if train_split_file is not None:
            raise VlmcacheError("--train-split-file goes with --split-file.")
        ds = load_dataset(name.value, root)
        train = np.bincount(ds.splits["train"].labels, minlength=ds.num_classes) if "train" in ds.splits else None
        rows = {s: split_stats(sp.labels, train_counts=train) for s, sp in ds.splits.items()}
        result = {"dataset": name.value, "num_classes": ds.num_classes, "splits": rows, "notes": ds.notes}
        notes = ds.notes
    if as_json:
        print_json({**result, "data_source": source or None})
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
    if source:
        out.print(f"where the data comes from: {source}", highlight=False)


# --------------------------------------------------------------------------- cache


@cache_app.command("ls")
@user_errors
def cache_ls(cache_dir: Path = CACHE_DIR, as_json: bool = JSON):
    """List the caches under the cache root, with the flags that pick each.

    Example: [bold]vlmcache cache ls --cache-dir cache[/]
    """
    from vlmcache import listing
    from vlmcache.features import cache_flags

    if not cache_dir.is_dir():  # `ls` of a missing folder is an error, not an empty listing
        what = "is a file, not a folder" if cache_dir.exists() else "does not exist"
        raise VlmcacheError(
            f"--cache-dir '{cache_dir}' {what}. Make a cache with `vlmcache extract` (or `vlmcache demo`)."
        )
    found = [{**listing.summarize(p), "flags": cache_flags(p)} for p in listing.iter_caches(cache_dir)]
    if as_json:
        print_json({"cache_dir": str(cache_dir), "caches": found})
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
            + (f" +prefix K={v['tail_blocks']}" if v.get("tail_blocks") else "")
            for s, v in c["splits"].items()
        )
        text = ", ".join(c["text_sets"]) if c["text"] else "no"
        table.add_row(c["dataset"], c["key"], splits, text, size(c["bytes"]))
    out.print(table)
    for c in found:
        out.print(f"{c['dataset']}/{c['key']}: pick it with {c['flags']}", highlight=False)


@cache_app.command("info")
@user_errors
def cache_info(
    ref: str = typer.Argument(..., help="A cache: its path, DATASET/KEY, or a unique key prefix."),
    cache_dir: Path = CACHE_DIR,
    paths: int = typer.Option(0, "--paths", help="Also list each split's first N rows: row, label, image path."),
    as_json: bool = JSON,
):
    """Fingerprint, splits, shards and skipped images of one cache.

    Example: [bold]vlmcache cache info digits_lt/vlmcache-tiny__random__50f14ae9 --paths 5[/]
    """
    from vlmcache import cache, listing

    model_dir = listing.resolve_cache(cache_dir, ref)
    summary = listing.summarize(model_dir)
    manifests = {s: cache.read_manifest(model_dir / s) for s in summary["splits"]}
    skipped = {s: [x for e in m["shards"] for x in e["skipped"]] for s, m in manifests.items() if m}
    fingerprint = next((m["fingerprint"]["encoder"] for m in manifests.values() if m), None)
    listed = {s: _first_rows(model_dir / s, paths) for s, m in manifests.items() if m and m.get("complete")}
    if as_json:
        extra = {"paths": listed} if paths else {}
        print_json({**summary, "encoder": fingerprint, "skipped_images": skipped, **extra})
        return
    head = f"{summary['dataset']} / {summary['key']}"
    out.print(f"[bold]{escape(head)}[/]  ({size(summary['bytes'])})  {escape(str(summary['path']))}", markup=True)
    if fingerprint:
        out.print_json(json.dumps(fingerprint))
    if not summary["splits"]:  # an empty table would say nothing; say what is missing
        folders = ", ".join(sorted(p.name for p in model_dir.iterdir() if p.is_dir())) or "none"
        out.print(f"no split of this cache has a manifest.json (folders: {folders}).")
        return
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
            size(v["bytes"]),
        )
    out.print(table)
    for s, items in skipped.items():
        for x in items[:20]:
            out.print(f"skipped {s} row {x['row']}: {x['path']}: {x['reason']}", highlight=False)
        if len(items) > 20:
            out.print(f"... and {len(items) - 20} more skipped in {s} (see --json)")
    for s, rows in listed.items():
        if rows is None:
            out.print(f"{s}: this cache stores no image paths (extracted before vlmcache stored them)")
        for r in rows or []:
            out.print(f"{s} row {r['row']}  label {r['label']}  {r['path']}", highlight=False, markup=False)


def _first_rows(split_dir: Path, n: int) -> list[dict] | None:
    """The first n rows of a split with their labels and image paths (None: the cache has no paths)."""
    from vlmcache import cache

    if n <= 0:
        return []
    split = cache.SplitCache(split_dir)
    if not split.has_paths():
        return None
    rows, labels, paths = split.load("rows")[:n], split.labels()[:n], split.shard_paths(0)[:n]
    for i in range(1, len(split.shards)):
        if len(paths) >= n:
            break
        paths += split.shard_paths(i)[: n - len(paths)]
    return [{"row": int(r), "label": int(y), "path": p} for r, y, p in zip(rows, labels, paths, strict=False)]


@cache_app.command("verify")
@user_errors
def cache_verify(
    ref: str = typer.Argument(None, help="A cache (path, DATASET/KEY or key prefix); default: every cache."),
    cache_dir: Path = CACHE_DIR,
    repair: bool = switch("repair", "Extract the damaged or missing shards again, into this cache (needs the images)."),
    root: Path = typer.Option(None, "--root", help="With --repair: the images' folder, if it moved since extraction."),
    as_json: bool = JSON,
):
    """Re-hash every shard against its manifest and check text.h5; exit 1 and name the files that differ.

    Example: [bold]vlmcache cache verify places_lt/ViT-B-16__openai__3f9a2c1e --repair[/]
    """
    from vlmcache import cache, listing, text_cache
    from vlmcache.extract import repair_split

    if not ref and not cache_dir.is_dir():
        what = "is a file, not a folder" if cache_dir.exists() else "does not exist"
        raise VlmcacheError(f"--cache-dir '{cache_dir}' {what}: there is no cache to verify.")
    targets = [listing.resolve_cache(cache_dir, ref)] if ref else list(listing.iter_caches(cache_dir))
    if not targets:  # "0 split(s) checked: all shards match" would claim what was never checked
        raise VlmcacheError(f"No caches under --cache-dir '{cache_dir}' to verify; `vlmcache cache ls` lists them.")
    problems, checked, repaired = [], 0, []
    for model_dir in targets:
        problems += text_cache.verify_text(model_dir)  # not repaired: extract writes it again (imports: import again)
        for split_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            found = cache.verify_split(split_dir)
            if found and repair:
                fixed = repair_split(split_dir, str(root) if root else None, log=err.print)
                repaired += [str(split_dir / name) for name in fixed]
                found = cache.verify_split(split_dir)
            problems += found
            checked += 1
    if as_json:
        print_json({"checked_splits": checked, "problems": problems, "repaired": repaired, "ok": not problems})
    else:
        for path in repaired:
            out.print(f"repaired {path}", highlight=False)
        for p in problems:
            out.print(f"[red]BAD[/] {escape(str(p))}", markup=True, highlight=False)
        out.print(
            f"{checked} split(s) checked: "
            + ("all shards match their manifest." if not problems else f"{len(problems)} problem(s).")
        )
    if problems:
        raise typer.Exit(1)
