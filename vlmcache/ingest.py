"""What `vlmcache import` reads, and the one validator every imported row passes before it is stored.

Each source (a clip-retrieval folder, a parquet file) is read as a stream of `Piece`s of at most PIECE_ROWS rows:
an npy file through a memory map, a parquet file batch by batch, so memory is bounded by a piece and a shard,
never by the input. `Validator.check` turns a piece into what the cache stores and refuses, naming the file and the
row, anything that would be stored wrong:

- embeddings: a 2-D numeric array or list column, width >= 1 and the same in every piece and file, finite *after*
  the cast to float16 (1e6 is finite as float32 and inf as float16; the cache stores float16);
- labels: integers >= 0 (a float such as 1.7, a string, a null or a bool is refused, not truncated), and their
  count obeys extract's class-count rule when no class names are given (`user_data.implied_classes_problem`);
- paths: strings without control characters, a relative one without `..` parts; with `root`, absolute paths are
  stored relative to it and a path outside it is refused;
- class names from the source's `class_name` column: one name per label.

Files are opened only after `os.stat` says they are regular files: a FIFO would block the open forever, a device
would be read without end.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from vlmcache import atomic, cache
from vlmcache.errors import VlmcacheError

PIECE_ROWS = 4096  # rows read, checked and converted at a time
PATH_COLUMNS = ("image_path", "path")  # clip-retrieval's name, then vlmcache's
EMBEDDING_COLUMNS = ("embedding", "pooled", "img_emb")
STORED = np.float16  # what a shard's `pooled` holds
PROVENANCE_KEY = b"vlmcache"  # parquet schema metadata a vlmcache export writes: which cache, which format
UNIT_NORM_TOL = 1e-2  # a float16 unit vector's norm is within about 1e-3 of 1


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (after links); anything else is refused before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise VlmcacheError(f"The {what} '{path}' cannot be read: {e.strerror or e}.") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise VlmcacheError(f"The {what} '{path}' is {kind}; give a regular file.")
    return path


def _why(e: Exception) -> str:
    """A library's exception as one line (pyarrow's and numpy's may span several)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # a dependency; only a broken install lacks it
        raise VlmcacheError("Parquet needs pyarrow: pip install pyarrow.") from None
    return pa, pq


@dataclass
class Piece:
    """Up to PIECE_ROWS rows as read, before any check. `first` is the first row's index within `where`."""

    emb: np.ndarray  # (n, D) any numeric dtype
    paths: list
    labels: object  # a pyarrow array, a numpy int array (from --labels), or None
    class_names: list | None
    where: str
    first: int


# --------------------------------------------------------------------------- readers


