"""The HDF5 feature cache: shards, a manifest per split, the lazy split reader and verification (files are written
by `atomic`; the class-text file is `text_cache`, listing caches `listing`).

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
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmcache import schemas
from vlmcache.atomic import h5_image, sha256_file, write_bytes_atomic, write_json_atomic
from vlmcache.errors import VlmcacheError

MANIFEST = "manifest.json"
FORMAT = 1


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
            raise self._damaged(i, e) from None

    def _damaged(self, i: int, e: Exception) -> VlmcacheError:
        """A shard that cannot be read, and how to make it again: repair re-extracts, an imported split is imported
        again (there is no extraction to repeat)."""
        again = (
            f"import it again with --overwrite (`vlmcache cache verify --repair` extracts, and {self.dir} was imported)"
            if self.fingerprint.get("imported")
            else f"run `vlmcache cache verify --repair {self.dir.parent}` to extract it again"
        )
        return VlmcacheError(f"The shard '{self.shards[i].path}' cannot be read ({e}); it is damaged: {again}.")

    def _read_into(self, i: int, name: str, rows: slice, out: np.ndarray) -> None:
        try:
            dset = self._file(i)[name]
            if dset.shape[1:] != out.shape[1:] or dset.dtype != out.dtype:
                raise KeyError(f"'{name}' is {dset.dtype} {dset.shape}, not {out.dtype} (n, {out.shape[1:]})")
            dset.read_direct(out, np.s_[rows], np.s_[0 : len(out)])
        except (OSError, KeyError) as e:  # as _read's
            raise self._damaged(i, e) from None

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
