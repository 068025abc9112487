"""Section 3d: a tail-tuning epoch from the cached prefix against the same epoch through --stream, next to its limit;
the prefix's bytes per image and view, and what it would take on disk for the benchmarks."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from vlmcache.bench.common import sync, table, write_jpegs

# (dataset, training images) and (model, tokens, width) for the disk figures: N x views x T x W x 2 bytes
DISK_DATASETS = (("ImageNet-LT", 115_846), ("iNaturalist 2018", 437_513))
DISK_MODELS = (("ViT-B/16", 197, 768), ("ViT-L/14", 257, 1024))


def bench_tail(model: str, images: int, ks: tuple[int, ...], device: str = "auto") -> dict:
    """For each K: one `train-head --head tail --tune adapter` epoch on the cached prefix against the same epoch with
    the prefix recomputed from the JPEGs (`--stream`: decode, resize, blocks 0..L-K-1, then the same tail). The
    limit of the speed-up is (decode + prefix + tail) / tail: the decode from decoding and preprocessing the same
    JPEGs in one process, the prefix from bare forward passes up to block L-K, the tail from the cached epoch."""
    from vlmcache import cache
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, default_workers, run_extract
    from vlmcache.train import train_head
    from vlmcache.train_config import TrainConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images)
        test_file = write_jpegs(root, max(8, images // 8), seed=1, name="test")
        encoder = load_encoder(model, "none", device)
        decode_per_image = _decode_seconds(encoder, root, split_file) / images
        size = encoder.preprocess_cfg["size"]
        x = torch.randn(32, 3, *((size, size) if isinstance(size, int) else size))
        n_blocks = len(encoder.model.visual.transformer.resblocks)
        for k in ks:
            cache_dir = root / f"cache-k{k}"
            common = dict(dataset="split", model=model, pretrained="none", cache_dir=str(cache_dir), device=device)
            summary = run_extract(
                ExtractConfig(
                    **common, name="split", root=str(root), templates=["photo"], workers=default_workers(),
                    split_files={"train": str(split_file), "test": str(test_file)}, tail_blocks=k,
                ),
                log=lambda *a: None,
            )  # fmt: skip
            split = cache.SplitCache(Path(summary["cache"]) / "train")
            t, w = split.prefix_shape()
            pooled_only = _bytes_without_prefix(split)
            prefix_per_image = _prefix_seconds(encoder, x, k)
            epochs = {}
            for stream in (False, True):
                cfg = TrainConfig(
                    **common, head="tail", tune="adapter", epochs=1, batch_size=32, stream=stream,
                    runs_dir=str(root / f"runs-k{k}"), eval_split="test", augment=False,
                )  # fmt: skip
                epochs[stream] = train_head(cfg, log=lambda *a: None)["history"][0]["seconds"]
            tail_s = epochs[False]
            streamed_ideal = (decode_per_image + prefix_per_image) * images + tail_s
            limit = streamed_ideal / tail_s
            rows.append(
                {
                    "tower": model,
                    "blocks": n_blocks,
                    "k": k,
                    "images": images,
                    "cached_epoch_s": round(tail_s, 3),
                    "stream_epoch_s": round(epochs[True], 3),
                    "decode_epoch_s": round(decode_per_image * images, 3),
                    "prefix_epoch_s": round(prefix_per_image * images, 3),
                    "measured_speedup": round(epochs[True] / tail_s, 2),
                    "limit_speedup": round(limit, 2),
                    "ratio": round(epochs[True] / tail_s / limit, 3),
                    "prefix_bytes_per_image_view": t * w * 2,
                    "prefix_shape": [t, w],
                    "cache_bytes_per_image": round((split_bytes(split) - pooled_only) / len(split), 1),
                }
            )
    disk = [
        {
            "dataset": name,
            "images": n,
            "model": m,
            "tokens": t,
            "width": w,
            "gb_per_view": round(n * t * w * 2 / 1e9, 1),
        }
        for name, n in DISK_DATASETS
        for m, t, w in DISK_MODELS
    ]
    # the machine's load when the run ended: on a shared machine the epochs' seconds are only as good as this
    return {"epochs": rows, "disk": disk, "load_average": round(os.getloadavg()[0], 1), "cores": os.cpu_count()}


def split_bytes(split) -> int:
    return sum(e["bytes"] for e in split.manifest["shards"])


def _bytes_without_prefix(split) -> int:
    """The shards' bytes less the prefix's stored bytes (HDF5's own size of each `prefix` dataset)."""
    import h5py

    total = 0
    for e in split.manifest["shards"]:
        with h5py.File(split.dir / e["file"], "r", locking=False) as f:
            total += e["bytes"] - f["prefix"].id.get_storage_size()
    return total


def _decode_seconds(encoder, root: Path, split_file: Path) -> float:
    """Decoding and preprocessing every JPEG of the split once, in this process (what --stream's loader does)."""
    from PIL import Image

    paths = [root / line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            encoder.preprocess(img.convert("RGB"))
    return time.perf_counter() - t0


@torch.no_grad()
def _prefix_seconds(encoder, x: torch.Tensor, k: int) -> float:
    """Seconds per image of the tower up to block L-K alone: the blocks after the tap are cut off by an exception
    raised in the tap, so their time is not counted."""

    class Stop(Exception):
        pass

    visual = encoder.model.visual
    blocks = visual.transformer.resblocks

    def stop(module, args):
        raise Stop

    handle = blocks[len(blocks) - k].register_forward_pre_hook(stop)
    x = x.to(encoder.device)
    try:
        for reps in (1, 3):  # a warm-up pass, then the timed ones
            sync(encoder.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                try:
                    visual(x)
                except Stop:
                    pass
            sync(encoder.device)
        return (time.perf_counter() - t0) / (3 * len(x))
    finally:
        handle.remove()


def markdown(r: dict) -> list[str]:
    res = r["tail"]
    rows = [
        {
            "tower": f"{e['tower']} ({e['blocks']} blocks)",
            "K": e["k"],
            "images": e["images"],
            "cached epoch s": e["cached_epoch_s"],
            "stream epoch s": e["stream_epoch_s"],
            "speed-up": f"{e['measured_speedup']}x",
            "limit": f"{e['limit_speedup']}x",
            "ratio": e["ratio"],
            "prefix B/image/view": f"{e['prefix_bytes_per_image_view']:,}",
            "stored B/image": f"{e['cache_bytes_per_image']:,.0f}",
        }
        for e in res["epochs"]
    ]
    disk = [
        {
            "dataset": d["dataset"],
            "train images": f"{d['images']:,}",
            "model": d["model"],
            "prefix T x W": f"{d['tokens']} x {d['width']}",
            "GB per view (K = 1)": f"{d['gb_per_view']:,.1f}",
        }
        for d in res["disk"]
    ]
    e0 = res["epochs"][0]
    return [
        "## 3d. Tail tuning from a cached prefix against --stream",
        "",
        "One `train-head --head tail --tune adapter` epoch (batch 32, random weights) on the cached prefix against "
        "the same epoch with the prefix recomputed from the JPEGs (`--stream`: decode and resize, blocks 0..L-K-1, "
        "then the same tail), same seed. Limit: (decode + prefix + tail) / tail, the decode from decoding and "
        "preprocessing the same JPEGs in one process, the prefix from bare forward passes up to block L-K, the "
        "tail from the cached epoch. The prefix is T x W float16 per image and view; `stored` is what the prefix "
        "dataset takes in the shards per image (HDF5's chunks and checksums included).",
        "",
        table(rows),
        "",
        f"Decoding took {e0['decode_epoch_s'] / e0['images'] * 1000:.1f} ms per image here"
        + (
            f" (load average {res['load_average']} on {res['cores']} cores at the end of the run)"
            if "cores" in res
            else ""
        )
        + ". What the prefix would "
        "take on disk at K = 1 (the prefix's size does not depend on K): N x views x T x W x 2 bytes, for the plain "
        "image (one view); each cached augmented view adds as much again.",
        "",
        table(disk),
    ]
