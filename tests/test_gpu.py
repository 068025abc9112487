"""What only a CUDA device can check, run by `benchmarks/gpu_check.sh` (`pytest -m gpu`) and skipped here without
one: extraction on the GPU at each precision agrees with the CPU's fp32 cache, `--decode gpu` (nvJPEG) agrees with
PIL's full decode, torch's kNN search on the device finds faiss's neighbours, and a head trains there.

Each check is a function of the device, so that its logic also runs on the CPU (the last test) where the suite
runs every day, and a GPU's few minutes are not spent finding a typo."""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import long_tailed_features, write_feature_cache

CUDA = torch.cuda.is_available()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _extract(root: Path, split_file: Path, cache_dir: Path, **kw) -> tuple[np.ndarray, dict]:
    """The train split extracted with the tiny random model; its pooled rows and its summary."""
    from vlmcache import cache, extract

    cfg = extract.ExtractConfig(
        dataset="split", name="split", root=str(root), split_files={"train": str(split_file)},
        model="vlmcache-tiny", pretrained="none", cache_dir=str(cache_dir), workers=0, batch_size=8,
        templates=["photo"], **kw,
    )  # fmt: skip
    # --decode gpu on a CPU (the check's own logic, below) runs its path there, as the decode benchmark does
    allow = kw.get("decode") == "gpu" and kw.get("device") == "cpu"
    with mock.patch.object(extract, "check_device_decode", lambda c, e: None) if allow else contextlib.nullcontext():
        summary = extract.run_extract(cfg, log=lambda *a: None)
    split = summary["splits"][0]
    return cache.SplitCache(Path(split["path"])).pooled(), split


def check_extraction_agrees(tmp_path: Path, split_dataset, device: str, precision: str, floor: float) -> None:
    root, files = split_dataset
    ref, _ = _extract(root, files["train"], tmp_path / "cpu", device="cpu")
    got, split = _extract(root, files["train"], tmp_path / device, device=device, precision=precision)
    assert got.shape == ref.shape and np.isfinite(got).all()
    cos = _cosines(ref, got)
    assert cos.min() > floor, f"{device} {precision}: cosine to the CPU's fp32 rows {cos.min():.5f}"


def check_device_decode_agrees(tmp_path: Path, device: str) -> None:
    from vlmcache.bench.common import write_jpegs

    split_file = write_jpegs(tmp_path / "jpegs", 16, classes=4, size=(320, 240))
    pil, _ = _extract(tmp_path / "jpegs", split_file, tmp_path / "pil", device=device, precision="fp32")
    dev, split = _extract(tmp_path / "jpegs", split_file, tmp_path / "dev", device=device, precision="fp32",
                          decode="gpu")  # fmt: skip
    assert split["cpu_decoded"] == 0  # every file a baseline JPEG: none fell back to the CPU
    cos = _cosines(pil, dev)
    assert cos.min() > 0.999, f"--decode gpu against pil: cosine {cos.min():.6f}"


def check_knn_search(device: str) -> None:
    import faiss

    from vlmcache.knn import TorchIndex

    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 64)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    q = train[:200] + rng.normal(scale=0.05, size=(200, 64)).astype(np.float32)
    flat = faiss.IndexFlatIP(64)
    flat.add(train)
    ref_s, ref_i = flat.search(q, 10)
    got_s, got_i = TorchIndex(train, torch.device(device), chunk=1024).search(q, 10)
    np.testing.assert_allclose(got_s, ref_s, atol=1e-3)  # TF32, if a caller enabled it, rounds a little
    assert (got_i == ref_i).mean() > 0.99  # the same neighbours but for near-ties


def check_train_head(tmp_path: Path, device: str) -> None:
    from vlmcache.train import train_head
    from vlmcache.train_config import TrainConfig

    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [200, 60, 12], noise=0.8)
    xt, yt = long_tailed_features(np.random.default_rng(0), [40, 40, 40], noise=0.8)  # the same class means
    write_feature_cache(tmp_path / "cache", "synth", {"train": (x, y, None), "test": (xt, yt, None)}, 3)
    cfg = TrainConfig(
        dataset="synth", model="synthetic", pretrained="random", cache_dir=str(tmp_path / "cache"),
        runs_dir=str(tmp_path / f"runs-{device}"), device=device, epochs=10, lr=1e-2, batch_size=64,
        loss="balanced_softmax",
    )  # fmt: skip
    summary = train_head(cfg, log=lambda *a: None)
    metrics = summary["metrics"]
    assert 0.5 < metrics["overall"] <= 1.0 and np.isfinite(metrics["few"])


@pytest.mark.parametrize("precision, floor", [("fp32", 0.9999), ("fp16", 0.999), ("bf16", 0.99)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_extraction_on_the_gpu_agrees_with_the_cpu(tmp_path, split_dataset, precision, floor):
    check_extraction_agrees(tmp_path, split_dataset, "cuda", precision, floor)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_nvjpeg_decode_agrees_with_pil(tmp_path):
    check_device_decode_agrees(tmp_path, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_knn_on_the_device_finds_faiss_neighbours():
    check_knn_search("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_head_trains_on_the_gpu(tmp_path):
    check_train_head(tmp_path, "cuda")


def test_the_gpu_checks_hold_on_the_cpu(tmp_path, split_dataset):
    """The same checks on the CPU, so that their own logic is tested wherever the suite runs."""
    check_extraction_agrees(tmp_path / "x", split_dataset, "cpu", "fp32", 0.9999)
    check_device_decode_agrees(tmp_path / "d", "cpu")
    check_knn_search("cpu")
    check_train_head(tmp_path / "t", "cpu")
