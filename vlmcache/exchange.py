"""Embeddings in and out of the cache, in the formats the ecosystem reads.

Export, shard by shard (memory bounded by a piece of PIECE_ROWS rows):
- `parquet`: one file per split, columns `row, path, label, class_name, pooled` (a fixed-size list of float32 or
  float16), written piece by piece; pandas, pyarrow, polars and DuckDB read it.
- `clip-retrieval`: exactly what `clip-retrieval inference` writes, per split: `img_emb/img_emb_{i}.npy` holding
  L2-normalised float16 rows (its mapper.py divides each image feature by its norm and casts to float16) and
  `metadata/metadata_{i}.parquet` with `image_path` first (its writer.py; `i` zero-padded to the digits of the file
  count, `str(i).zfill(int(log10(count)) + 1)`), plus `row`, `label`, `class_name` as the extra metadata columns
  it writes with `--enable_metadata`. Its index (autofaiss) and back end then compute cosines, as they do on their
  own files. A zero row stays zero (clip-retrieval's `normalized` leaves a zero norm at 1).
- `npy-raw`: the same layout holding the cache's embeddings as they are (not normalised; float32 unless
  `--dtype float16`), for tools that want the encoder's raw output.
`npy`, this format's earlier name, is refused with both choices named: it meant the raw embeddings but was
described as clip-retrieval's layout, and clip-retrieval's own index returned other neighbours on it.

Every parquet file an export writes carries its provenance in the schema metadata (`vlmcache`: the cache and the
format), which import records as the split's source.

Import turns such a folder (clip-retrieval's output, or vlmcache's export) or a generic parquet file of path,
label and embedding into a cache split with a manifest and a fingerprint that says where it came from; what it
reads and checks is in `vlmcache.ingest`. An imported cache holds pooled embeddings only: heads on pooled
features, kNN, evaluation and reports work on it; decoders (no tokens), `--stream` (no encoder to run again),
zero-shot (no class texts) and `cache verify --repair` (no extraction to repeat) do not.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from vlmcache import atomic, cache, guard, text_cache
from vlmcache.errors import VlmcacheError, unknown_choice

EXPORT_FORMATS = ("parquet", "clip-retrieval", "npy-raw")
IMPORT_SOURCES = ("clip-retrieval", "parquet")
DTYPES = ("float32", "float16")
DEFAULT_DTYPE = {"parquet": "float32", "clip-retrieval": "float16", "npy-raw": "float32"}


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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, computed in float32 as clip-retrieval's mapper does; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    norm[norm == 0] = 1
    return x / norm


def export_cache(
    model_dir: Path,
    fmt: str,
    out: Path,
    splits: list[str] | None = None,
    dtype: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the cache's splits in `fmt` under `out`; returns what was written per split. `dtype` defaults to the
    format's own (float16 for clip-retrieval, which allows no other)."""
    if fmt == "npy":
        raise VlmcacheError(
            "The export format 'npy' is now two formats; choose one: clip-retrieval (L2-normalised float16, what "
            "clip-retrieval itself writes) or npy-raw (the cache's embeddings as they are, same layout)."
        )
    if fmt not in EXPORT_FORMATS:
        raise unknown_choice("export format", fmt, EXPORT_FORMATS)
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in DTYPES:
        raise unknown_choice("embedding dtype", dtype, DTYPES)
    if fmt == "clip-retrieval" and dtype != "float16":
        raise VlmcacheError(
            f"--format clip-retrieval writes float16, as clip-retrieval does; --dtype {dtype} is for --format "
            f"npy-raw or parquet."
        )
    pa, pq = _pyarrow()
    have = [p.name for p in sorted(model_dir.iterdir()) if (p / cache.MANIFEST).is_file()]
    for s in splits or []:
        if s not in have:
            raise unknown_choice(f"split of '{model_dir}'", s, have)
    text = model_dir / text_cache.TEXT_FILE
    classnames = text_cache.read_text(text).classnames if text.is_file() else []
    written = {}
    provenance = {"cache": f"{model_dir.parent.name}/{model_dir.name}", "format": fmt}
    for name in splits or have:
        split = cache.SplitCache(model_dir / name)
        if not split.has_paths():
            log(f"note: {name}: this cache stores no image paths (extracted before they were stored); path is empty")
        dim = int(split.manifest["dims"]["pooled"])
        meta = {b"vlmcache": json.dumps(provenance).encode()}
        if fmt == "parquet":
            written[name] = _write_parquet(split, classnames, out / f"{name}.parquet", dim, dtype, meta, pa, pq)
        else:
            unit = fmt == "clip-retrieval"
            written[name] = _write_npy(split, classnames, out / name, dtype, unit, meta, pa, pq)
        log(f"{name}: {written[name]['rows']:,} rows -> {written[name]['path']}")
    return {"cache": str(model_dir), "format": fmt, "dtype": dtype, "splits": written}


