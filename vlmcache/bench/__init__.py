"""`vlmcache bench`: speed, memory and cache size, each figure next to its limit, both measured in one run.

- extraction: `extract` images/s over the bare encoder's images/s on the same batches (JPEG files, default
  loader workers); the loader alone says which of the two bounds it.
- stage-2 loop: `fit` samples/s over the same head's bare forward and backward on in-memory tensors; token
  streaming from HDF5 over a plain sequential read of the same file.
- cached against streaming: one epoch of `train-head` against `train-head --stream`, next to the limit
  (tower time + head time) / head time from the tower's bare passes and the cached epoch.
- prompt tuning: peak memory of a CoOp step over 1,000 to 8,142 class prompts, chunked and all at once.
- memory: peak RSS of train-head, zero-shot and kNN on a synthetic cache, each in a fresh process.
- cache size: bytes per image of pooled and tokens in float16, raw, gzip and blosc (hdf5plugin), and read speed.

Benchmarks are not tests: nothing here asserts a time. `--scale smoke` runs everything at toy sizes in seconds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vlmcache.bench import cache_size, common, extraction, finetune, loop, memory, prompts, streaming
from vlmcache.bench.cache_size import bench_cache_size
from vlmcache.bench.common import SCALES, machine
from vlmcache.bench.extraction import bench_extraction
from vlmcache.bench.finetune import bench_finetune
from vlmcache.bench.loop import _looped, bench_loop, bench_token_read
from vlmcache.bench.memory import bench_memory
from vlmcache.bench.prompts import bench_prompts, prompt_step
from vlmcache.bench.streaming import bench_streaming
from vlmcache.errors import unknown_choice

__all__ = ["SCALES", "prompt_step", "run_bench", "to_markdown"]


def run_bench(scale: str = "default", device: str = "auto", log=print) -> dict:
    if scale not in SCALES:
        raise unknown_choice("scale", scale, SCALES)
    s = SCALES[scale]
    from vlmcache.features import Pooled
    from vlmcache.heads import build_head

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    results = {"scale": scale, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    log("extraction ...")
    results["extraction"] = [bench_extraction(m, n, device=str(dev)) for m, n in s.extract_models]
    results["extraction"].append(
        bench_extraction(s.extract_models[-1][0], max(16, s.extract_models[-1][1] // 2), device=str(dev), tokens=True)
    )
    log("stage-2 loop ...")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.loop_rows, 512, generator=g).to(dev)
    y = torch.randint(0, 1000, (s.loop_rows,), generator=g).to(dev)
    linear = bench_loop("linear", lambda: build_head("linear", 512, 1000).to(dev), Pooled(x, y), x, 256, 2, 1000)
    t, w = s.token_shape
    xt = torch.randn(s.decoder_rows, t, w, generator=g).to(dev)
    yt = torch.randint(0, 1000, (s.decoder_rows,), generator=g).to(dev)
    # tokens held in memory are gathered by index exactly as pooled rows are
    decoder = bench_loop("decoder", lambda: build_head("decoder", w, 1000).to(dev), Pooled(xt, yt), xt, 64, 1, 1000)
    decoder["token_shape"] = [t, w]
    results["loop"] = [linear, decoder]
    xe = torch.randn(s.epoch_rows, 512, generator=g).to(dev)
    ye = torch.randint(0, 1000, (s.epoch_rows,), generator=g).to(dev)
    t0 = time.perf_counter()
    _looped(build_head("linear", 512, 1000).to(dev), Pooled(xe, ye), 256, 1, 1000)
    results["epoch"] = {
        "rows": s.epoch_rows,
        "dim": 512,
        "classes": 1000,
        "head": "linear",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        log("token reads ...")
        results["token_read"] = bench_token_read(s.token_rows, s.token_shape, Path(tmp) / "tokens")
        log("memory ...")
        results["memory"] = bench_memory(*s.memory, Path(tmp) / "memory")
        log("cache size ...")
        (Path(tmp) / "size").mkdir()
        results["cache_size"] = bench_cache_size(s.size_rows, 512, s.token_shape, Path(tmp) / "size")
    log("cached against streaming ...")
    results["cached_vs_streaming"] = bench_streaming(*s.stream, device=str(dev))
    log("fine-tuning ...")
    results["finetune"] = bench_finetune(*s.finetune, device=str(dev))
    log("prompt tuning memory ...")
    model, classes, chunk, whole, limit = s.prompts
    results["prompts"] = bench_prompts(model, classes, chunk, whole, limit)
    return results


def to_markdown(r: dict) -> str:
    """BENCHMARKS.md: a title, the machine, then each section's table and prose, in the order of its number."""
    parts = [
        [
            "# vlmcache benchmarks",
            "",
            f"Measured by `vlmcache bench --scale {r['scale']}` on {r['date']}. Each figure stands next to its "
            "limit, both measured in the same run. Random weights everywhere (speed does not depend on them).",
        ],
        common.machine_section(r),
        extraction.markdown(r),
        loop.markdown(r),
        streaming.markdown(r),
        prompts.markdown(r),
        finetune.markdown(r),
        memory.markdown(r),
        cache_size.markdown(r),
        common.gpu_section(r),
    ]
    return "\n\n".join("\n".join(p) for p in parts if p) + "\n"
