"""Stage 1's shard pipeline: a batch encoded and copied to the host, its rows filed into their shards' buffers,
each full shard built in memory, written and listed in the manifest (in order, under torchrun by rank 0)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vlmcache import atomic, cache, distributed, faults
from vlmcache.datasets import Split
from vlmcache.encoders import Encoder
from vlmcache.errors import VlmcacheError
from vlmcache.extract_config import ExtractConfig

# --------------------------------------------------------------------------- one shard's buffer


class ShardBuffer:
    def __init__(self, index: int, start: int, stop: int):
        self.index, self.start, self.stop = index, start, stop
        self.parts: dict[str, list[np.ndarray]] = {
            "rows": [], "pooled": [], "tokens": [], "views": [], "view_tokens": [], "prefix": [], "view_prefix": []
        }  # fmt: skip
        self.skipped: list[dict] = []
        self.seen = 0

    @property
    def full(self) -> bool:
        return self.seen == self.stop - self.start


def _check_finite(name: str, arr: np.ndarray, rows: np.ndarray, split: Split) -> None:
    if arr.size == 0:
        return
    if arr.dtype == np.float16 and np.left_shift(arr.view(np.uint16), 1).max() < 0xF800:
        return  # no exponent of all ones (inf, NaN) once the sign bit is shifted out: 8x numpy's float16 isfinite
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        row = int(rows[np.argmax(bad)])
        raise VlmcacheError(
            f"The {name} embedding of row {row} ('{split.source.describe(row)}') is not finite in float16 "
            f"(NaN or overflow); nothing was written for its shard."
        )


class Publisher:
    """Lists finished shards in the manifest. Under torchrun every rank hands its k-th shard to rank 0 in
    round k, and rank 0 alone writes the manifest, so it is never written by two processes."""

    def __init__(self, split_dir: Path, manifest: dict):
        self.split_dir, self.manifest = split_dir, manifest
        self.rank, self.world = distributed.rank_world()
        self.rounds = 0

    def publish(self, entry: dict | None) -> None:
        entries = distributed.gather(entry)
        if self.rank == 0:
            new = [e for e in entries if e is not None]
            if new:
                self.manifest["shards"] = sorted(self.manifest["shards"] + new, key=lambda e: e["index"])
                atomic.write_json_atomic(self.split_dir / cache.MANIFEST, self.manifest)
        self.rounds += 1
        if entry is not None:
            faults.hit("shard_published")

    def finish(self, rounds: int) -> None:
        """Ranks with fewer shards than the busiest one still take part in its last rounds."""
        while self.rounds < rounds:
            self.publish(None)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A device output's float16 copy into pinned host memory, started without waiting for it (CUDA); a CPU
    output as it is (converted to float16 by numpy, as before)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=torch.float16, pin_memory=True)
    host.copy_(t.to(torch.float16), non_blocking=True)
    return host


def device_done(encoder: Encoder) -> Callable[[], None]:
    """What waits for the work queued so far on the encoder's device: a CUDA event's synchronize, nothing on the
    CPU, or the encoder's own `mark()` (the benchmark's simulated encoder)."""
    mark = getattr(encoder, "mark", None)
    if mark is not None:
        return mark()
    if encoder.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        return event.synchronize
    return lambda: None


def _encode(encoder: Encoder, images: torch.Tensor, tokens: bool, prefix: int) -> tuple:
    """(pooled, tokens or None, prefix or None) of a batch of images: one forward pass."""
    if prefix:
        return encoder.encode_with_prefix(images, tokens, prefix)
    return (*encoder.encode_images(images, tokens=tokens), None)


def encode_batch(encoder: Encoder, batch: dict, tokens: bool, prefix: int = 0) -> Callable[[], dict]:
    """Queue a batch's encoding and its copies to the host; returns the function that waits for them (one sync
    per batch) and gives the float16 arrays: pooled (B, D), and as asked tokens (B, T, W), the prefix entering the
    last `prefix` blocks (B, T, W), views (B, K, D) and their tokens and prefixes (B, K, T, W); empty when every
    image of the batch was skipped."""
    if batch["images"] is None:
        return dict
    pooled, tok, pre = _encode(encoder, batch["images"], tokens, prefix)
    out = {"pooled": _to_host(pooled)}
    if tok is not None:
        out["tokens"] = _to_host(tok)
    if pre is not None:
        out["prefix"] = _to_host(pre)
    shapes = {}
    if batch["views"] is not None:
        b, k = batch["views"].shape[:2]
        flat, flat_tok, flat_pre = _encode(encoder, batch["views"].flatten(0, 1), tokens, prefix)
        out["views"], shapes["views"] = _to_host(flat), (b, k, -1)  # (B*K, D) -> (B, K, D)
        if flat_tok is not None:  # (B*K, T, W) -> (B, K, T, W)
            out["view_tokens"], shapes["view_tokens"] = _to_host(flat_tok), (b, k, *flat_tok.shape[1:])
        if flat_pre is not None:  # (B*K, T, W) -> (B, K, T, W)
            out["view_prefix"], shapes["view_prefix"] = _to_host(flat_pre), (b, k, *flat_pre.shape[1:])
    done = device_done(encoder)

    def outputs() -> dict:
        done()
        arrays = {name: t.numpy().astype(np.float16, copy=False) for name, t in out.items()}
        return {name: a.reshape(shapes[name]) if name in shapes else a for name, a in arrays.items()}

    return outputs


class ShardWriter:
    """Full shards leave the extraction's thread here. Two threads build and checksum them while the next batches
    encode; one more writes, fsyncs, renames and lists them in the manifest, strictly in the order they were
    handed over, so a shard's file appears only once the shards before it are listed (and under torchrun each
    publish is the same round of the manifest's gather on every rank). At most `depth` shards wait, so memory
    stays flat; a failed build or write raises in the extraction's thread, with that shard not published."""

    def __init__(self, build: Callable[[ShardBuffer], tuple], publisher: Publisher, depth: int = 2):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.build, self.publisher, self.depth = build, publisher, depth
        self.builders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlmcache-shard-build")
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmcache-shard-write")
        self.pending: deque = deque()

    def _publish(self, built) -> None:
        final, image, entry = built.result()
        atomic.write_bytes_atomic(final, image, fault="shard_written", drop_cache=True)
        self.publisher.publish(entry)

    def submit(self, buf: ShardBuffer) -> None:
        built = self.builders.submit(self.build, buf)
        self.pending.append(self.writer.submit(self._publish, built))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def publish_ready(self) -> None:
        """Raise the error of a finished write, if one failed."""
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        """Stop: what is being written finishes (published or not; a resume extracts what is not listed)."""
        for pool in (self.writer, self.builders):
            pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