def _write_parquet(split, classnames, path: Path, dim: int, dtype: str, meta: dict, pa, pq) -> dict:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("path", pa.string()),
            ("label", pa.int64()),
            ("class_name", pa.string()),
            ("pooled", pa.list_(value_type, dim)),
        ],
        metadata=meta,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.tmp_name(path)
    n, has_paths = 0, split.has_paths()
    with pq.ParquetWriter(tmp, schema) as writer:
        for i in range(len(split.shards)):
            for cols in _pieces(split, classnames, i, has_paths):
                flat = pa.array(cols["pooled"].astype(dtype).reshape(-1), type=value_type)
                pooled = pa.FixedSizeListArray.from_arrays(flat, dim)
                columns = [cols["row"], cols["path"], cols["label"], cols["class_name"], pooled]
                writer.write_table(pa.table(columns, schema=schema))
                n += len(cols["row"])
    atomic.publish(tmp, path)
    return {"path": str(path), "rows": n}


def file_number(i: int, count: int) -> str:
    """clip-retrieval's file numbering: `str(i).zfill(int(log10(count)) + 1)` (writer.py's OutputSink)."""
    return str(i).zfill(int(math.log10(max(count, 1))) + 1)


def _write_npy(split, classnames, folder: Path, dtype: str, unit: bool, meta: dict, pa, pq) -> dict:
    """img_emb_{i}.npy and metadata_{i}.parquet per shard; the .npy written piece by piece after its header."""
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    dim, n, has_paths = int(split.manifest["dims"]["pooled"]), 0, split.has_paths()
    schema = pa.schema(
        [("image_path", pa.string()), ("row", pa.int64()), ("label", pa.int64()), ("class_name", pa.string())],
        metadata=meta,
    )
    count = len(split.shards)
    for i in range(count):
        number = file_number(i, count)
        emb = folder / "img_emb" / f"img_emb_{number}.npy"
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
        cols_out: dict[str, list] = {"image_path": [], "row": [], "label": [], "class_name": []}
        tmp = atomic.tmp_name(emb)
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (split.shards[i].rows, dim)})
            for cols in _pieces(split, classnames, i, has_paths):
                rows = unit_rows(cols["pooled"]) if unit else cols["pooled"]
                f.write(np.ascontiguousarray(rows.astype(dtype)).tobytes())
                cols_out["image_path"] += list(cols["path"])
                for key in ("row", "label", "class_name"):
                    cols_out[key] += list(cols[key])
        atomic.publish(tmp, emb)
        path = folder / "metadata" / f"metadata_{number}.parquet"
        tmp = atomic.tmp_name(path)
        pq.write_table(pa.table(cols_out, schema=schema), tmp)
        atomic.publish(tmp, path)
        n += split.shards[i].rows
    return {"path": str(folder), "rows": n}


# --------------------------------------------------------------------------- import