def numbered(folder: Path, prefix: str, suffix: str) -> list[Path]:
    """`prefix_{i}suffix` files in index order (img_emb_0.npy, ..., img_emb_10.npy; clip-retrieval zero-pads)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    found = sorted((int(m.group(1)), p) for p in folder.glob(f"{prefix}_*{suffix}") if (m := pattern.match(p.name)))
    for (a, pa_), (b, pb) in zip(found, found[1:], strict=False):
        if a == b:  # img_emb_2.npy beside img_emb_02.npy: two exports' files in one folder
            raise VlmcacheError(
                f"'{folder}' holds two files numbered {a} ('{pa_.name}', '{pb.name}'): files of two exports in one "
                f"folder? Import from a folder holding one export."
            )
    return [p for _, p in found]


def _read_parquet(path: Path, pq, **kw):
    try:
        # buffered reads of 1 MB, not a whole row group prefetched: memory stays flat for any row-group size
        return pq.ParquetFile(regular_file(path, "parquet file"), pre_buffer=False, buffer_size=1 << 20, **kw)
    except VlmcacheError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, and others for a file that is not parquet
        raise VlmcacheError(f"'{path}' is not a readable parquet file ({_why(e)}).") from None


def provenance(f) -> dict | None:
    """The `vlmcache` schema metadata a vlmcache export writes (None for files made elsewhere)."""
    meta = f.schema_arrow.metadata or {}
    if PROVENANCE_KEY not in meta:
        return None
    try:
        found = json.loads(meta[PROVENANCE_KEY])
    except (ValueError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) else None


def clip_retrieval_pieces(folder: Path) -> tuple[Iterator[Piece], dict | None]:
    """The pieces of a clip-retrieval folder (img_emb/img_emb_N.npy + metadata/metadata_N.parquet pairs), and the
    first metadata file's vlmcache provenance."""
    _, pq = _pyarrow()
    if not folder.is_dir():
        raise VlmcacheError(f"'{folder}' is not a folder; --from clip-retrieval reads an img_emb/ + metadata/ folder.")
    embs = numbered(folder / "img_emb", "img_emb", ".npy")
    metas = numbered(folder / "metadata", "metadata", ".parquet")
    if not embs:
        raise VlmcacheError(
            f"'{folder}' is not a clip-retrieval embedding folder: no img_emb/img_emb_N.npy files in it."
        )
    if [int(p.stem.split("_")[-1]) for p in embs] != [int(p.stem.split("_")[-1]) for p in metas]:
        raise VlmcacheError(
            f"'{folder}': img_emb/ and metadata/ do not pair up ({len(embs)} embedding files, {len(metas)} "
            f"metadata files); each img_emb_N.npy needs its metadata_N.parquet."
        )
    for p in [*embs, *metas]:
        regular_file(p, "embedding file" if p.suffix == ".npy" else "metadata file")
    origin = provenance(_read_parquet(metas[0], pq))

    def pieces() -> Iterator[Piece]:
        for emb_path, meta_path in zip(embs, metas, strict=True):
            try:
                emb = np.load(emb_path, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # numpy parses the header with ast: a damaged one raises SyntaxError too
                raise VlmcacheError(f"'{emb_path}' is not a readable .npy array ({_why(e)}).") from None
            if emb.ndim != 2 or emb.dtype.kind not in "fiu":
                raise VlmcacheError(
                    f"'{emb_path}' holds a {emb.dtype} array of shape {emb.shape}; embeddings are a 2-D array of "
                    f"numbers (rows, width)."
                )
            meta = _read_parquet(meta_path, pq)
            names = meta.schema_arrow.names
            path_col = next((c for c in PATH_COLUMNS if c in names), None)
            if path_col is None:
                raise VlmcacheError(
                    f"'{meta_path}' has no image path column ({' or '.join(PATH_COLUMNS)}); columns: "
                    f"{', '.join(names)}."
                )
            if len(emb) != meta.metadata.num_rows:
                raise VlmcacheError(
                    f"'{emb_path}' holds {len(emb)} rows; its metadata '{meta_path.name}' has "
                    f"{meta.metadata.num_rows}: each embedding row needs its metadata row."
                )
            columns = [c for c in (path_col, "label", "class_name") if c in names]
            at = 0
            batches = meta.iter_batches(batch_size=PIECE_ROWS, columns=columns)
            while True:
                try:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    n = batch.num_rows
                    piece = Piece(
                        np.asarray(emb[at : at + n]),
                        _column(batch, path_col),
                        batch.column(batch.schema.get_field_index("label")) if "label" in columns else None,
                        _column(batch, "class_name") if "class_name" in columns else None,
                        f"'{emb_path}'",
                        at,
                    )
                except Exception as e:  # a damaged page in the metadata, or embeddings cut short on disk
                    raise VlmcacheError(f"'{meta_path}', after row {at}: unreadable ({_why(e)}).") from None
                yield piece
                at += n

    return pieces(), origin


def _column(batch, name: str) -> list:
    return batch.column(batch.schema.get_field_index(name)).to_pylist()


def parquet_pieces(path: Path) -> tuple[Iterator[Piece], dict | None]:
    """The pieces of a parquet file of path, label and embedding (a list column), and its vlmcache provenance."""
    pa, pq = _pyarrow()
    import pyarrow.compute as pc

    f = _read_parquet(path, pq)
    schema = f.schema_arrow
    names = schema.names
    path_col = next((c for c in PATH_COLUMNS if c in names), None)
    emb_col = next((c for c in EMBEDDING_COLUMNS if c in names), None)
    if path_col is None or emb_col is None:
        raise VlmcacheError(
            f"'{path}' needs a path column ({' or '.join(PATH_COLUMNS)}) and an embedding column "
            f"({' or '.join(EMBEDDING_COLUMNS)}); it has: {', '.join(names)}."
        )
    t = schema.field(emb_col).type
    if not (
        (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))
        and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))
    ):
        raise VlmcacheError(f"'{path}': the embedding column '{emb_col}' is of type {t}; it must be a list of numbers.")

    def pieces() -> Iterator[Piece]:
        columns = [c for c in (path_col, emb_col, "label", "class_name") if c in names]
        at = 0
        try:
            batches = f.iter_batches(batch_size=PIECE_ROWS, columns=columns)
            for batch in batches:
                n = batch.num_rows
                emb = batch.column(batch.schema.get_field_index(emb_col))
                if emb.null_count:
                    bad = at + int(np.flatnonzero(emb.is_null().to_numpy(zero_copy_only=False))[0])
                    raise VlmcacheError(f"'{path}', row {bad}: the embedding is null.")
                lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
                if n and (lengths != lengths[0]).any():
                    bad = at + int(np.flatnonzero(lengths != lengths[0])[0])
                    raise VlmcacheError(
                        f"'{path}', row {bad}: an embedding of width {lengths[bad - at]}, where row {at} has "
                        f"{lengths[0]}; every embedding must have the same width."
                    )
                width = int(lengths[0]) if n else 0
                flat = pc.list_flatten(emb).to_numpy(zero_copy_only=False)
                yield Piece(
                    flat.reshape(n, width),
                    _column(batch, path_col),
                    batch.column(batch.schema.get_field_index("label")) if "label" in columns else None,
                    _column(batch, "class_name") if "class_name" in columns else None,
                    f"'{path}'",
                    at,
                )
                at += n
        except VlmcacheError:
            raise
        except Exception as e:  # a damaged page or an undecodable column, found while reading
            raise VlmcacheError(f"'{path}', after row {at}: unreadable ({_why(e)}).") from None

    return pieces(), provenance(f)


