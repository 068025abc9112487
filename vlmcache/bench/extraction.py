"""Section 1: extraction against the bare encoder on the same batches, and the loader alone."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmcache.bench.common import sync, table, write_jpegs
from vlmcache.memory import keep_heap


def bench_extraction(
    model: str,
    images: int,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    tokens: bool = False,
    decode: str = "pil",
) -> dict:
    """`extract` with `decode` (extract.DECODE_MODES) against the bare encoder on the same images preprocessed on
    the CPU, and the CPU loader alone: the GPU check compares the decode modes on one device
    (benchmarks/gpu_check.py)."""

    from vlmcache import handover
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, default_workers, run_extract
    from vlmcache.image_rows import ImageRows, image_loader
    from vlmcache.images import FileSource
    from vlmcache.splits import read_split_file

    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images)
        cfg = ExtractConfig(
            dataset="split",
            name="split",
            root=str(root),
            split_files={"train": str(split_file)},
            model=model,
            pretrained="none",
            cache_dir=str(root / "cache"),
            batch_size=batch_size,
            workers=workers,
            tokens=tokens,
            device=device,
            precision=precision,
            templates=["photo"],
            decode=decode,
        )
        encoder = load_encoder(model, "none", device, precision)
        if encoder.device.type == "cpu":
            keep_heap()  # as `vlmcache extract` sets on a CPU, for both sides of the ratio (memory.keep_heap)
        relpaths, _ = read_split_file(split_file)
        x = torch.stack([encoder.preprocess(Image.open(root / p).convert("RGB")) for p in relpaths])
        batches = list(torch.split(x, batch_size))

        def bare_encoder() -> float:
            encoder.encode_images(batches[0], tokens=tokens)  # warm-up
            sync(encoder.device)
            t0 = time.perf_counter()
            for b in batches:
                pooled, tok = encoder.encode_images(b, tokens=tokens)
                pooled.cpu()
                if tok is not None:
                    tok.cpu()
            return len(x) / (time.perf_counter() - t0)

        # each side the best of two, interleaved (bare, extract, bare, extract): identical passes on a shared
        # machine can differ by a fifth
        passes, runs = [], []
        for k in range(2):
            passes.append(bare_encoder())
            summary = run_extract(replace(cfg, cache_dir=str(root / f"cache{k}")), log=lambda *a: None)
            runs.append(summary["splits"][0]["images_per_s"])
        split = summary["splits"][0]
        per_image = split["bytes"] / split["rows"]
        encoder_rate = max(passes)
        part, finish = handover.cut(encoder.preprocess)  # as extraction's loader: uint8 images, finished on the device
        rows = ImageRows(FileSource(root, relpaths), np.arange(len(relpaths)), part)
        loader = image_loader(rows, batch_size, workers)
        t0 = time.perf_counter()
        n = sum(len(handover.finished(b, encoder.device, finish)["rows"]) for b in loader)
        loader_rate = n / (time.perf_counter() - t0)
    rate = max(runs)
    return {
        "model": model,
        "pretrained": "none (random)",
        "device": summary["device"],
        "precision": summary["precision"],
        "images": images,
        "batch_size": batch_size,
        "workers": workers,
        "tokens": tokens,
        "decode": decode,
        "extract_images_per_s": rate,
        "extract_runs_images_per_s": runs,
        "encoder_passes_images_per_s": [round(p, 1) for p in passes],
        "encoder_images_per_s": round(encoder_rate, 1),
        "ratio": round(rate / encoder_rate, 3),
        "goal": 0.9,
        "loader_images_per_s": round(loader_rate, 1),
        "bound_by": "encoder" if encoder_rate < loader_rate else "image decoding (the loader)",
        "cache_bytes_per_image": round(per_image, 1),
        **({"cpu_decoded": split["cpu_decoded"]} if "cpu_decoded" in split else {}),  # --decode gpu's CPU fallbacks
    }


def markdown(r: dict) -> list[str]:
    decoded = any(e.get("decode", "pil") != "pil" for e in r["extraction"])  # a column only where modes differ
    rows = [
        {
            "model": e["model"],
            "device": e["device"],
            "precision": e["precision"],
            "tokens": e["tokens"],
            **({"decode": e.get("decode", "pil")} if decoded else {}),
            "extract img/s": e["extract_images_per_s"],
            "encoder img/s": e["encoder_images_per_s"],
            "ratio": e["ratio"],
            "loader img/s": e["loader_images_per_s"],
            "bound by": e["bound_by"],
            "cache B/img": e["cache_bytes_per_image"],
        }
        for e in r["extraction"]
    ]
    return [
        "## 1. Extraction against the bare encoder (goal: ratio at least 0.9)",
        "",
        table(rows),
        "",
        "Each side is the better of two runs, interleaved (bare encoder, extraction, bare encoder, extraction). "
        "The loader is the same DataLoader without the encoder: where it is slower than the encoder, JPEG "
        "decoding and resizing bound extraction, and the ratio to the encoder says little.",
        "",
        "On a CPU, `vlmcache extract` keeps freed memory in its heap (memory.keep_heap: glibc's mallopt, as "
        "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967295` would): with glibc's defaults each large "
        "activation buffer of a ViT is a fresh mmap, page-faulted in again on every pass, and identical encoder "
        "passes differed by up to a fifth. Both sides of each ratio here run under it.",
    ]
