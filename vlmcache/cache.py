"""The HDF5 feature cache: atomic shards, a manifest per split, lazy readers, verification and listing.

Layout: `<cache_dir>/<dataset>/<key>/<split>/shard-00000.h5 ... + manifest.json`, and
`<cache_dir>/<dataset>/<key>/text.h5` for class-text embeddings. The key names the encoder
(model, weight source, short hash of everything that changes its numbers). Each split's manifest
holds the full fingerprint (encoder plus split definition and options), the shards with their row
ranges, byte sizes and sha256, and the skipped images. A file the manifest does not list does not
exist, so a killed run never leaves anything a reader would count.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmcache import faults, guard, schemas
from vlmcache.errors import VlmcacheError

MANIFEST = "manifest.json"
TEXT_FILE = "text.h5"
FORMAT = 1
TMP_MARK = guard.TMP_MARK  # temporary files are `<final name>.tmp-<pid>`; the name rule refuses the mark


# --------------------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def tmp_name(final: Path) -> Path:
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file visible under its final name, durably."""
    _fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_bytes_atomic(
    path: Path, data: bytes | memoryview, fault: str | None = None, drop_cache: bool = False
) -> None:
    """The one write path: a temporary name, fsync, rename, fsync the folder. A full disk is one clear error
    and leaves the previous version (or nothing) in place, never a half-written file under the final name.

    `drop_cache` (shards): once the file is durable its pages leave the page cache (fadvise DONTNEED), as bulk
    writers do. An extraction writes gigabytes it will not read again; kept, they fill memory, and every write then
    needs fresh pages: on this project's VMs a 135 MB shard's write() took 0.30 s of CPU from the third shard on,
    against 0.024 s with the pages dropped (each fresh page is a fault on the host)."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if fault:
            faults.hit(fault)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise VlmcacheError(
            f"Could not write '{path}': {e}. Is the disk full? Nothing was published and the temporary file is "
            f"removed; free space and run the same command again."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def save_torch_atomic(obj, path: Path) -> None:
    """`torch.save` through a temporary name (streamed, not built in memory: tuned towers are large)."""
    import torch

    tmp = tmp_name(path)
    try:
        torch.save(obj, tmp)
        publish(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        raise VlmcacheError(f"Could not write '{path}': {e}. Is the disk full? The previous version is kept.") from None
    finally:
        tmp.unlink(missing_ok=True)


class MemoryFile:
    """A binary file in memory for h5py's `fileobj` driver: HDF5 writes its chunks straight into one numpy buffer,
    whose bytes are then hashed and written as they lie. HDF5's own in-memory (core) driver grows its image in
    small steps and hands it out only as a copy (`get_file_image`), both on fresh 4 KB pages; this buffer is
    allocated once at its expected size (numpy asks the kernel for huge pages for large arrays). For a 135 MB
    shard of tokens that is 0.10 s of CPU in all (build, fletcher32 and SHA-256) against 0.22 s. The datasets,
    chunks and checksums are the same; the layout differs a little (this driver does not gather metadata into
    blocks), so the bytes are not HDF5's core driver's."""

    def __init__(self, expected: int = 1 << 20):
        self.buf = np.empty(max(expected, 1 << 12), np.uint8)
        self.pos = self.size = 0

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = pos + (0, self.pos, self.size)[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _extend(self, end: int) -> None:
        """Make the file at least `end` bytes long; bytes never written read as zeros, as in a file."""
        if end > len(self.buf):
            grown = np.empty(max(end, 2 * len(self.buf)), np.uint8)
            grown[: self.size] = self.buf[: self.size]
            self.buf = grown
        if end > self.size:
            self.buf[self.size : end] = 0
            self.size = end

    def write(self, data) -> int:
        data = np.frombuffer(data, np.uint8)
        start, end = self.pos, self.pos + len(data)
        self._extend(end)
        self.buf[start:end] = data
        self.pos = end
        return len(data)

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        out = self.buf[self.pos : end].tobytes()
        self.pos = max(self.pos, end)
        return out

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self._extend(size)
        self.size = size
        return size

    def flush(self) -> None:
        pass

    def view(self) -> memoryview:
        return memoryview(self.buf[: self.size])


def h5_image(build, expected: int = 1 << 20) -> memoryview:
    """An HDF5 file built in memory by `build(f)`, as its bytes (a `MemoryFile` of about `expected` bytes): written
    with plain file I/O, a full disk is then an ordinary OSError, never a failure inside HDF5's own close, which
    can take the process down."""
    image = MemoryFile(expected)
    with h5py.File(image, "w") as f:
        build(f)
    return image.view()


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete temporary files left by processes that no longer run (a killed extraction)."""
    removed = []
    for p in folder.glob(f"*{TMP_MARK}*"):
        pid = p.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def shard_image(final: Path, arrays: dict[str, np.ndarray | list[np.ndarray]], attrs: dict) -> tuple[memoryview, dict]:
    """One shard's HDF5 file as bytes, and its manifest entry fields (file, bytes, sha256). A dataset may be given
    as a list of parts (its rows in order, e.g. extraction's batches): each is written into its rows, with no
    concatenated copy of the whole.

    Every dataset is chunked with HDF5's fletcher32 checksum, so a corrupted chunk fails when it is read
    instead of passing silently into training.
    """

    def build(f: h5py.File) -> None:
        for name, arr in arrays.items():
            parts = arr if isinstance(arr, list) else [arr]
            shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
            # Tokens are read in contiguous row slices; one row (one view of a row) per chunk keeps any slice cheap.
            chunks = {
                "tokens": (1, *shape[1:]), "view_tokens": (1, 1, *shape[2:]),
                "prefix": (1, *shape[1:]), "view_prefix": (1, 1, *shape[2:]),
            }.get(name, True)  # fmt: skip
            if len(parts) == 1:
                f.create_dataset(name, data=parts[0], chunks=chunks if shape[0] else None, fletcher32=shape[0] > 0)
                continue
            dset = f.create_dataset(name, shape, parts[0].dtype, chunks=chunks, fletcher32=True)
            at = 0
            for part in parts:
                dset[at : at + len(part)] = part
                at += len(part)
        for k, v in attrs.items():
            f.attrs[k] = v

    data = sum(p.nbytes for arr in arrays.values() for p in (arr if isinstance(arr, list) else [arr]))
    image = h5_image(build, expected=data + data // 64 + (1 << 20))  # the data, its chunk index and metadata
    return image, {"file": final.name, "bytes": len(image), "sha256": hashlib.sha256(image).hexdigest()}


def write_shard(final: Path, arrays: dict[str, np.ndarray], attrs: dict) -> dict:
    """Write one shard atomically (`write_bytes_atomic`). Returns its manifest entry fields."""
    image, entry = shard_image(final, arrays, attrs)
    write_bytes_atomic(final, image, fault="shard_written", drop_cache=True)
    return entry


def encode_paths(paths: list[str]) -> np.ndarray:
    """Image paths as a shard stores them: fixed-length UTF-8 bytes (so HDF5's checksum covers them too)."""
    encoded = [p.encode("utf-8") for p in paths]
    return np.array(encoded, dtype=f"S{max([len(e) for e in encoded], default=0) or 1}")


def decode_paths(arr: np.ndarray) -> list[str]:
    return [bytes(b).decode("utf-8") for b in arr]


def write_arrays(
    split_dir: Path,
    pooled: np.ndarray,
    labels: np.ndarray,
    fingerprint: dict,
    tokens: np.ndarray | None = None,
    shard_size: int = 1024,
    origin: str = "arrays",
    paths: list[str] | None = None,
) -> Path:
    """A complete split written from in-memory arrays, in the same format extraction writes (synthetic
    caches for tests and benchmarks). `fingerprint` must hold at least num_classes."""
    split_dir.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    manifest = {
        "format": FORMAT,
        "fingerprint": {**fingerprint, "tokens": tokens is not None},
        "origin": origin,
        "n_rows": n,
        "n_shards": -(-n // shard_size),
        "complete": True,
        "dims": {"pooled": pooled.shape[1], "tokens": list(tokens.shape[1:]) if tokens is not None else None},
        "shards": [],
    }
    for i, lo in enumerate(range(0, n, shard_size)):
        hi = min(lo + shard_size, n)
        arrays = {"rows": np.arange(lo, hi), "labels": labels[lo:hi], "pooled": pooled[lo:hi].astype(np.float16)}
        if tokens is not None:
            arrays["tokens"] = tokens[lo:hi].astype(np.float16)
        if paths is not None:
            arrays["paths"] = encode_paths(paths[lo:hi])
        entry = write_shard(split_dir / shard_name(i), arrays, {})
        entry.update(index=i, start=lo, stop=hi, rows=hi - lo, skipped=[])
        manifest["shards"].append(entry)
    write_json_atomic(split_dir / MANIFEST, manifest)
    return split_dir


def open_h5(path: Path) -> h5py.File:
    """Read-only, without HDF5 file locking: readers never block each other or a writer's rename."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise VlmcacheError(
            f"The cache file '{path}' cannot be read as HDF5 ({e}); run `vlmcache cache verify`."
        ) from None


# --------------------------------------------------------------------------- manifest


def read_manifest(split_dir: Path) -> dict | None:
    path = split_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VlmcacheError(f"The manifest '{path}' is not valid JSON ({e}); re-extract with --overwrite.") from None
    return schemas.check_manifest(manifest, path)


def fingerprint_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ, e.g. ['encoder.precision', 'tokens']."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def describe_diff(old: dict, new: dict) -> str:
    parts = []
    for name in fingerprint_diff(old, new):
        a, b = old, new
        for part in name.split("."):
            a, b = (a or {}).get(part), (b or {}).get(part)
        parts.append(f"{name}: {a!r} -> {b!r}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- readers


@dataclass
class ShardRef:
    path: Path
    start: int  # first row of this shard in the split's concatenated order (after skips)
    rows: int


class SplitCache:
    """A finished split of the cache. Pickles without open files; each process opens its own."""

    def __init__(self, split_dir: str | os.PathLike):
        self.dir = Path(split_dir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise VlmcacheError(f"No cache at '{self.dir}' ({MANIFEST} is missing); run `vlmcache extract` first.")
        done = len(manifest["shards"])
        if not manifest.get("complete"):
            raise VlmcacheError(
                f"The cache '{self.dir}' is incomplete ({done} of {manifest['n_shards']} shards); "
                f"run the same `vlmcache extract` command again to resume."
            )
        if not any(e["rows"] for e in manifest["shards"]):
            raise VlmcacheError(f"The cache '{self.dir}' holds no rows: {empty_reason(manifest)}")
        self.manifest = manifest
        self.shards: list[ShardRef] = []
        start = 0
        for entry in sorted(manifest["shards"], key=lambda e: e["start"]):
            self.shards.append(ShardRef(self.dir / entry["file"], start, entry["rows"]))
            start += entry["rows"]
        self.n = start
        self._starts = np.asarray([s.start for s in self.shards], dtype=np.int64)
        self._files: dict[int, h5py.File] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __len__(self) -> int:
        return self.n

    def _file(self, i: int) -> h5py.File:
        f = self._files.get(i)
        if f is None:
            path = self.shards[i].path
            if not path.is_file():
                raise VlmcacheError(
                    f"The shard '{path}' listed in the manifest is missing; run `vlmcache cache verify`."
                )
            f = open_h5(path)
            problem = shard_content_problem(f, self.shards[i].rows)
            if problem:
                f.close()
                raise VlmcacheError(
                    f"The shard '{path}' does not match its manifest: {problem}. Run `vlmcache cache verify`."
                )
            self._files[i] = f
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    def _read(self, i: int, name: str, rows: slice = slice(None)) -> np.ndarray:
        try:
            return self._file(i)[name][rows]
        except (OSError, KeyError) as e:  # fletcher32 mismatch, truncated file, missing dataset
            raise VlmcacheError(
                f"The shard '{self.shards[i].path}' cannot be read ({e}); it is damaged. Run "
                f"`vlmcache cache verify --repair {self.dir.parent}` to extract it again."
            ) from None

    def _read_into(self, i: int, name: str, rows: slice, out: np.ndarray) -> None:
        try:
            dset = self._file(i)[name]
            if dset.shape[1:] != out.shape[1:] or dset.dtype != out.dtype:
                raise KeyError(f"'{name}' is {dset.dtype} {dset.shape}, not {out.dtype} (n, {out.shape[1:]})")
            dset.read_direct(out, np.s_[rows], np.s_[0 : len(out)])
        except (OSError, KeyError) as e:  # as _read's
            raise VlmcacheError(
                f"The shard '{self.shards[i].path}' cannot be read ({e}); it is damaged. Run "
                f"`vlmcache cache verify --repair {self.dir.parent}` to extract it again."
            ) from None

    def load(self, name: str, dtype=None) -> np.ndarray:
        """One dataset of every shard in row order (for pooled, labels, rows, views), as `dtype` when given. The
        result is allocated once and each shard converted into its rows as it is read: the peak is the result
        and one shard, not the shards, their concatenation and a converted copy (an iNaturalist-sized pooled
        cache read as float32 peaked at twice its size before)."""
        if not self.shards:
            return np.zeros((0,))
        first = self._file(0)[name]
        out = np.empty((self.n, *first.shape[1:]), dtype=dtype or first.dtype)
        for i, s in enumerate(self.shards):
            part = self._read(i, name)
            if part.shape != (s.rows, *first.shape[1:]):
                raise VlmcacheError(
                    f"The shard '{s.path}' holds '{name}' of shape {part.shape}, not {(s.rows, *first.shape[1:])} "
                    f"as the split's first shard does; run `vlmcache cache verify`."
                )
            out[s.start : s.start + s.rows] = part
        return out

    def pooled(self) -> np.ndarray:
        return self.load("pooled")

    def labels(self) -> np.ndarray:
        return self.load("labels")

    def rows(self) -> np.ndarray:
        return self.load("rows")

    def has_paths(self) -> bool:
        """Whether every shard stores its rows' image paths (caches written before paths were stored do not)."""
        return all("paths" in self._file(i) for i in range(len(self.shards)))

    def shard_paths(self, i: int) -> list[str]:
        """Shard i's rows' image paths, relative to the root the images were read from."""
        return decode_paths(self._read(i, "paths"))

    def paths(self) -> list[str] | None:
        """Every row's image path in row order, or None for a cache without them."""
        if not self.has_paths():
            return None
        return [p for i in range(len(self.shards)) for p in self.shard_paths(i)]

    def token_shape(self) -> tuple[int, int]:
        if not self.fingerprint.get("tokens"):
            raise VlmcacheError(
                f"The cache '{self.dir}' holds no tokens; extract again with --tokens (and --overwrite) "
                f"for the decoder head."
            )
        return tuple(self.manifest["dims"]["tokens"])

    def prefix_shape(self) -> tuple[int, int]:
        """(T, W) of the prefix: the residual stream entering the tower's last `tail_blocks` blocks."""
        if not self.fingerprint.get("tail_blocks"):
            raise VlmcacheError(
                f"The cache '{self.dir}' holds no prefix for tail tuning; extract again with --tail-blocks K "
                f"(and --overwrite, or another --cache-dir)."
            )
        return tuple(self.manifest["dims"]["prefix"])

    def read_tokens(self, start: int, stop: int, name: str = "tokens", out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of `tokens` as one (n, T, W) float16 array (`view_tokens`: (n, K, T, W)), read slice
        by slice across shards; into `out[: stop - start]` when given (a buffer read into again and again is not
        page-faulted in afresh, as a new array of many MB is)."""
        shape = self.prefix_shape() if name in ("prefix", "view_prefix") else self.token_shape()
        if name == "view_prefix":
            if not self.fingerprint.get("view_prefix"):
                raise VlmcacheError(
                    f"The cache '{self.dir}' holds no prefix of augmented views; extract with --tail-blocks K "
                    f"--views V."
                )
            shape = (int(self.fingerprint["views"]), *shape)
        if name == "view_tokens":
            if not self.fingerprint.get("view_tokens"):
                raise VlmcacheError(
                    f"The cache '{self.dir}' holds no tokens of augmented views; extract with --tokens --views K."
                )
            shape = (int(self.fingerprint["views"]), *shape)
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"token rows [{start}, {stop}) outside [0, {self.n})")
        if out is not None:
            if out.dtype != np.float16 or out.shape[1:] != shape or len(out) < stop - start:
                raise ValueError(f"out must be float16 of shape (>= {stop - start}, {shape}), not {out.shape}")
            out = out[: stop - start]
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        for i in range(max(first, 0), len(self.shards)):
            s = self.shards[i]
            if s.start >= stop:
                break
            lo, hi = max(start, s.start) - s.start, min(stop, s.start + s.rows) - s.start
            if hi > lo and out is not None:
                self._read_into(i, name, slice(lo, hi), out[s.start + lo - start : s.start + hi - start])
            elif hi > lo:
                parts.append(self._read(i, name, slice(lo, hi)))
        if out is not None:
            return out
        if not parts:
            return np.zeros((0, *shape), dtype=np.float16)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def empty_reason(manifest: dict) -> str:
    """Why a split has no rows, for the error that says so."""
    skipped = [x for e in manifest["shards"] for x in e["skipped"]]
    if not skipped:
        return "its split definition has no images."
    reasons = "; ".join(f"{x['path']}: {x['reason']}" for x in skipped[:3])
    return f"all {len(skipped)} images were skipped as unreadable (for example {reasons})."


def shard_content_problem(f: h5py.File, rows: int) -> str | None:
    """What in an open shard disagrees with its manifest entry's row count (None when nothing)."""
    for name in ("rows", "labels", "pooled"):
        if name not in f:
            return f"it has no '{name}' dataset"
    lengths = {name: f[name].shape[0] for name in f if isinstance(f[name], h5py.Dataset) and f[name].shape}
    wrong = {k: v for k, v in lengths.items() if v != rows}
    if wrong:
        return f"the manifest lists {rows} rows, the file holds {wrong}"
    return None


def damaged_shards(split_dir: Path, manifest: dict) -> dict[str, str]:
    """{shard file: what is wrong} for every listed shard that is missing, resized or re-hashed differently."""
    out = {}
    for entry in manifest["shards"]:
        path = split_dir / entry["file"]
        if not path.is_file():
            out[entry["file"]] = "missing"
        elif path.stat().st_size != entry["bytes"]:
            out[entry["file"]] = f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        elif sha256_file(path) != entry["sha256"]:
            out[entry["file"]] = "sha256 differs from the manifest (the file changed after it was written)"
        else:
            try:
                with open_h5(path) as f:
                    problem = shard_content_problem(f, entry["rows"])
            except VlmcacheError as e:
                problem = str(e)
            if problem:
                out[entry["file"]] = problem
    return out


def verify_split(split_dir: Path) -> list[str]:
    """Re-hash every shard the manifest lists; return one line per problem (empty when all is well)."""
    try:
        manifest = read_manifest(split_dir)
    except VlmcacheError as e:
        return [str(e)]
    if manifest is None:
        return [f"{split_dir}: no {MANIFEST}"]
    problems = [f"{split_dir / name}: {why}" for name, why in damaged_shards(split_dir, manifest).items()]
    if not manifest.get("complete"):
        problems.append(f"{split_dir}: incomplete, {len(manifest['shards'])} of {manifest['n_shards']} shards")
    return problems


def verify_text(model_dir: Path) -> list[str]:
    """text.h5 checked as `read_text` checks it when a run opens it (schema, shapes, finite embeddings, a positive
    logit scale), and its class names against every split's class count; one line per problem. The file records
    no sha256 of its own: its schema, and the HDF5 parse that a changed byte in its structure fails, are what is
    checked."""
    path = model_dir / TEXT_FILE
    splits = sorted(p for p in model_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    if not path.exists():
        return [f"{path}: missing (class names and zero-shot texts are read from it)"] if splits else []
    try:
        text = read_text(path)
    except VlmcacheError as e:
        return [f"{path}: {e}"]
    problems = []
    for split_dir in splits:
        try:
            manifest = read_manifest(split_dir)
        except VlmcacheError:
            continue  # verify_split names it
        classes = manifest["fingerprint"]["num_classes"]
        if classes != len(text.classnames):
            problems.append(
                f"{path}: {len(text.classnames)} class names, the split '{split_dir.name}' has {classes} classes"
            )
    return problems


# --------------------------------------------------------------------------- text embeddings


@dataclass
class TextCache:
    fingerprint: dict
    classnames: list[str]
    sets: dict[str, tuple[list[str], np.ndarray]]  # name -> (templates, (C, D) float32 unit-norm embeddings)
    logit_scale: float  # the model's exp(logit_scale): zero-shot logits are logit_scale * cos(image, text)


def write_text(path: Path, text: TextCache) -> None:
    """Write text.h5 atomically: one group per template set with its templates and (C, D) embeddings."""

    def build(f: h5py.File) -> None:
        f.attrs["fingerprint"] = json.dumps(text.fingerprint)
        f.attrs["logit_scale"] = text.logit_scale
        f.create_dataset("classnames", data=np.array(text.classnames, dtype=h5py.string_dtype()))
        for name, (templates, emb) in text.sets.items():
            g = f.create_group(name)
            # fletcher32, as shards have: a changed byte in the embeddings fails the read (and `cache verify`)
            g.create_dataset("embeddings", data=emb.astype(np.float32), fletcher32=emb.size > 0)
            g.create_dataset("templates", data=np.array(templates, dtype=h5py.string_dtype()))

    embeddings = sum(len(emb) * emb.shape[-1] * 4 for _, emb in text.sets.values())
    write_bytes_atomic(path, h5_image(build, expected=embeddings + (1 << 20)))


def text_sets(path: Path) -> list[str]:
    """The template sets whose class-text embeddings text.h5 holds (none when it is missing or unreadable, or
    holds class names only, as an imported cache's does)."""
    if not path.is_file():
        return []
    try:
        with open_h5(path) as f:
            return sorted(name for name, g in f.items() if isinstance(g, h5py.Group))
    except (VlmcacheError, OSError):
        return []


def read_text(path: Path) -> TextCache:
    """text.h5, checked: class names are strings, each set's embeddings a finite (classes, D) array with one row
    per class name, the logit scale positive and finite."""
    if not path.is_file():
        raise VlmcacheError(f"No class-text embeddings at '{path}'; run `vlmcache extract` first.")

    def strings(ds) -> list[str]:
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "OSU":
            raise ValueError(f"'{ds.name}' is not a list of strings")
        return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]

    with open_h5(path) as f:
        if "logit_scale" not in f.attrs or "fingerprint" not in f.attrs:
            raise VlmcacheError(
                f"'{path}' was written by an older vlmcache; extract again with --overwrite to rewrite it."
            )
        try:
            fingerprint = json.loads(f.attrs["fingerprint"])
            logit_scale = float(f.attrs["logit_scale"])
            classnames = strings(f["classnames"])
            sets = {}
            for name, g in f.items():
                if not isinstance(g, h5py.Group):
                    continue
                emb = g["embeddings"][()]
                if emb.ndim != 2 or emb.shape[0] != len(classnames) or emb.dtype.kind != "f":
                    raise ValueError(f"{name}/embeddings has shape {emb.shape}, not ({len(classnames)}, D)")
                if not np.isfinite(emb).all():
                    raise ValueError(f"{name}/embeddings holds NaN or inf")
                sets[name] = (strings(g["templates"]), emb)
        except (KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
            raise VlmcacheError(
                f"'{path}' is not a valid class-text file ({e}); extract again with --overwrite to rewrite it."
            ) from None
    imported = isinstance(fingerprint, dict) and "imported_from" in fingerprint  # class names only: no texts
    if (
        not isinstance(fingerprint, dict)
        or not (np.isfinite(logit_scale) and logit_scale > 0)
        or not (sets or imported)
    ):
        raise VlmcacheError(f"'{path}' is not a valid class-text file (fingerprint, logit_scale or template sets).")
    return TextCache(fingerprint, classnames, sets, logit_scale)


# --------------------------------------------------------------------------- listing


KEY_RE = re.compile(r"^(?P<model>.+?)__(?P<source>.+)__(?P<hash>[0-9a-f]{8})$")


def iter_caches(cache_dir: Path) -> Iterator[Path]:
    """Every `<dataset>/<key>` folder under the cache root."""
    if not cache_dir.is_dir():
        return
    for ds in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        yield from sorted(p for p in ds.iterdir() if p.is_dir() and KEY_RE.match(p.name) and _is_cache(p))


def _is_cache(model_dir: Path) -> bool:
    """A key folder holds class texts or a split manifest (run folders, say, have names of the same shape)."""
    return (model_dir / TEXT_FILE).is_file() or any(model_dir.glob(f"*/{MANIFEST}"))


def summarize(model_dir: Path) -> dict:
    """Splits, rows, completeness and bytes of one `<dataset>/<key>` cache, from manifests only."""
    splits = {}
    for d in sorted(p for p in model_dir.iterdir() if p.is_dir()):
        try:
            m = read_manifest(d)
        except VlmcacheError as e:
            splits[d.name] = {"error": str(e)}
            continue
        if m is None:
            continue
        splits[d.name] = {
            "rows": sum(e["rows"] for e in m["shards"]),
            "n_rows": m["n_rows"],
            "skipped": sum(len(e["skipped"]) for e in m["shards"]),
            "shards": f"{len(m['shards'])}/{m['n_shards']}",
            "complete": bool(m.get("complete")),
            "bytes": sum(e["bytes"] for e in m["shards"]),
            "tokens": bool(m["fingerprint"].get("tokens")),
            "views": int(m["fingerprint"].get("views") or 0),
            "tail_blocks": int(m["fingerprint"].get("tail_blocks") or 0),  # K of the cached prefix (0: none)
        }
    text = model_dir / TEXT_FILE
    sets = text_sets(text)
    return {
        "dataset": model_dir.parent.name,
        "key": model_dir.name,
        "path": str(model_dir),
        "splits": splits,
        "text": bool(sets),  # class-text embeddings to use: an imported cache's text.h5 holds class names only
        "text_sets": sets,
        "bytes": sum(s.get("bytes", 0) for s in splits.values()) + (text.stat().st_size if text.is_file() else 0),
    }


def resolve_cache(cache_dir: Path, ref: str) -> Path:
    """A `<dataset>/<key>` folder from a path, `dataset/key`, or a unique key (or key prefix)."""
    for candidate in (Path(ref), cache_dir / ref):
        if candidate.is_dir() and KEY_RE.match(candidate.name):
            return candidate
    matches = [p for p in iter_caches(cache_dir) if p.name.startswith(ref) or f"{p.parent.name}/{p.name}" == ref]
    if len(matches) == 1:
        return matches[0]
    known = [f"{p.parent.name}/{p.name}" for p in iter_caches(cache_dir)]
    if not matches:
        listing = ", ".join(known) if known else f"none under '{cache_dir}'"
        raise VlmcacheError(f"No cache matches '{ref}'. Caches: {listing}.")
    raise VlmcacheError(f"'{ref}' matches several caches: {', '.join(f'{p.parent.name}/{p.name}' for p in matches)}.")
