"""Section 3: one epoch of train-head from the cache against train-head --stream, next to its limit."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vlmcache.bench.common import sync, table, write_jpegs


def bench_streaming(model: str, images: int, device: str = "auto") -> list[dict]:
    """One epoch of `train-head` from the cache against `train-head --stream` (the tower on every step) on the
    same JPEGs, for the linear and the decoder head. The limit of the speed-up is (tower + head) / head, with the
    tower's time from its bare forward passes over the same images and the head's from the cached epoch."""
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, default_workers, run_extract
    from vlmcache.train import train_head
    from vlmcache.train_config import TrainConfig

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images)
        test_file = write_jpegs(root, max(8, images // 8), seed=1, name="test")
        common = dict(dataset="split", model=model, pretrained="none", cache_dir=str(root / "cache"), device=device)
        run_extract(
            ExtractConfig(
                **common,
                name="split",
                root=str(root),
                split_files={"train": str(split_file), "test": str(test_file)},
                tokens=True,
                templates=["photo"],
                workers=default_workers(),
            ),
            log=lambda *a: None,
        )
        encoder = load_encoder(model, "none", device)
        size = encoder.preprocess_cfg["size"]
        x = torch.randn(64, 3, *((size, size) if isinstance(size, int) else size))
        encoder.encode_images(x[:8])  # warm-up
        sync(encoder.device)
        t0 = time.perf_counter()
        for _ in range(max(1, images // 64)):
            encoder.encode_images(x)[0].cpu()
        tower_per_image = (time.perf_counter() - t0) / (max(1, images // 64) * 64)
        del encoder
        for head, batch in (("linear", 256), ("decoder", 64)):
            epochs = {}
            for stream in (False, True):
                cfg = TrainConfig(
                    **common,
                    head=head,
                    epochs=1,
                    batch_size=batch,
                    stream=stream,
                    runs_dir=str(root / "runs"),
                    eval_split="test",
                )
                epochs[stream] = train_head(cfg, log=lambda *a: None)["history"][0]["seconds"]
            head_s = epochs[False]
            limit = (tower_per_image * images + head_s) / head_s
            out.append(
                {
                    "head": head,
                    "tower": model,
                    "images": images,
                    "cached_epoch_s": round(head_s, 3),
                    "stream_epoch_s": round(epochs[True], 3),
                    "tower_epoch_s": round(tower_per_image * images, 3),
                    "measured_speedup": round(epochs[True] / head_s, 1),
                    "limit_speedup": round(limit, 1),
                    "ratio": round(epochs[True] / head_s / limit, 3),
                }
            )
    return out


def markdown(r: dict) -> list[str]:
    cs = r["cached_vs_streaming"]
    rows = [
        {
            "head": c["head"],
            "tower": c["tower"],
            "images": c["images"],
            "cached epoch s": c["cached_epoch_s"],
            "stream epoch s": c["stream_epoch_s"],
            "speed-up": f"{c['measured_speedup']}x",
            "limit": f"{c['limit_speedup']}x",
            "ratio": c["ratio"],
        }
        for c in cs
    ]
    per_image = {c["head"]: c["cached_epoch_s"] / c["images"] * 1000 for c in cs}
    tower_ms = cs[0]["tower_epoch_s"] / cs[0]["images"] * 1000
    return [
        "## 3. Cached against streaming",
        "",
        "One epoch of `train-head` from the cache against `train-head --stream` (the frozen tower on every step, "
        "as the seed's code does) on the same JPEGs and the same seed. Limit: (tower + head) / head, the tower's "
        "time from its bare forward passes over as many images, the head's from the cached epoch.",
        "",
        table(rows),
        "",
        f"Per image: the tower {tower_ms:.1f} ms, "
        + ", ".join(f"the {h} head {ms:.3f} ms" for h, ms in per_image.items())
        + ". A ratio above 1: streaming also decodes and resizes every image, which the limit leaves out. "
        f"At ImageNet-LT's 115,846 training images a streamed epoch costs about "
        f"{tower_ms * 115_846 / 3.6e6:.1f} h of tower time on this machine, every epoch of every run.",
    ]
