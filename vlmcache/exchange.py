"""Embeddings in and out of the cache, in the formats the ecosystem reads.

Export, shard by shard (memory bounded by one shard):
- `parquet`: one file per split, columns `row, path, label, class_name, pooled` (a fixed-size list of float32 or
  float16), a row group per shard; pandas, pyarrow, polars and DuckDB read it.
- `npy`: clip-retrieval's layout per split: `img_emb/img_emb_{i}.npy` (n, D) and `metadata/metadata_{i}.parquet`
  (`image_path`, plus `row`, `label`, `class_name`), one pair per shard; numpy, faiss and clip-retrieval's own
  tools read it.

Import turns such a folder (clip-retrieval's output, or vlmcache's export) or a generic parquet file of path,
label and embedding into a cache split with a manifest and a fingerprint that says where it came from. An
imported cache holds pooled embeddings only: heads on pooled features, kNN, evaluation and reports work on it;
decoders (no tokens), `--stream` (no encoder to run again), zero-shot (no class texts) and `cache verify
--repair` (no extraction to repeat) do not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from vlmcache import cache, guard
from vlmcache.errors import VlmcacheError, unknown_choice

EXPORT_FORMATS = ("parquet", "npy")
IMPORT_SOURCES = ("clip-retrieval", "parquet")
DTYPES = ("float32", "float16")
PATH_COLUMNS = ("image_path", "path")  # clip-retrieval's name, then vlmcache's
EMBEDDING_COLUMNS = ("embedding", "pooled", "img_emb")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # a dependency; only a broken install lacks it
        raise VlmcacheError("Parquet needs pyarrow: pip install pyarrow.") from None
    return pa, pq


# --------------------------------------------------------------------------- export


PIECE_ROWS = 1024  # rows read, converted and written at a time: memory stays flat (glibc reuses the pieces)


def _pieces(split: cache.SplitCache, classnames: list[str], i: int, has_paths: bool) -> Iterator[dict]:
    """Shard i's rows as columns, PIECE_ROWS at a time: row, path (None without stored paths), label,
    class_name, pooled."""
    paths = split.shard_paths(i) if has_paths else None
    n = split.shards[i].rows
    for lo in range(0, n, PIECE_ROWS):
        rows = slice(lo, min(lo + PIECE_ROWS, n))
        labels = split._read(i, "labels", rows).astype(np.int64)
        yield {
            "row": split._read(i, "rows", rows).astype(np.int64),
            "path": paths[rows] if paths is not None else [None] * len(labels),
            "label": labels,
            "class_name": [classnames[y] if 0 <= y < len(classnames) else None for y in labels],
            "pooled": split._read(i, "pooled", rows),
        }


def export_cache(
    model_dir: Path,
    fmt: str,
    out: Path,
    splits: list[str] | None = None,
    dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> dict:
    """Write the cache's splits in `fmt` under `out`; returns what was written per split."""
    if fmt not in EXPORT_FORMATS:
        raise unknown_choice("export format", fmt, EXPORT_FORMATS)
    if dtype not in DTYPES:
        raise unknown_choice("embedding dtype", dtype, DTYPES)
    pa, pq = _pyarrow()
    have = [p.name for p in sorted(model_dir.iterdir()) if (p / cache.MANIFEST).is_file()]
    for s in splits or []:
        if s not in have:
            raise unknown_choice(f"split of '{model_dir}'", s, have)
    text = model_dir / cache.TEXT_FILE
    classnames = cache.read_text(text).classnames if text.is_file() else []
    written = {}
    for name in splits or have:
        split = cache.SplitCache(model_dir / name)
        if not split.has_paths():
            log(f"note: {name}: this cache stores no image paths (extracted before they were stored); path is empty")
        dim = int(split.manifest["dims"]["pooled"])
        if fmt == "parquet":
            written[name] = _write_parquet(split, classnames, out / f"{name}.parquet", dim, dtype, pa, pq)
        else:
            written[name] = _write_npy(split, classnames, out / name, dtype, pa, pq)
        log(f"{name}: {written[name]['rows']:,} rows -> {written[name]['path']}")
    return {"cache": str(model_dir), "format": fmt, "dtype": dtype, "splits": written}


def _write_parquet(split, classnames, path: Path, dim: int, dtype: str, pa, pq) -> dict:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("path", pa.string()),
            ("label", pa.int64()),
            ("class_name", pa.string()),
            ("pooled", pa.list_(value_type, dim)),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.tmp_name(path)
    n, has_paths = 0, split.has_paths()
    with pq.ParquetWriter(tmp, schema) as writer:
        for i in range(len(split.shards)):
            for cols in _pieces(split, classnames, i, has_paths):
                flat = pa.array(cols["pooled"].astype(dtype).reshape(-1), type=value_type)
                pooled = pa.FixedSizeListArray.from_arrays(flat, dim)
                columns = [cols["row"], cols["path"], cols["label"], cols["class_name"], pooled]
                writer.write_table(pa.table(columns, schema=schema))
                n += len(cols["row"])
    cache.publish(tmp, path)
    return {"path": str(path), "rows": n}