# --------------------------------------------------------------------------- the validator


@dataclass
class Validator:
    """Checks pieces one by one and keeps what must hold across them (width, labels seen, class names).

    `labels_by_path` (from --labels) replaces the source's label column; `root` makes absolute paths relative."""

    labels_by_path: dict | None = None
    labels_file: Path | None = None
    root: Path | None = None
    width: int | None = None
    rows: int = 0
    top: tuple[int, str] = (-1, "")  # the largest label and where it is (for the class-count error)
    seen: set = field(default_factory=set)
    names: dict = field(default_factory=dict)  # label -> class name, from the class_name column
    unit_norm: bool = True

    def check(self, p: Piece) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(pooled as stored, int64 labels, paths as stored) for one piece, or a VlmcacheError naming the row."""
        n = len(p.emb)
        if p.emb.ndim != 2 or p.emb.shape[1] < 1:
            raise VlmcacheError(f"{p.where}: embeddings of width {p.emb.shape[1:]}, not at least 1.")
        if self.width is None:
            self.width = p.emb.shape[1]
        elif p.emb.shape[1] != self.width:
            raise VlmcacheError(
                f"{p.where}, row {p.first}: embeddings of width {p.emb.shape[1]}, where earlier rows have "
                f"{self.width}; every embedding must have the same width."
            )
        with np.errstate(over="ignore", invalid="ignore"):
            stored = p.emb.astype(STORED)
            finite = np.isfinite(stored).all(axis=1)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            row = np.asarray(p.emb[i], dtype=np.float64)
            if np.isfinite(row).all():
                value = row[np.argmax(np.abs(row))]
                why = f"the value {value:g} is beyond float16's range (+-65504), the type the cache stores"
            else:
                why = "the embedding holds NaN or inf"
            raise VlmcacheError(f"{p.where}, row {p.first + i}: {why}.")
        norms = np.linalg.norm(stored.astype(np.float32), axis=1)
        self.unit_norm = self.unit_norm and bool(n == 0 or (np.abs(norms - 1) < UNIT_NORM_TOL).all())
        paths = self._paths(p)
        labels = self._labels(p, paths)
        if p.class_names is not None:
            self._class_names(p, labels)
        if n:
            i = int(labels.argmax())
            if labels[i] > self.top[0]:
                self.top = (int(labels[i]), f"{p.where}, row {p.first + i}")
            self.seen.update(np.unique(labels).tolist())
        self.rows += n
        return stored, labels, paths

    def _paths(self, p: Piece) -> list[str]:
        out = []
        for i, path in enumerate(p.paths):
            if path is None:
                out.append("")
                continue
            if not isinstance(path, str):
                raise VlmcacheError(f"{p.where}, row {p.first + i}: the image path {path!r} is not text.")
            if any(ord(c) < 32 or ord(c) == 127 for c in path):
                raise VlmcacheError(f"{p.where}, row {p.first + i}: the image path {path!r} holds control characters.")
            if not os.path.isabs(path) and ".." in PurePosixPath(path.replace("\\", "/")).parts:
                raise VlmcacheError(
                    f"{p.where}, row {p.first + i}: the image path '{path}' contains '..'; a relative path stays "
                    f"under its root."
                )
            if self.root is not None and os.path.isabs(path):
                rel = os.path.relpath(path, self.root)
                if rel == ".." or rel.startswith(".." + os.sep):
                    raise VlmcacheError(
                        f"{p.where}, row {p.first + i}: the image path '{path}' is not under --root '{self.root}'."
                    )
                path = rel
            out.append(path)
        return out

    def _labels(self, p: Piece, paths: list[str]) -> np.ndarray:
        if self.labels_by_path is not None:
            out = np.empty(len(paths), np.int64)
            for i, (given, stored) in enumerate(zip(p.paths, paths, strict=True)):
                label = self.labels_by_path.get(stored, self.labels_by_path.get(given))
                if label is None:
                    raise VlmcacheError(
                        f"{p.where}, row {p.first + i}: the image path '{stored}' has no label in "
                        f"'{self.labels_file}' (`path label` per line, paths as the embeddings' metadata names them)."
                    )
                out[i] = label
            return out
        if p.labels is None:
            raise VlmcacheError(f"{p.where}: no label column; give the labels with --labels FILE (`path label` lines).")
        return integer_labels(p.labels, p.where, p.first)

    def _class_names(self, p: Piece, labels: np.ndarray) -> None:
        for i, (y, name) in enumerate(zip(labels.tolist(), p.class_names, strict=True)):
            if name is None:
                continue
            if not isinstance(name, str):
                raise VlmcacheError(f"{p.where}, row {p.first + i}: the class_name {name!r} is not text.")
            known = self.names.setdefault(y, name)
            if known != name:
                raise VlmcacheError(
                    f"{p.where}, row {p.first + i}: class {y} is named '{name}' here and '{known}' in an earlier row."
                )

    def classnames(self, given: list[str] | None, given_file: Path | None) -> list[str]:
        """The class names to store: --classnames, else the source's class_name column, else `class N`; the
        class count obeys extract's rule when the names do not come from a file."""
        from vlmcache.user_data import implied_classes_problem

        top, where = self.top
        if given is not None:
            if top >= len(given):
                raise VlmcacheError(
                    f"{where}: the label {top} is beyond the {len(given)} class names of '{given_file}'."
                )
            for y, name in self.names.items():
                if given[y] != name:
                    raise VlmcacheError(
                        f"The source names class {y} '{name}'; line {y + 1} of '{given_file}' names it '{given[y]}'."
                    )
            return given
        problem = implied_classes_problem(top, len(self.seen))
        if problem:
            raise VlmcacheError(
                f"{where}: {problem}. Fix the label, or pass --classnames FILE naming every class (one per line)."
            )
        return [self.names.get(i, f"class {i}") for i in range(top + 1)]