def describe_source(source: dict | None) -> str:
    """A split's recorded source in words, for the error that refuses to mix two."""
    if not source:
        return "an unrecorded source (imported before sources were recorded)"
    made = source.get("made_by") or "unknown"
    maker = f"vlmcache's export of the cache {made}" if made != "unknown" else "files made elsewhere"
    norm = "unit-norm" if source.get("unit_norm") else "not unit-norm"
    return f"{maker} ({source.get('format')}, {norm} embeddings)"


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
    root: Path | None = None,
) -> dict:
    """Make a cache split from embeddings made elsewhere; returns where it went and what it holds.

    Labels come from `labels_file` (a split file: `path label` per line, paths as the source names them) or
    else from a `label` column in the source; class names from `classnames_file` (one per line) or else the
    source's `class_name` column, else `class N`. `root` stores absolute image paths relative to it.

    Rows stream through `ingest.Validator` into shards in a staging folder (memory: a piece and a shard), and the
    split appears only when every row passed. The split's fingerprint records its source (which vlmcache cache
    exported it, or none; the format; whether the embeddings are unit-norm): a split from another source than the
    cache's other splits is refused, since a head trained on one and evaluated on the other measures nothing."""
    import os
    import shutil
    import tempfile

    from vlmcache import ingest
    from vlmcache.splits import read_classnames, read_split_file

    if source not in IMPORT_SOURCES:
        raise unknown_choice("import source (--from)", source, IMPORT_SOURCES)
    for option, name in (("--dataset", dataset), ("--split", split), ("--model", model)):
        guard.check_name(name, option)  # the output guard's name rule: each becomes a folder
    guard.check_output(cache_dir, "--cache-dir", "cache-root")
    location = Path(location)
    if not location.exists():
        raise VlmcacheError(f"'{location}' does not exist.")
    if root is not None and not Path(root).is_dir():
        raise VlmcacheError(f"--root '{root}' is not a folder.")
    by_path = None
    if labels_file is not None:
        paths, labels = read_split_file(ingest.regular_file(Path(labels_file), "labels file (--labels)"))
        by_path = dict(zip(paths, labels.tolist(), strict=True))
    names = None
    if classnames_file is not None:
        names = read_classnames(ingest.regular_file(Path(classnames_file), "class-name file (--classnames)"))
    if source == "clip-retrieval":
        pieces, made_by = ingest.clip_retrieval_pieces(location)
    else:
        pieces, made_by = ingest.parquet_pieces(location)

    # the cache is named by the embedding space (reader and encoder), so that each split imports into it
    digest = hashlib.sha256(json.dumps({"source": source, "model": model}).encode()).hexdigest()[:8]
    model_dir = Path(cache_dir) / dataset / f"{model}__imported__{digest}"
    split_dir = model_dir / split
    guard.check_cache_folders(model_dir, [split], "import", overwrite)  # no links, nobody's files removed
    if cache.read_manifest(split_dir) is not None and not overwrite:
        raise VlmcacheError(f"'{split_dir}' exists already; pass --overwrite to import it again.")
    if (split_dir.exists() or split_dir.is_symlink()) and cache.read_manifest(split_dir) is None:
        # not a split vlmcache wrote (no manifest): --overwrite replaces splits, never someone's folder or file
        raise VlmcacheError(
            f"'{split_dir}' exists and is not a cache split (no {cache.MANIFEST}); move it away or import under "
            f"another --split."
        )
    others = {}
    for other in sorted(model_dir.glob("*/" + cache.MANIFEST)) if model_dir.is_dir() else []:
        if other.parent.name != split and (m := cache.read_manifest(other.parent)):
            others[other.parent.name] = m

    check = ingest.Validator(
        labels_by_path=by_path,
        labels_file=labels_file,
        root=Path(root).resolve() if root is not None else None,
    )
    made = [d for d in (model_dir.parent.parent, model_dir.parent, model_dir) if not d.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    # a new folder no one else owns (never made by removing what is there); hidden, so no listing takes it for a split
    staging = Path(tempfile.mkdtemp(prefix=f".import-{split}-{os.getpid()}.", dir=model_dir))
    try:
        stream = ingest.ShardStream(staging / split, shard_size)
        for piece in pieces:
            stream.add(*check.check(piece))
        if check.rows == 0:
            raise VlmcacheError(f"'{location}' holds no embeddings.")
        names = check.classnames(names, classnames_file)
        num_classes = len(names)
        origin = {"source": source, "location": str(location.resolve())}
        recorded = {
            "made_by": (made_by or {}).get("cache", "unknown"),
            "format": (made_by or {}).get("format", source),
            "unit_norm": check.unit_norm,
        }
        for name, m in others.items():
            if (m["dims"]["pooled"], m["fingerprint"]["num_classes"]) != (check.width, num_classes):
                raise VlmcacheError(
                    f"'{location}' holds embeddings of width {check.width} for {num_classes} classes; the cache's "
                    f"'{name}' split has width {m['dims']['pooled']} and {m['fingerprint']['num_classes']} "
                    f"classes. Import it under another --model, or give --classnames."
                )
            if m["fingerprint"].get("source") != recorded:
                raise VlmcacheError(
                    f"'{location}' comes from {describe_source(recorded)}; the cache's '{name}' split came from "
                    f"{describe_source(m['fingerprint'].get('source'))}. One cache holds one source's embeddings; "
                    f"import it under another --model (or import every split from one source)."
                )
        text = model_dir / text_cache.TEXT_FILE
        if others and text.is_file() and not overwrite and (classnames_file is not None or check.names):
            known = text_cache.read_text(text).classnames
            named = range(num_classes) if classnames_file is not None else sorted(check.names)
            differ = [y for y in named if y < len(known) and known[y] != names[y]]
            if differ:
                y = differ[0]
                raise VlmcacheError(
                    f"'{location}' names class {y} '{names[y]}'; the cache's class names ('{text}') name it "
                    f"'{known[y]}'. Splits of one cache share their class names; pass --overwrite to replace them."
                )
        fingerprint = {
            "dataset": dataset,
            "split": split,
            "num_classes": num_classes,
            "encoder": {"model": model, "pretrained": "imported", "imported_from": origin},
            "source": recorded,
            "imported": True,
        }
        stream.finish(fingerprint, f"import:{source}", check.width)
        if split_dir.exists():  # --overwrite: the old split goes only once the new one is complete
            old = staging / f"replaced-{split}"  # removed with the staging folder below, whatever is left
            split_dir.rename(old)
            (staging / split).rename(split_dir)
            guard.remove_split_files(old)  # its own files only: check_cache_folders refused a split holding more
        else:
            (staging / split).rename(split_dir)
        atomic.fsync_dir(model_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        for d in reversed(made):  # a refused import leaves no empty folders behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    if not text.is_file() or overwrite:
        text_cache.write_text(text, text_cache.TextCache({"imported_from": origin}, names, {}, 100.0))
    log(f"imported {check.rows:,} rows of width {check.width} ({num_classes} classes) into {split_dir}")
    return {"cache": str(model_dir), "split": split, "rows": check.rows, "dim": int(check.width)}