def _write_npy(split, classnames, folder: Path, dtype: str, pa, pq) -> dict:
    """img_emb_{i}.npy and metadata_{i}.parquet per shard; the .npy written piece by piece after its header."""
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    dim, n, has_paths = int(split.manifest["dims"]["pooled"]), 0, split.has_paths()
    for i in range(len(split.shards)):
        emb = folder / "img_emb" / f"img_emb_{i}.npy"
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
        meta: dict[str, list] = {"image_path": [], "row": [], "label": [], "class_name": []}
        tmp = cache.tmp_name(emb)
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (split.shards[i].rows, dim)})
            for cols in _pieces(split, classnames, i, has_paths):
                f.write(np.ascontiguousarray(cols["pooled"].astype(dtype)).tobytes())
                meta["image_path"] += list(cols["path"])
                for key in ("row", "label", "class_name"):
                    meta[key] += list(cols[key])
        cache.publish(tmp, emb)
        path = folder / "metadata" / f"metadata_{i}.parquet"
        tmp = cache.tmp_name(path)
        pq.write_table(pa.table(meta), tmp)
        cache.publish(tmp, path)
        n += split.shards[i].rows
    return {"path": str(folder), "rows": n}


# --------------------------------------------------------------------------- import


def _numbered(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """`prefix_{i}suffix` files in index order (img_emb_0.npy, img_emb_1.npy, ..., img_emb_10.npy)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    found = [(int(m.group(1)), p) for p in folder.glob(f"{prefix}_*{suffix}") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def _clip_retrieval_parts(folder: Path, pq) -> Iterator[tuple[np.ndarray, list[str], np.ndarray | None, str]]:
    """(embeddings, paths, labels or None, where) per img_emb/metadata pair of a clip-retrieval folder."""
    embs = _numbered(folder / "img_emb", "img_emb", ".npy")
    metas = _numbered(folder / "metadata", "metadata", ".parquet")
    if not embs:
        raise VlmcacheError(
            f"'{folder}' is not a clip-retrieval embedding folder: no img_emb/img_emb_N.npy files in it."
        )
    if [p.stem.split("_")[-1] for p in embs] != [p.stem.split("_")[-1] for p in metas]:
        raise VlmcacheError(
            f"'{folder}': img_emb/ and metadata/ do not pair up ({len(embs)} embedding files, {len(metas)} "
            f"metadata files); each img_emb_N.npy needs its metadata_N.parquet."
        )
    for emb_path, meta_path in zip(embs, metas, strict=True):
        try:
            emb = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VlmcacheError(f"'{emb_path}' is not a readable .npy array ({e}).") from None
        meta = pq.read_table(meta_path)
        column = next((c for c in PATH_COLUMNS if c in meta.column_names), None)
        if column is None:
            raise VlmcacheError(
                f"'{meta_path}' has no image path column ({' or '.join(PATH_COLUMNS)}); columns: "
                f"{', '.join(meta.column_names)}."
            )
        if emb.ndim != 2 or len(emb) != meta.num_rows:
            raise VlmcacheError(
                f"'{emb_path}' holds an array of shape {emb.shape}; its metadata '{meta_path.name}' has "
                f"{meta.num_rows} rows: expected ({meta.num_rows}, D)."
            )
        labels = meta.column("label").to_numpy() if "label" in meta.column_names else None
        yield np.asarray(emb), meta.column(column).to_pylist(), labels, emb_path.name


def _parquet_parts(path: Path, pq) -> Iterator[tuple[np.ndarray, list[str], np.ndarray | None, str]]:
    """(embeddings, paths, labels or None, where) per row group of a parquet file of path, label, embedding."""
    try:
        f = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise VlmcacheError(f"'{path}' is not a readable parquet file ({e}).") from None
    names = f.schema_arrow.names
    path_col = next((c for c in PATH_COLUMNS if c in names), None)
    emb_col = next((c for c in EMBEDDING_COLUMNS if c in names), None)
    if path_col is None or emb_col is None:
        raise VlmcacheError(
            f"'{path}' needs a path column ({' or '.join(PATH_COLUMNS)}) and an embedding column "
            f"({' or '.join(EMBEDDING_COLUMNS)}); it has: {', '.join(names)}."
        )
    import pyarrow.compute as pc

    for g in range(f.num_row_groups):
        t = f.read_row_group(g)
        emb = t.column(emb_col).combine_chunks()
        lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
        if len(t) and (emb.null_count or (lengths != lengths[0]).any()):
            raise VlmcacheError(f"'{path}', row group {g}: embeddings of different lengths, or null ones.")
        width = int(lengths[0]) if len(t) else 0
        flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False)
        labels = t.column("label").to_numpy() if "label" in names else None
        yield flat.reshape(len(t), width), t.column(path_col).to_pylist(), labels, f"'{path}', row group {g}"


def import_embeddings(
    source: str,
    location: Path,
    dataset: str,
    split: str,
    cache_dir: Path,
    labels_file: Path | None = None,
    classnames_file: Path | None = None,
    model: str = "imported",
    overwrite: bool = False,
    shard_size: int = 8192,
    log: Callable[[str], None] = print,
) -> dict:
    """Make a cache split from embeddings made elsewhere; returns where it went and what it holds.

    Labels come from `labels_file` (a split file: `path label` per line, paths as the source names them) or
    else from a `label` column in the source; class names from `classnames_file` (one per line) or else the
    source's `class_name` column, else `class N`."""
    from vlmcache.datasets import read_classnames, read_split_file

    if source not in IMPORT_SOURCES:
        raise unknown_choice("import source (--from)", source, IMPORT_SOURCES)
    for option, name in (("--dataset", dataset), ("--split", split), ("--model", model)):
        guard.check_name(name, option)  # the output guard's name rule: each becomes a folder
    guard.check_output(cache_dir, "--cache-dir", "cache-root")
    _, pq = _pyarrow()
    location = Path(location)
    if not location.exists():
        raise VlmcacheError(f"'{location}' does not exist.")
    parts = _clip_retrieval_parts(location, pq) if source == "clip-retrieval" else _parquet_parts(location, pq)
    by_path = None
    if labels_file is not None:
        paths, labels = read_split_file(labels_file)
        by_path = dict(zip(paths, labels.tolist(), strict=True))
    names = read_classnames(classnames_file) if classnames_file is not None else None

    pooled_parts, label_parts, path_parts = [], [], []
    for emb, paths, labels, where in parts:
        if by_path is not None:
            missing = [p for p in paths if p not in by_path]
            if missing:
                raise VlmcacheError(
                    f"{where}: {len(missing)} image path(s) have no label in '{labels_file}', e.g. '{missing[0]}'. "
                    f"The labels file lists `path label` per line, paths as the embeddings' metadata names them."
                )
            labels = np.asarray([by_path[p] for p in paths], dtype=np.int64)
        elif labels is None:
            raise VlmcacheError(f"{where}: no label column; give the labels with --labels FILE (`path label` lines).")
        if not np.isfinite(emb).all():
            raise VlmcacheError(f"{where}: the embeddings hold NaN or inf.")
        pooled_parts.append(np.asarray(emb, dtype=np.float16))
        label_parts.append(np.asarray(labels, dtype=np.int64))
        path_parts += [str(p) for p in paths]
    pooled, labels = np.concatenate(pooled_parts), np.concatenate(label_parts)
    if len(labels) == 0:
        raise VlmcacheError(f"'{location}' holds no embeddings.")
    if labels.min() < 0:
        raise VlmcacheError(f"'{location}': labels must be 0 or more; found {labels.min()}.")
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    if labels.max() >= num_classes:
        raise VlmcacheError(f"A label {labels.max()} is beyond the {num_classes} class names of '{classnames_file}'.")
    if names is None:
        names = [f"class {i}" for i in range(num_classes)]

    origin = {"source": source, "location": str(location.resolve())}
    # the cache is named by the embedding space (source and encoder), so that each split imports into it
    digest = hashlib.sha256(json.dumps({"source": source, "model": model}).encode()).hexdigest()[:8]
    model_dir = Path(cache_dir) / dataset / f"{model}__imported__{digest}"
    split_dir = model_dir / split
    if cache.read_manifest(split_dir) is not None and not overwrite:
        raise VlmcacheError(f"'{split_dir}' exists already; pass --overwrite to import it again.")
    for other in model_dir.glob("*/" + cache.MANIFEST) if model_dir.is_dir() else []:
        m = cache.read_manifest(other.parent)
        if (
            other.parent.name != split
            and m
            and (m["dims"]["pooled"], m["fingerprint"]["num_classes"])
            != (
                pooled.shape[1],
                num_classes,
            )
        ):
            raise VlmcacheError(
                f"'{location}' holds embeddings of width {pooled.shape[1]} for {num_classes} classes; the cache's "
                f"'{other.parent.name}' split has width {m['dims']['pooled']} and {m['fingerprint']['num_classes']} "
                f"classes. Import it under another --model, or give --classnames."
            )
    fingerprint = {
        "dataset": dataset,
        "split": split,
        "num_classes": num_classes,
        "encoder": {"model": model, "pretrained": "imported", "imported_from": origin},
        "imported": True,
    }
    if split_dir.exists():
        for p in split_dir.glob("shard-*.h5"):
            p.unlink()
    cache.write_arrays(split_dir, pooled, labels, fingerprint, None, shard_size, f"import:{source}", path_parts)
    text = model_dir / cache.TEXT_FILE
    if not text.is_file() or overwrite:
        cache.write_text(text, cache.TextCache({"imported_from": origin}, names, {}, 100.0))
    log(f"imported {len(labels):,} rows of width {pooled.shape[1]} ({num_classes} classes) into {split_dir}")
    return {"cache": str(model_dir), "split": split, "rows": len(labels), "dim": int(pooled.shape[1])}
