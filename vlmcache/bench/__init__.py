"""`vlmcache bench`: speed, memory and cache size, each figure next to its limit, both measured in one run.

- extraction: `extract` images/s over the bare encoder's images/s on the same batches (JPEG files, default
  loader workers); the loader alone says which of the two bounds it.
- extraction pipeline at GPU rates: a simulated encoder of a set throughput (2,000 and 10,000 img/s) fed by the
  real loader and writer, pooled and with ViT-L/14-sized tokens, against the slowest stage alone.
- stage-2 loop: `fit` samples/s over the same head's bare forward and backward on in-memory tensors; token
  streaming from HDF5 over a plain sequential read of the same file.
- cached against streaming: one epoch of `train-head` against `train-head --stream`, next to the limit
  (tower time + head time) / head time from the tower's bare passes and the cached epoch.
- tail tuning: an epoch of the tail head on the cached prefix against the same epoch through --stream, next to
  the limit (decode + prefix + tail) / tail; the prefix's bytes per image and view, and the benchmarks' disk.
- prompt tuning: peak memory of a CoOp step over 1,000 to 8,142 class prompts, chunked and all at once.
- grouped grid: 27 linear runs trained as one group (`ablate`'s default) against one run and against the 27
  one by one; 4 decoders on streamed tokens: bytes read per epoch, group against one run.
- memory: peak RSS of train-head, zero-shot and kNN on a synthetic cache, each in a fresh process.
- cache size: bytes per image of pooled and tokens in float16, raw, gzip and blosc (hdf5plugin), and read speed.

Benchmarks are not tests: nothing here asserts a time. `--scale smoke` runs everything at toy sizes in seconds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from vlmcache.bench import (
    cache_size,
    common,
    extraction,
    finetune,
    grouped,
    loop,
    memory,
    pipeline,
    prompts,
    streaming,
    tail,
)
from vlmcache.bench.cache_size import bench_cache_size
from vlmcache.bench.common import SCALES, machine
from vlmcache.bench.extraction import bench_extraction
from vlmcache.bench.finetune import bench_finetune
from vlmcache.bench.grouped import bench_grouped
from vlmcache.bench.loop import _looped, bench_loop, bench_token_read
from vlmcache.bench.memory import bench_memory
from vlmcache.bench.pipeline import bench_decode, bench_pipeline
from vlmcache.bench.prompts import bench_prompts, prompt_step
from vlmcache.bench.streaming import bench_streaming
from vlmcache.errors import unknown_choice

__all__ = ["SCALES", "prompt_step", "run_bench", "to_markdown"]


SECTIONS = (
    "extraction", "pipeline", "loop", "grouped", "memory", "cache_size", "streaming", "finetune", "prompts", "tail",
)  # fmt: skip


def run_bench(scale: str = "default", device: str = "auto", log=print, only: list[str] | None = None) -> dict:
    """Every section's figures (or, with `only`, those sections' alone)."""
    if scale not in SCALES:
        raise unknown_choice("scale", scale, SCALES)
    for name in only or ():
        if name not in SECTIONS:
            raise unknown_choice("benchmark section", name, SECTIONS)
    s = SCALES[scale]

    def want(name: str) -> bool:
        return not only or name in only

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    results = {"scale": scale, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "only": list(only or [])}
    if want("extraction"):
        log("extraction ...")
        results["extraction"] = [bench_extraction(m, n, device=str(dev)) for m, n in s.extract_models]
        last, n = s.extract_models[-1]
        # as many images as the pooled row: the loader's start-up (its first batch decoded before any encodes) then
        # weighs the same in both
        results["extraction"].append(bench_extraction(last, n, device=str(dev), tokens=True))
    if want("pipeline"):
        log("extraction pipeline at GPU rates (simulated encoder) ...")
        results["pipeline"] = bench_pipeline(*s.pipeline)
        log("decoding modes ...")
        results["decode"] = bench_decode(*s.decode)
    with tempfile.TemporaryDirectory() as tmp:
        if want("loop"):
            log("stage-2 loop ...")
            results.update(_loop(s, dev, Path(tmp) / "tokens"))
        if want("grouped"):
            log("grouped grid ...")
            results["grouped"] = bench_grouped(*s.grouped, Path(tmp) / "grouped", device=str(dev))
        if want("memory"):
            log("memory ...")
            results["memory"] = bench_memory(*s.memory, Path(tmp) / "memory")
        if want("cache_size"):
            log("cache size ...")
            (Path(tmp) / "size").mkdir()
            results["cache_size"] = bench_cache_size(s.size_rows, 512, s.token_shape, Path(tmp) / "size")
    if want("streaming"):
        log("cached against streaming ...")
        results["cached_vs_streaming"] = bench_streaming(*s.stream, device=str(dev))
    if want("finetune"):
        log("fine-tuning ...")
        results["finetune"] = bench_finetune(*s.finetune, device=str(dev))
    if want("tail"):
        log("tail tuning from a cached prefix ...")
        results["tail"] = tail.bench_tail(*s.tail, device=str(dev))
    if want("prompts"):
        log("prompt tuning memory ...")
        model, classes, chunk, whole, limit = s.prompts
        results["prompts"] = bench_prompts(model, classes, chunk, whole, limit)
    return results


def _loop(s, dev: torch.device, token_folder: Path) -> dict:
    """Section 2: the loop against the bare step (linear, decoder), an ImageNet-LT-sized epoch, token reads."""
    from vlmcache.features import Pooled
    from vlmcache.heads import build_head

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
    xe = torch.randn(s.epoch_rows, 512, generator=g).to(dev)
    ye = torch.randint(0, 1000, (s.epoch_rows,), generator=g).to(dev)
    t0 = time.perf_counter()
    _looped(build_head("linear", 512, 1000).to(dev), Pooled(xe, ye), 256, 1, 1000)
    epoch = {
        "rows": s.epoch_rows,
        "dim": 512,
        "classes": 1000,
        "head": "linear",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log_read = bench_token_read(s.token_rows, s.token_shape, token_folder)
    return {"loop": [linear, decoder], "epoch": epoch, "token_read": log_read}


def _sections(r: dict) -> list[list[str]]:
    """Each section's Markdown, in the order of its number (a section not measured gives none)."""
    parts = [
        (None, lambda r: common.machine_section(r)),
        ("extraction", extraction.markdown),
        ("pipeline", pipeline.markdown),
        ("loop", loop.markdown),
        ("grouped", grouped.markdown),
        ("streaming", streaming.markdown),
        ("prompts", prompts.markdown),
        ("finetune", finetune.markdown),
        ("tail", tail.markdown),
        ("memory", memory.markdown),
        ("cache_size", cache_size.markdown),
        (None, common.gpu_section),
    ]
    only = r.get("only") or []
    return [fn(r) for name, fn in parts if not only or name in only]


