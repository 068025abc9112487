"""Section 1b: the extraction pipeline at GPU rates, proven on a CPU with a simulated encoder.

A `SimulatedEncoder` stands in for a GPU ViT-L/14 of a set throughput: the loader resizes the images to its
input size (224 px), `encode_images` returns at once with outputs of its shapes, and the wait it hands the
extractor (`mark`) ends when the simulated device has spent batch / rate seconds on everything queued so far,
as a CUDA stream works off the main thread. The real loader (JPEG decoding in worker processes) feeds it, and
the real writer builds, checksums, writes and fsyncs the shards. Figure: extraction images/s over the slowest
stage alone (the loader over the same files; the encoder's set rate; the writer's MB/s over the bytes per
image). Goal 0.9.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmcache.bench.common import sync, table, write_jpegs


class SimulatedEncoder:
    """An encoder of `rate` images/s taking images of `image_size` (the preprocessing of the model it stands in
    for: the loader decodes and resizes to what that model takes, and hands over tensors of that size), with the
    tiny encoder's fingerprint. Its device is `meta`: what the extractor does on the encoder's device (the loader's
    uint8 images made float and normalised) takes no CPU time, as on a GPU, and no time at all (an encoder's
    batch takes far longer)."""

    def __init__(self, real, rate: float, pooled_dim: int, token_shape: tuple[int, int], image_size: int):
        import open_clip

        self._real, self.rate = real, rate
        self.pooled_dim, self.token_shape = pooled_dim, token_shape
        cfg = real.preprocess_cfg
        self.preprocess_cfg = {**cfg, "size": [image_size, image_size]}
        self.preprocess = open_clip.image_transform(
            image_size, is_train=False, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"], fill_color=cfg["fill_color"],
        )  # fmt: skip
        self.device = torch.device("meta")
        self.busy_until = 0.0
        self._outputs: dict[tuple, torch.Tensor] = {}

    def __getattr__(self, name):  # fingerprint, train_transform, ...: the real encoder's
        return getattr(self._real, name)

    def encode_images(self, images: torch.Tensor, tokens: bool = False):
        now = time.perf_counter()
        self.busy_until = max(now, self.busy_until) + len(images) / self.rate  # queued behind earlier batches
        # float16, as a GPU's outputs reach the host (converted on the device, copied into pinned memory). Those
        # copies are DMA into blocks the pinned allocator reuses: no CPU time, no fresh pages. So every batch
        # gets the same zeros here (a fresh 33 MB array of tokens per batch would charge the CPU a memset and its
        # page faults that a GPU's pipeline never pays).
        pooled = self._zeros(len(images), self.pooled_dim)
        return pooled, (self._zeros(len(images), *self.token_shape) if tokens else None)

    def _zeros(self, *shape) -> torch.Tensor:
        cached = self._outputs.get(shape)
        if cached is None:
            cached = self._outputs[shape] = torch.zeros(shape, dtype=torch.float16)
        return cached

    def mark(self):
        until = self.busy_until

        def wait() -> None:
            time.sleep(max(0.0, until - time.perf_counter()))

        return wait


def _cpu_seconds() -> float:
    """CPU seconds, user and system, of this process's threads and of its children that have been waited for (a
    DataLoader's workers are, when its iteration ends)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _loader_rate(root: Path, split_file: Path, encoder, batch_size: int, workers: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the loader alone over the split's files."""
    from vlmcache import handover
    from vlmcache.image_rows import ImageRows, image_loader
    from vlmcache.images import FileSource
    from vlmcache.splits import read_split_file

    relpaths, _ = read_split_file(split_file)
    workers_part, _ = handover.cut(encoder.preprocess)  # what extraction's loader workers run
    rows = ImageRows(FileSource(root, relpaths), np.arange(len(relpaths)), workers_part)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    n = sum(len(b["rows"]) + len(b["bad"]) for b in image_loader(rows, batch_size, workers))
    return n / (time.perf_counter() - t0), (_cpu_seconds() - c0) / n


def _writer_rate(
    folder: Path, rows: int, pooled_dim: int, token_shape, tokens: bool, shards: int = 3
) -> tuple[float, float]:
    """(bytes/s, CPU seconds per byte) of the shard write path alone (build, checksum, write, fsync, rename) on
    outputs of these shapes."""
    from vlmcache import cache

    rng = np.random.default_rng(0)
    arrays = {
        "rows": np.arange(rows),
        "labels": np.zeros(rows, np.int64),
        "pooled": rng.normal(size=(rows, pooled_dim)).astype(np.float16),
        "paths": cache.encode_paths([f"img/train{i:06d}.jpg" for i in range(rows)]),
    }
    if tokens:
        arrays["tokens"] = rng.normal(size=(rows, *token_shape)).astype(np.float16)
    folder.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    written = 0
    for i in range(shards):
        entry = cache.write_shard(folder / cache.shard_name(i), arrays, {})
        written += entry["bytes"]
    return written / (time.perf_counter() - t0), (_cpu_seconds() - c0) / written


def bench_pipeline(
    images: int, cases: tuple, batch_size: int = 64, shard_size: int = 256, repeats: int = 2
) -> list[dict]:
    """cases: (rate img/s, tokens) pairs; ViT-L/14's sizes: images of 224 px in, pooled 768 wide and tokens
    (257, 1024) out."""
    from vlmcache.choices import default_workers
    from vlmcache.datasets import load_dataset
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, extract_split

    workers = default_workers()
    pooled_dim, token_shape, image_size = 768, (257, 1024), 224  # ViT-L/14's
    real = load_encoder("vlmcache-tiny", "none", "cpu")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images)
        dataset = load_dataset("split", root, {"train": str(split_file)})
        split = dataset.splits["train"]
        simulated = SimulatedEncoder(real, 1.0, pooled_dim, token_shape, image_size)
        loader, loader_cpu = _loader_rate(root, split_file, simulated, batch_size, workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        for k, (rate, tokens) in enumerate(cases):
            runs = []
            for attempt in range(repeats):  # the better of `repeats` extractions, each into a cache of its own
                encoder = SimulatedEncoder(real, rate, pooled_dim, token_shape, image_size)
                folder = root / f"cache{k}-{attempt}"
                cfg = ExtractConfig(
                    dataset="split", name="split", root=str(root), split_files={"train": str(split_file)},
                    model="vlmcache-tiny", pretrained="none", cache_dir=str(folder), batch_size=batch_size,
                    workers=workers, tokens=tokens, shard_size=shard_size, device="cpu",
                )  # fmt: skip
                t0, c0 = time.perf_counter(), _cpu_seconds()
                summary = extract_split(encoder, dataset, split, cfg, folder / "train", log=lambda *a: None)
                seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
                runs.append((summary["rows"] / seconds, cpu / summary["rows"], summary))
            extract, extract_cpu, summary = max(runs, key=lambda r: r[0])
            per_image = summary["bytes"] / summary["rows"]
            writer_bytes, writer_cpu = _writer_rate(root / f"writer{k}", shard_size, pooled_dim, token_shape, tokens)
            writer, writer_cpu = writer_bytes / per_image, writer_cpu * per_image
            stages = {"loader": loader, "encoder": float(rate), "writer": writer}
            slowest = min(stages, key=stages.get)
            # The stages share the machine's cores: together they can go no faster than the cores over the CPU
            # time each stage spends per image alone (the simulated encoder spends none, as a GPU's would not).
            cpu_bound = cores / (loader_cpu + writer_cpu)
            out.append(
                {
                    "outputs": f"tokens {list(token_shape)} + pooled" if tokens else f"pooled {pooled_dim}",
                    "encoder_images_per_s": rate,
                    "loader_images_per_s": round(loader, 1),
                    "writer_images_per_s": round(writer, 1),
                    "bytes_per_image": round(per_image),
                    "extract_images_per_s": round(extract, 1),
                    "slowest_stage": slowest,
                    "ratio": round(extract / stages[slowest], 3),
                    "goal": 0.9,
                    "cpu_ms_per_image": {
                        "loader": round(loader_cpu * 1e3, 3),
                        "writer": round(writer_cpu * 1e3, 3),
                        "extraction": round(extract_cpu * 1e3, 3),
                    },
                    "cores": cores,
                    "cpu_bound_images_per_s": round(cpu_bound, 1),
                    "ratio_to_bound": round(extract / min(stages[slowest], cpu_bound), 3),
                    "images": images,
                    "image_size": image_size,
                    "workers": workers,
                }
            )
    return out


def bench_decode(model: str, images: int, size: tuple[int, int] = (800, 600), batch_size: int = 32) -> list[dict]:
    """Each --decode mode's loader speed and its pooled embeddings' agreement (cosine) with the reference (pil),
    from extractions of the same photo-sized JPEGs (iNaturalist's are about 800 x 600). Speed is decoding and
    preprocessing in one process (no workers: at a few dozen images a loader's start-up would dominate), the best
    of two passes; `gpu`'s is reading the files plus the device decoding and resizing them. Without a CUDA
    device `gpu`'s path runs on the CPU (torchvision's decode_jpeg and resize there), which gives its agreement,
    not a GPU's speed."""
    from unittest import mock

    from vlmcache import cache, extract
    from vlmcache.choices import default_workers
    from vlmcache.datasets import load_dataset
    from vlmcache.device_decode import DeviceDecoder, EncodedRows, collate_encoded
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import DECODE_MODES, ExtractConfig, run_extract, use_decode
    from vlmcache.image_rows import ImageRows, image_loader

    workers = default_workers()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = load_encoder(model, "none", device)
    out, pooled = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images, size=size)
        for mode in DECODE_MODES:
            source = load_dataset("split", root, {"train": str(split_file)}).splits["train"].source
            use_decode(source, encoder, mode)
            rates = []
            for _ in range(2):
                t0 = time.perf_counter()
                if mode == "gpu":
                    on_device = DeviceDecoder(encoder.preprocess_cfg, encoder.device)
                    data = EncodedRows(source, np.arange(images))
                    n = sum(
                        len(on_device(b)["rows"]) for b in image_loader(data, batch_size, 0, False, collate_encoded)
                    )
                    sync(encoder.device)
                else:
                    data = ImageRows(source, np.arange(images), encoder.preprocess)
                    n = sum(len(b["rows"]) for b in image_loader(data, batch_size, 0))
                rates.append(n / (time.perf_counter() - t0))
            rate = max(rates)
            cfg = ExtractConfig(
                dataset="split", name="split", root=str(root), split_files={"train": str(split_file)}, model=model,
                pretrained="none", cache_dir=str(root / "cache"), batch_size=batch_size, workers=workers,
                device=device, decode=mode, templates=["photo"],
            )  # fmt: skip
            # on a CPU the command refuses --decode gpu; here its path runs there, labelled so
            allow = mock.patch.object(extract, "check_device_decode", lambda c, e: None) if device == "cpu" else None
            with allow or contextlib.nullcontext():
                summary = run_extract(cfg, log=lambda *a: None)
            pooled[mode] = cache.SplitCache(Path(summary["splits"][0]["path"])).pooled().astype(np.float32)
            a, b = pooled["pil"], pooled[mode]
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            out.append(
                {
                    "decode": mode + (" (its path on the CPU)" if mode == "gpu" and device == "cpu" else ""),
                    "device": device,
                    "model": model,
                    "image_size": list(size),
                    "images": images,
                    "decode_images_per_s": round(rate, 1),
                    "cosine_to_pil_min": round(float(cos.min()), 5),
                    "cosine_to_pil_mean": round(float(cos.mean()), 5),
                }
            )
    return out


