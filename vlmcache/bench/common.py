"""What every benchmark section shares: the scales, the machine, generated JPEGs, device syncs."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from PIL import Image


@dataclass(frozen=True)
class Scale:
    extract_models: tuple  # (model, images)
    loop_rows: int
    decoder_rows: int
    token_shape: tuple  # (T, W) of the decoder and token benchmarks
    token_rows: int
    epoch_rows: int  # one epoch of the linear head at this size (ImageNet-LT: 115,846)
    memory: tuple  # (rows, dim, classes, test rows) of the synthetic cache for the memory figures
    size_rows: int
    stream: tuple  # (model, images) of cached against --stream
    finetune: tuple  # (model, images, batch size)
    prompts: tuple  # (model, class counts, chunk, class counts all at once, address-space limit MB)
    grouped: tuple = ()  # ((rows, dim, classes, test rows) pooled, (rows, (T, W), classes, test rows, decoders))
    pipeline: tuple = ()  # (JPEGs, ((simulated encoder img/s, tokens), ...))
    decode: tuple = ()  # (model, JPEGs) of the --decode modes' speed and agreement
    tail: tuple = ()  # (model, JPEGs, (K, ...)) of tail tuning from the prefix cache against --stream


SCALES = {
    "smoke": Scale(
        (("vlmcache-tiny", 64),),
        2000,
        64,
        (17, 64),
        512,
        5000,
        (5000, 64, 100, 500),
        256,
        ("vlmcache-tiny", 64),
        ("vlmcache-tiny", 64, 32),
        ("vlmcache-tiny", (100, 400), 50, (20, 40), 8000),
        ((5000, 64, 100, 500), (256, (17, 64), 10, 64, 2)),
        (64, ((2000, False), (2000, True))),
        ("vlmcache-tiny", 32),
        ("vlmcache-tiny", 16, (1, 2)),
    ),
    "default": Scale(
        (("vlmcache-tiny", 2000), ("ViT-B-16", 128)),
        20_000,
        512,
        (50, 768),
        4096,
        115_846,
        (115_846, 512, 1000, 20_000),
        2048,
        ("ViT-B-16", 128),
        ("ViT-B-16", 64, 32),
        ("ViT-B-16", (1000, 4000, 8142), 256, (50, 200, 1000), 16_000),
        ((115_846, 512, 1000, 20_000), (2048, (50, 768), 1000, 256, 4)),
        (1024, ((2000, False), (10_000, False), (2000, True))),
        ("ViT-B-16", 64),
        ("ViT-B-16", 64, (1, 2)),
    ),
    "full": Scale(
        (("vlmcache-tiny", 2000), ("ViT-B-16", 256), ("ViT-L-14", 64)),
        20_000,
        512,
        (50, 768),
        8192,
        115_846,
        (437_513, 768, 8142, 24_426),
        4096,
        ("ViT-B-16", 256),
        ("ViT-B-16", 128, 32),
        ("ViT-B-16", (1000, 4000, 8142), 256, (50, 200, 1000), 16_000),
        ((115_846, 512, 1000, 20_000), (2048, (50, 768), 1000, 256, 4)),
        (1024, ((2000, False), (10_000, False), (2000, True))),
        ("ViT-B-16", 64),
        ("ViT-B-16", 128, (1, 2)),
    ),
}


def machine() -> dict:
    import faiss
    import open_clip

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


def write_jpegs(root: Path, n: int, classes: int = 10, size=(500, 375), seed: int = 0, name: str = "train") -> Path:
    """n photo-sized JPEGs (smooth colour fields plus noise, so they compress and decode like photos)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    lines = []
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + k * c) for k in range(3)], -1) * 100 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img" / f"{name}{i:06d}.jpg", quality=90)
        lines.append(f"img/{name}{i:06d}.jpg {i % classes}")
    (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root / f"{name}.txt"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(rows: list[dict]) -> str:
    """A Markdown table from rows (their keys are the header), through pandas and tabulate."""
    return pd.DataFrame(rows).to_markdown(index=False)


def machine_section(r: dict) -> list[str]:
    m = r["machine"]
    return [
        "## Machine",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}, "
        f"GPU: {m['gpu'] or 'none'}. Python {m['python']}, torch {m['torch']}, open_clip {m['open_clip']}, "
        f"h5py {m['h5py']} (HDF5 {m['hdf5']}), faiss {m['faiss']}, numpy {m['numpy']}.",
    ]


def gpu_section(r: dict) -> list[str]:
    if r["machine"]["gpu"]:
        return ["## 6. GPU", "", "The extraction rows above ran on the GPU."]
    return [
        "## 6. GPU",
        "",
        "Not measured: no GPU on this machine. Open rows: ViT-B-16 and ViT-L-14 extraction at fp16 and "
        "bf16 with CPU JPEG decoding (and torchvision.io.decode_jpeg on the device), each against the "
        "encoder-only ceiling; `finetune` under bf16 autocast, with and without gradient checkpointing, against "
        "the bare step; cached against `--stream` and prompt-tuning memory (allocated GPU memory) on the GPU. "
        "`vlmcache bench` fills them on a GPU machine.",
    ]