def to_markdown(r: dict, existing: str | None = None) -> str:
    """BENCHMARKS.md: a title, the machine, then each section's table and prose, in the order of its number.
    A run of some sections (`--only`) replaces those sections in `existing` and keeps the rest; a whole run keeps
    what it does not measure (`kept_sections`)."""
    if r.get("only"):
        return splice(existing or "# vlmcache benchmarks\n", _sections(r), r)
    parts = [
        [
            "# vlmcache benchmarks",
            "",
            f"Measured by `vlmcache bench --scale {r['scale']}` on {r['date']}. Each figure stands next to its "
            "limit, both measured in the same run. Random weights everywhere (speed does not depend on them).",
        ],
        *_sections({**r, "only": []}),
    ]
    text = "\n\n".join("\n".join(p) for p in parts if p) + "\n"
    return splice(text, kept_sections(text, existing, bool(r["machine"]["gpu"]))) if existing else text


def kept_sections(text: str, existing: str, gpu: bool) -> list[list[str]]:
    """The sections of `existing` that a whole run (`text`) must not drop: those it does not write (7, figures
    measured by hand), and on a machine without a GPU a GPU section (6) that one measured (benchmarks/gpu_check.sh),
    which this run could only replace with "Not measured"."""
    made = {_number(b.split("\n")[0]) for b in text.split("\n## ")[1:]}
    kept = []
    for block in existing.rstrip("\n").split("\n## ")[1:]:
        number = _number(block.split("\n")[0])
        measured_gpu = number == (6, "") and "benchmarks/gpu_check.sh" in block  # its own rows, not "rows above"
        if number is not None and (number not in made or (measured_gpu and not gpu)):
            kept.append(("## " + block).split("\n"))
    return kept


def _number(heading: str) -> tuple[int, str] | None:
    """ "## 2b. ..." -> (2, "b"); an unnumbered heading (Machine) -> None."""
    label = heading.removeprefix("## ").split(".")[0].strip()
    digits = label[: len(label) - len(label.lstrip("0123456789"))]
    return (int(digits), label[len(digits) :]) if digits else None


def splice(existing: str, sections: list[list[str]], r: dict | None = None) -> str:
    """`existing` with each of `sections` in place of the section of its number ("## 2b. ..."), or inserted
    before the first section that sorts after it; with `r` (a run of some sections), each says when and how it was
    measured."""
    blocks = existing.rstrip("\n").split("\n## ")
    head, body = blocks[0], ["## " + b for b in blocks[1:]]
    for lines in sections:
        if not lines:
            continue
        number = _number(lines[0])
        if number is None:
            continue
        text = "\n".join(lines)
        if r is not None:
            only = " ".join(f"--only {name}" for name in r["only"])
            text += f"\n\n(Measured by `vlmcache bench --scale {r['scale']} {only}` on {r['date']}.)"
        found = [i for i, b in enumerate(body) if _number(b.split("\n")[0]) == number]
        if found:
            body[found[0]] = text
            continue
        after = [i for i, b in enumerate(body) if (_number(b.split("\n")[0]) or (-1, "")) > number]
        body.insert(after[0] if after else len(body), text)
    return "\n\n".join([head.rstrip("\n"), *(b.rstrip("\n") for b in body)]) + "\n"
