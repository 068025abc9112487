"""Section 4: peak RSS of train-head, zero-shot and kNN on a synthetic cache, each in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlmcache.bench.common import table

_MEASURE = """
import json, sys
from vlmcache.cli import app
from vlmcache.memory import peak_rss_mb
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), file=sys.stderr)
"""


def _peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one vlmcache command in a fresh process."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr[-2000:]}")
    return json.loads(res.stderr.strip().splitlines()[-1])["peak_rss_mb"], seconds


def bench_memory(rows: int, dim: int, classes: int, test_rows: int, folder: Path) -> dict:
    """Peak RSS of train-head (one epoch, linear), zero-shot and kNN on an iNat-sized synthetic pooled cache."""
    from vlmcache import cache, text_cache

    rng = np.random.default_rng(0)
    counts = np.maximum(2, (1000 * np.exp(-np.linspace(0, 6.2, classes)))).astype(int)  # a long tail, 1000 to 2
    labels = np.repeat(np.arange(classes), counts)
    labels = np.resize(labels, rows) if len(labels) < rows else labels[:rows]
    model_dir = folder / "split" / "vlmcache-tiny__random__00000000"
    for split, n, lab in (("train", rows, labels), ("test", test_rows, rng.integers(0, classes, test_rows))):
        fingerprint = {"num_classes": classes, "dataset": "split", "encoder": {"model": "bench"}}
        pooled = rng.normal(size=(n, dim)).astype(np.float16)
        cache.write_arrays(model_dir / split, pooled, lab, fingerprint, shard_size=65536)
    text = rng.normal(size=(classes, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    text_cache.write_text(
        model_dir / text_cache.TEXT_FILE,
        text_cache.TextCache({}, [f"c{i}" for i in range(classes)], {"photo": (["{}"], text)}, 100.0),
    )
    common = ["-d", "split", "-m", "vlmcache-tiny", "-p", "none", "--cache-dir", str(folder), "--json"]
    out = {
        "rows": rows,
        "dim": dim,
        "classes": classes,
        "test_rows": test_rows,
        "pooled_mb_float32": round(rows * dim * 4 / 2**20, 1),
    }
    for name, argv in (
        ("train_head_linear_1_epoch", ["train-head", *common, "--epochs", "1", "--runs-dir", str(folder / "runs")]),
        ("zero_shot", ["zero-shot", *common, "--templates", "photo"]),
        ("knn_k20", ["knn", *common, "--k", "20"]),
    ):
        rss, seconds = _peak_rss(argv)
        out[name] = {"peak_rss_mb": round(rss, 1), "seconds": round(seconds, 1)}
    return out


def markdown(r: dict) -> list[str]:
    mem = r["memory"]
    rows = [
        {"command": name.replace("_", " "), "peak RSS (MB)": mem[name]["peak_rss_mb"], "seconds": mem[name]["seconds"]}
        for name in ("train_head_linear_1_epoch", "zero_shot", "knn_k20")
    ]
    return [
        f"## 4. Memory (synthetic pooled cache: {mem['rows']:,} x {mem['dim']}, {mem['classes']:,} classes, "
        f"{mem['test_rows']:,} test rows; {mem['pooled_mb_float32']} MB as float32)",
        "",
        table(rows),
    ]
