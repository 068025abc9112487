"""Listing caches: every `<dataset>/<key>` folder under a cache root, its summary from manifests, and one
cache found from a path, `dataset/key` or a key prefix."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from vlmcache.cache import MANIFEST, read_manifest
from vlmcache.errors import VlmcacheError
from vlmcache.text_cache import TEXT_FILE, text_sets

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
