"""Shared fixtures: small generated image datasets on disk and the tiny random-weight encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def make_image(rng: np.random.Generator, label: int, size: int = 24) -> Image.Image:
    """A noisy image whose mean colour depends on the label, so classes differ a little."""
    base = np.zeros((size, size, 3), dtype=np.float64)
    base[..., label % 3] = 160
    arr = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def write_split_dataset(root: Path, counts: dict[str, list[int]], seed: int = 0) -> dict[str, Path]:
    """Images under root/images/<class>/ and one split file per split; returns {split: split file}."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, per_class in counts.items():
        lines = []
        for label, n in enumerate(per_class):
            folder = root / "images" / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel = f"images/{split}/c{label}/{i:03d}.{'png' if i % 2 else 'jpg'}"
                make_image(rng, label).save(root / rel)
                lines.append(f"{rel} {label}")
        files[split] = root / f"{split}.txt"
        files[split].write_text("\n".join(lines) + "\n")
    return files


@pytest.fixture(scope="session")
def split_dataset(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A 3-class long-tailed dataset: 30 / 12 / 5 training images, 6 test images per class."""
    root = tmp_path_factory.mktemp("splitdata")
    files = write_split_dataset(root, {"train": [30, 12, 5], "test": [6, 6, 6]})
    (root / "classnames.txt").write_text("red thing\ngreen thing\nblue thing\n")
    return root, files


@pytest.fixture(scope="session")
def tiny_encoder():
    from vlmcache.encoders import load_encoder

    return load_encoder("vlmcache-tiny", "none", device="cpu")
