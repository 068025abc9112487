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
    fmt: str = typer.Option(
        "parquet", "--format", help="parquet (a file per split), clip-retrieval (its own layout) or npy-raw."
    ),
    out_dir: Path = typer.Option(..., "--out", help="The folder the files go to."),
    splits: list[str] = typer.Option(None, "--splits", help="A split to export (repeat it; default: every split)."),
    dtype: str = typer.Option(
        None, "--dtype", help="float32 or float16 (default: float32; clip-retrieval is always float16)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite/--no-overwrite", metavar="", help="Replace an export folder vlmcache wrote, whole."
    ),
    as_json: bool = JSON,
):
    """Write a cache's pooled embeddings with each row's image path, label and class name, shard by shard.

    Example: [bold]vlmcache export digits_lt/vlmcache-tiny__random__ea977237 --format parquet --out exported[/],
    or by the flags that made it: [bold]vlmcache export -d imagefolder --root imgs --out exported[/]

    parquet: SPLIT.parquet with columns row, path, label, class_name, pooled (a fixed-size list). clip-retrieval:
    what clip-retrieval writes, SPLIT/img_emb/img_emb_N.npy (L2-normalised float16) and
    SPLIT/metadata/metadata_N.parquet (image_path, then row, label, class_name). npy-raw: the same layout with the
    embeddings as cached (not normalised). Memory holds one piece at a time.
    """
    twice = sorted({s for s in splits or [] if splits.count(s) > 1})
    if twice:
        raise VlmcacheError(f"--splits '{twice[0]}' is given twice; name each split once.")
    from vlmcache import guard
    from vlmcache.exchange import export_cache
    from vlmcache.listing import resolve_cache

    if ref and any((cache.dataset, cache.model, cache.pretrained, cache.cache_key)):
        raise VlmcacheError("export takes a cache as REF or by its flags (-d, -m, -p, --cache-key), not both.")
    guard.check_output(out_dir, "--out", "export", overwrite)  # before any work
    model_dir = resolve_cache(cache.cache_dir, ref) if ref else cache.find()
    with guard.built_aside(out_dir) as staging:  # replaces an older export whole, or leaves it as it was

        def where(text: str) -> str:
            return text.replace(str(staging), str(out_dir))

        # export_cache says each split's line as it is written (on stderr): the command adds none of its own
        result = export_cache(model_dir, fmt, staging, splits or None, dtype, log=lambda s: log(where(s)))
        for written in result["splits"].values():
            written["path"] = where(written["path"])
        guard.write_export_marker(staging, {"cache": str(model_dir), "format": fmt, "splits": list(result["splits"])})
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
    root: Path = typer.Option(
        None, "--root", help="Store absolute image paths relative to this folder (default: as the source gives them)."
    ),
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
        source, location, dataset, split, cache_dir, labels, classnames, model, overwrite, log=log, root=root
    )
    if as_json:
        print_json(result)