def integer_labels(column, where: str, first: int) -> np.ndarray:
    """A pyarrow label column as int64; floats that are not whole numbers, strings, bools and nulls are refused
    naming the row (they would otherwise be truncated or cast into a wrong class)."""
    import pyarrow as pa

    if column.null_count:
        i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise VlmcacheError(f"{where}, row {first + i}: the label is null; every row needs a class index.")
    t = column.type
    if pa.types.is_integer(t):
        values = column.to_numpy(zero_copy_only=False)
    elif pa.types.is_floating(t):
        raw = column.to_numpy(zero_copy_only=False).astype(np.float64)
        whole = np.isfinite(raw) & (raw == np.round(raw))
        if not whole.all():
            i = int(np.flatnonzero(~whole)[0])
            raise VlmcacheError(
                f"{where}, row {first + i}: the label {float(raw[i])!r} is not a whole number; labels are class "
                "indices."
            )
        values = raw
    else:
        sample = column[0].as_py() if len(column) else None
        raise VlmcacheError(
            f"{where}, row {first}: the label {sample!r} is of type {t}; labels are class indices 0, 1, 2, ..."
        )
    from vlmcache.splits import MAX_CLASSES

    bad = (values < 0) | (values >= MAX_CLASSES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise VlmcacheError(
            f"{where}, row {first + i}: the label {values[i]:g} is out of range (valid: 0..{MAX_CLASSES - 1})."
        )
    return values.astype(np.int64)


# --------------------------------------------------------------------------- the stream of shards


class ShardStream:
    """Rows in, shards out: buffers at most `shard_size` rows, writes each full shard with `cache.write_shard`
    (the one write path), and writes the manifest when finished."""

    def __init__(self, split_dir: Path, shard_size: int):
        self.dir, self.size = split_dir, shard_size
        self.dir.mkdir(parents=True)
        self.buf: list[tuple[np.ndarray, np.ndarray, list[str]]] = []
        self.buffered = 0
        self.entries: list[dict] = []
        self.rows = 0

    def add(self, pooled: np.ndarray, labels: np.ndarray, paths: list[str]) -> None:
        at = 0
        while at < len(labels):
            take = min(self.size - self.buffered, len(labels) - at)
            self.buf.append((pooled[at : at + take], labels[at : at + take], paths[at : at + take]))
            self.buffered += take
            at += take
            if self.buffered == self.size:
                self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        lo, hi = self.rows, self.rows + self.buffered
        arrays = {
            "rows": np.arange(lo, hi),
            "labels": np.concatenate([b[1] for b in self.buf]),
            "pooled": np.concatenate([b[0] for b in self.buf]),
            "paths": cache.encode_paths([p for b in self.buf for p in b[2]]),
        }
        i = len(self.entries)
        entry = cache.write_shard(self.dir / cache.shard_name(i), arrays, {})
        entry.update(index=i, start=lo, stop=hi, rows=hi - lo, skipped=[])
        self.entries.append(entry)
        self.rows, self.buf, self.buffered = hi, [], 0

    def finish(self, fingerprint: dict, origin: str, width: int) -> None:
        self._flush()
        manifest = {
            "format": cache.FORMAT,
            "fingerprint": {**fingerprint, "tokens": False, "shard_size": self.size},
            "origin": origin,
            "n_rows": self.rows,
            "n_shards": len(self.entries),
            "complete": True,
            "dims": {"pooled": width, "tokens": None},
            "shards": self.entries,
        }
        atomic.write_json_atomic(self.dir / cache.MANIFEST, manifest)
