"""Extraction against its limit: `vlmcache extract` images/s over the bare encoder's images/s on the same batches.

    python benchmarks/extraction.py --model ViT-B-16 --images 256
    python benchmarks/extraction.py --model vlmcache-tiny --images 2000 --tokens

Both sides run in this one process on the same JPEG files: the extraction reads and decodes them with the
default loader workers and writes shards; the encoder-only side takes the same batches already decoded and
transformed in memory, so it is the ceiling that extraction can approach. Also reports cache bytes per image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmcache import cache
from vlmcache.encoders import load_encoder
from vlmcache.extract import ExtractConfig, default_workers, run_extract


def write_jpegs(root: Path, n: int, classes: int = 10, size=(500, 375), seed: int = 0) -> Path:
    """n photo-sized JPEGs (smooth colour fields plus noise, so they compress and decode like photos)."""
    rng = np.random.default_rng(seed)
    lines = []
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + k * c) for k in range(3)], -1) * 100 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        rel = f"img/{i:06d}.jpg"
        (root / "img").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / rel, quality=90)
        lines.append(f"{rel} {i % classes}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


def encoder_only(encoder, root: Path, split_file: Path, batch_size: int, tokens: bool) -> float:
    """Images/s of the encoder alone on the same batches, decoded and transformed beforehand."""
    paths = [line.rsplit(" ", 1)[0] for line in split_file.read_text().split("\n") if line]
    x = torch.stack([encoder.preprocess(Image.open(root / p).convert("RGB")) for p in paths])
    batches = list(torch.split(x, batch_size))
    encoder.encode_images(batches[0], tokens=tokens)  # warm-up
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        pooled, tok = encoder.encode_images(b, tokens=tokens)
        pooled.cpu()
        if tok is not None:
            tok.cpu()
    return len(x) / (time.perf_counter() - t0)


def loader_only(encoder, root: Path, split_file: Path, batch_size: int, workers: int) -> float:
    """Images/s of reading, decoding and transforming alone: the same DataLoader, no encoder."""
    from torch.utils.data import DataLoader

    from vlmcache.datasets import read_split_file
    from vlmcache.extract import ImageRows, collate
    from vlmcache.images import FileSource

    relpaths, _ = read_split_file(split_file)
    data = ImageRows(FileSource(root, relpaths), np.arange(len(relpaths)), encoder.preprocess)
    loader = DataLoader(
        data, batch_size=batch_size, num_workers=workers, collate_fn=collate, prefetch_factor=4 if workers else None
    )
    t0 = time.perf_counter()
    n = sum(len(b["rows"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--tokens", action="store_true")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, args.images)
        cfg = ExtractConfig(
            dataset="split",
            root=str(root),
            split_files={"train": str(split_file)},
            model=args.model,
            pretrained=args.pretrained,
            cache_dir=str(root / "cache"),
            batch_size=args.batch_size,
            workers=args.workers,
            tokens=args.tokens,
            device=args.device,
            templates=["photo"],
        )
        summary = run_extract(cfg, log=lambda *a: None)
        split = summary["splits"][0]
        manifest = cache.read_manifest(Path(split["path"]))
        pooled_bytes = tokens_bytes = 0
        for entry in manifest["shards"]:
            with cache.open_h5(Path(split["path"]) / entry["file"]) as f:
                pooled_bytes += f["pooled"].id.get_storage_size()
                if "tokens" in f:
                    tokens_bytes += f["tokens"].id.get_storage_size()
        torch.manual_seed(0)
        encoder = load_encoder(args.model, args.pretrained, args.device)
        ceiling = encoder_only(encoder, root, split_file, args.batch_size, args.tokens)
        loading = loader_only(encoder, root, split_file, args.batch_size, args.workers)

    extract_rate = split["images_per_s"]
    result = {
        "model": args.model,
        "device": summary["device"],
        "precision": summary["precision"],
        "images": args.images,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "extract_images_per_s": extract_rate,
        "encoder_only_images_per_s": round(ceiling, 1),
        "ratio": round(extract_rate / ceiling, 3),
        "loader_only_images_per_s": round(loading, 1),
        "bound_by": "encoder" if ceiling < loading else "image decoding",
        "pooled_bytes_per_image": round(pooled_bytes / split["rows"], 1),
        "tokens_bytes_per_image": round(tokens_bytes / split["rows"], 1) if args.tokens else None,
        "file_bytes_per_image": round(split["bytes"] / split["rows"], 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
