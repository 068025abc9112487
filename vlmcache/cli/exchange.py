"""`vlmcache export` and `vlmcache import`: embeddings out to parquet / clip-retrieval's layout, and in from them."""

from __future__ import annotations

from pathlib import Path

import typer

from vlmcache.cli.common import CACHE_DIR, JSON, CacheRef, app, cache_options, log, print_json, user_errors
from vlmcache.errors import VlmcacheError

PANEL = "Stage 1: features"


@app.command("export", rich_help_panel=PANEL)
@user_errors
@cache_options
def export(
    cache: CacheRef,
    ref: str = typer.Argument(
        None, help="A cache: its path, DATASET/KEY, or a unique key prefix (or pick it with the flags below)."
    ),
    fmt: str = typer.Option("parquet", "--format", help="parquet (one file per split) or npy (clip-retrieval's)."),
    out_dir: Path = typer.Option(..., "--out", help="The folder the files go to."),
    splits: list[str] = typer.Option(None, "--splits", help="A split to export (repeat it; default: every split)."),
    dtype: str = typer.Option("float32", "--dtype", help="The embeddings' type in the files: float32 or float16."),
    as_json: bool = JSON,
):
    """Write a cache's pooled embeddings with each row's image path, label and class name, shard by shard.

    Example: [bold]vlmcache export digits_lt/vlmcache-tiny__random__ea977237 --format parquet --out exported[/],
    or by the flags that made it: [bold]vlmcache export -d imagefolder --root imgs --out exported[/]

    parquet: SPLIT.parquet with columns row, path, label, class_name, pooled (a fixed-size list). npy:
    SPLIT/img_emb/img_emb_N.npy and SPLIT/metadata/metadata_N.parquet (image_path, row, label, class_name), the
    layout clip-retrieval writes. Memory holds one shard at a time.
    """
    from vlmcache.cache import resolve_cache
    from vlmcache.exchange import export_cache

    if ref and any((cache.dataset, cache.model, cache.pretrained, cache.cache_key)):
        raise VlmcacheError("export takes a cache as REF or by its flags (-d, -m, -p, --cache-key), not both.")
    model_dir = resolve_cache(cache.cache_dir, ref) if ref else cache.find()
    # export_cache says each split's line as it is written (on stderr): the command adds none of its own
    result = export_cache(model_dir, fmt, out_dir, splits or None, dtype, log=log)
    if as_json:
        print_json(result)


@app.command("import", rich_help_panel=PANEL)
@user_errors
def import_(
    location: Path = typer.Argument(..., help="A clip-retrieval embedding folder, or a parquet file (--from parquet)."),
    source: str = typer.Option("clip-retrieval", "--from", help="clip-retrieval (img_emb/ + metadata/) or parquet."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="The name to file the cache under (your data's name)."),
    split: str = typer.Option("train", "--split", help="Which split these embeddings are (train, val, test)."),
    labels: Path = typer.Option(
        None, "--labels", help="A split file, 'path label' per line (default: the source's label column)."
    ),
    classnames: Path = typer.Option(None, "--classnames", help="Class names, one per line (default: class N)."),
    model: str = typer.Option("imported", "--model", help="The encoder that made them, for the cache's name."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", metavar="", help="Replace the split."),
    cache_dir: Path = CACHE_DIR,
    as_json: bool = JSON,
):
    """Turn embeddings made elsewhere into a cache split that train-head, knn, eval and report use.

    Example: [bold]vlmcache import clip_out/ --from clip-retrieval -d mydata --split train --labels train.txt[/]

    Import each split (train, then test) into the same cache. An imported cache has pooled embeddings only: no
    tokens (no decoder), no images to stream (no --stream), no class texts (no zero-shot), and `cache verify
    --repair` cannot re-extract it.
    """
    from vlmcache.exchange import import_embeddings

    result = import_embeddings(
        source, location, dataset, split, cache_dir, labels, classnames, model, overwrite, log=log
    )
    if as_json:
        print_json(result)