def add_batch(buffers: dict, batch: dict, arrays: dict, split: Split, size: int, n: int) -> None:
    """File a batch's rows (and its skipped images, with their reasons) into the buffers of their shards."""
    good_rows = batch["rows"].numpy()
    for row, reason in batch["bad"]:
        buf = _buffer(buffers, row // size, size, n)
        buf.skipped.append({"row": int(row), "path": split.source.describe(row), "reason": reason})
        buf.seen += 1
    for shard in np.unique(good_rows // size):
        sel = good_rows // size == shard
        at = np.flatnonzero(sel)
        if at[-1] - at[0] + 1 == len(at):  # the loader's rows come in order: the shard's part is a view, no copy
            sel = slice(int(at[0]), int(at[-1]) + 1)
        buf = _buffer(buffers, int(shard), size, n)
        buf.parts["rows"].append(good_rows[sel])
        for name, values in arrays.items():  # pooled, tokens, views, view_tokens
            buf.parts[name].append(values[sel])
        buf.seen += len(at)


def _buffer(buffers: dict, index: int, size: int, n: int) -> ShardBuffer:
    if index not in buffers:
        buffers[index] = ShardBuffer(index, index * size, min((index + 1) * size, n))
    return buffers[index]


def build(buf: ShardBuffer, split: Split, split_dir: Path, dims: dict, cfg: ExtractConfig) -> tuple:
    """One full shard built in memory: (its final path, its bytes, its manifest entry), for ShardWriter."""
    rows = np.concatenate(buf.parts["rows"]) if buf.parts["rows"] else np.zeros(0, np.int64)
    # rows arrive in order unless loader workers returned batches out of it: then no copy is needed to sort
    order = slice(None) if (np.diff(rows) > 0).all() else np.argsort(rows, kind="stable")
    arrays = {
        "rows": rows[order],
        "labels": split.labels[rows[order]],
        "pooled": _cat(buf.parts["pooled"], (0, dims["pooled"]))[order],
        # each row's image, as the split names it (relative to --root): embeddings join back to their files
        "paths": cache.encode_paths([split.source.describe(int(r)) for r in rows[order]]),
    }
    if cfg.tokens:  # the large ones: handed to HDF5 part by part when in order, never concatenated
        arrays["tokens"] = _cat(buf.parts["tokens"], (0, *dims["tokens"]), order)
    if cfg.tail_blocks:
        arrays["prefix"] = _cat(buf.parts["prefix"], (0, *dims["prefix"]), order)
    views = cfg.views if split.name == "train" else 0
    if views:  # also for a shard whose every row was skipped, so that every shard has the same datasets
        arrays["views"] = _cat(buf.parts["views"], (0, views, dims["pooled"]))[order]
        if cfg.tokens:
            arrays["view_tokens"] = _cat(buf.parts["view_tokens"], (0, views, *dims["tokens"]), order)
        if cfg.tail_blocks:
            arrays["view_prefix"] = _cat(buf.parts["view_prefix"], (0, views, *dims["prefix"]), order)
    for name in ("pooled", "tokens", "views", "view_tokens", "prefix", "view_prefix"):
        if name in arrays:
            parts = arrays[name] if isinstance(arrays[name], list) else [arrays[name]]
            at = 0
            for part in parts:
                _check_finite(name, part, arrays["rows"][at : at + len(part)], split)
                at += len(part)
    final = split_dir / cache.shard_name(buf.index)
    image, entry = cache.shard_image(final, arrays, {"split": split.name, "start": buf.start, "stop": buf.stop})
    entry.update(index=buf.index, start=buf.start, stop=buf.stop, rows=len(rows), skipped=buf.skipped)
    return final, image, entry


def _cat(parts: list[np.ndarray], empty_shape: tuple, order=None) -> np.ndarray | list[np.ndarray]:
    """A shard's parts as one array; with `order` a slice (rows already in order) and several parts, the parts
    themselves, for `cache.shard_image` to write one by one."""
    if not parts:
        return np.zeros(empty_shape, dtype=np.float16)
    if isinstance(order, slice):
        return parts if len(parts) > 1 else parts[0]
    return np.concatenate(parts) if order is None else np.concatenate(parts)[order]