def markdown(r: dict) -> list[str]:
    rows = r.get("pipeline")
    if not rows:
        return []
    shown = [
        {
            "outputs": p["outputs"],
            "encoder img/s (set)": p["encoder_images_per_s"],
            "loader img/s": p["loader_images_per_s"],
            "writer img/s": p["writer_images_per_s"],
            "KB/img": round(p["bytes_per_image"] / 1024, 1),
            "extract img/s": p["extract_images_per_s"],
            "slowest stage": p["slowest_stage"],
            "ratio": p["ratio"],
            "goal": p["goal"],
            **(
                {
                    "CPU ms/img: loader + writer (extraction)": f"{p['cpu_ms_per_image']['loader']} + "
                    f"{p['cpu_ms_per_image']['writer']} ({p['cpu_ms_per_image']['extraction']})",
                    "CPU bound img/s": p["cpu_bound_images_per_s"],
                    "ratio to the lower bound": p["ratio_to_bound"],
                }
                if "cpu_bound_images_per_s" in p
                else {}
            ),
        }
        for p in rows
    ]
    out = [
        "## 1b. The extraction pipeline at GPU rates (a simulated encoder; goal: 0.9 of the slowest stage)",
        "",
        table(shown),
        "",
        f"{rows[0]['images']} photo-sized JPEGs (500 x 375), {rows[0]['workers']} loader workers"
        + (
            f", each image decoded and resized to {rows[0]['image_size']} px as ViT-L/14's preprocessing does (the "
            "outputs are ViT-L/14's sizes too)"
            if "image_size" in rows[0]
            else ""
        )
        + ". The simulated encoder returns at once and its outputs are ready after batch / rate seconds, as a CUDA "
        "stream's are; the extractor queues batch k+1 before it waits for batch k; two threads build and checksum "
        "each shard and a third writes, fsyncs and lists them in order while the next batches encode. Each stage "
        "alone: the loader over the same files, the set encoder rate, the shard write path's MB/s over the bytes "
        "per image. Extraction is the better of two runs.",
    ]
    if "cpu_bound_images_per_s" in rows[0]:
        out += [
            "",
            f"The stages share this machine's {rows[0]['cores']} cores. Alone, the loader's workers keep every core "
            "busy, so a stage's speed alone is not what it gets beside the others: together they can go no faster "
            "than the cores over the CPU time that the loader and the writer each spend per image alone (CPU bound; "
            "the simulated encoder spends none, as a GPU's would not). The last column is extraction over the lower "
            "of the slowest stage and that bound. On a GPU machine's many cores the bound lies far above the slowest "
            "stage, and the ratio to the slowest stage is the one that counts.",
        ]
    decode = r.get("decode") or []
    if decode:
        d = decode[0]
        shown = [
            {
                "--decode": x["decode"],
                "decode + preprocess img/s (one process)": x["decode_images_per_s"],
                "speed-up": round(x["decode_images_per_s"] / d["decode_images_per_s"], 2),
                "cosine to pil, min": x["cosine_to_pil_min"],
                "cosine to pil, mean": x["cosine_to_pil_mean"],
            }
            for x in decode
        ]
        out += [
            "",
            f"Decoding modes on {d['images']} JPEGs of {d['image_size'][0]} x {d['image_size'][1]} (iNaturalist's "
            f"size), {d['model']} preprocessing and (random) weights; agreement is the cosine between each image's "
            "pooled embedding and the full decode's:",
            "",
            table(shown),
        ]
        if any("on the CPU" in x["decode"] for x in decode):
            out += [
                "",
                "No CUDA device: the `gpu` row runs its path on the CPU (torchvision's decode_jpeg and antialiased "
                "resize there), which measures its agreement with `pil` and its CPU speed, not a GPU's (nvJPEG's "
                "decoder may differ from libjpeg-turbo's in the last bits).",
            ]
    return out
