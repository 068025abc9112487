"""Shared fixtures: small generated image datasets on disk and the tiny random-weight encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcache.encoders import openclip

openclip()  # open_clip with the package's model configs (vlmcache-tiny) registered, for tests that call it directly

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


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """digits_lt extracted with the tiny random model, with tokens."""
    from vlmcache.extract import ExtractConfig, run_extract

    d = tmp_path_factory.mktemp("digits")
    cfg = ExtractConfig(
        dataset="digits_lt",
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
        cache_dir=str(d),
        tokens=True,
    )
    run_extract(cfg, log=lambda *a: None)
    return d


def write_feature_cache(
    cache_dir: Path,
    dataset: str,
    splits: dict,
    num_classes: int,
    shard_size: int = 64,
    key: str = "synthetic__random__00000000",
    text_dim: int | None = None,
) -> Path:
    """A cache in the real on-disk format from arrays: {split: (pooled (N, D), labels (N,), tokens or None)}."""
    from vlmcache import cache, text_cache

    model_dir = cache_dir / dataset / key
    for split, (pooled, labels, tokens) in splits.items():
        fingerprint = {
            "encoder": {"model": "synthetic"},
            "dataset": dataset,
            "split": split,
            "num_classes": num_classes,
            "shard_size": shard_size,
        }
        cache.write_arrays(model_dir / split, pooled, labels, fingerprint, tokens, shard_size, "synthetic")
    d = text_dim or next(iter(splits.values()))[0].shape[1]
    emb = np.random.default_rng(0).normal(size=(num_classes, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    names = [f"class {i}" for i in range(num_classes)]
    text_cache.write_text(
        model_dir / text_cache.TEXT_FILE,
        text_cache.TextCache({"encoder": {}}, names, {"photo": (["a photo of a {}."], emb)}, 100.0),
    )
    return model_dir


def long_tailed_features(rng: np.random.Generator, counts: list[int], dim: int = 16, noise: float = 1.0):
    """Gaussian class clusters around random unit means: pooled (N, D) and labels (N,)."""
    means = rng.normal(size=(len(counts), dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    x = means[labels] * 2.0 + rng.normal(scale=noise, size=(len(labels), dim))
    return x.astype(np.float32), labels


def extract_cmd(root: Path, files: dict, cache_dir: Path, *extra: str) -> list[str]:
    """`vlmcache extract` of the split_dataset's train split with the tiny model, as a subprocess command line."""
    import sys

    return [
        sys.executable,
        "-m",
        "vlmcache",
        "extract",
        "--dataset",
        "split",
        "--name",
        "split",
        "--root",
        str(root),
        "--split-file",
        f"train={files['train']}",
        "--model",
        "vlmcache-tiny",
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
        "--tokens",
        "--json",
        *extra,
    ]


def run(cmd: list[str], preexec=None, **env):
    """Run a command with extra environment variables; its output captured as text."""
    import os
    import subprocess

    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300, preexec_fn=preexec
    )


def assert_same_cache(a: Path, b: Path) -> None:
    """Two extractions of one split hold the same rows, labels, pooled and tokens (float16 tolerance: a resumed
    run batches rows differently, which may move the last bit)."""
    from vlmcache import cache

    ca, cb = cache.SplitCache(a), cache.SplitCache(b)
    np.testing.assert_array_equal(ca.rows(), cb.rows())
    np.testing.assert_array_equal(ca.labels(), cb.labels())
    np.testing.assert_allclose(ca.pooled().astype(np.float32), cb.pooled().astype(np.float32), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(
        ca.read_tokens(0, len(ca)).astype(np.float32),
        cb.read_tokens(0, len(cb)).astype(np.float32),
        atol=2e-3,
        rtol=2e-3,
    )
