"""`vlmcache demo`: the whole loop on the built-in digits_lt data with the tiny random-weight model."""

from __future__ import annotations

from vlmcache.ablate import load_pipeline, run_pipeline
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.report import write_report
from vlmcache.zeroshot import zero_shot

MODEL = dict(model="vlmcache-tiny", pretrained="random")


def extract(cache_dir: str, workers: int = 0, progress=None, log=print) -> dict:
    cfg = ExtractConfig(dataset="digits_lt", cache_dir=cache_dir, shard_size=256, tokens=True, workers=workers, **MODEL)
    return run_extract(cfg, progress=progress, log=log)


def evaluate(cache_dir: str, runs_dir: str, progress=None, log=print) -> dict:
    """Zero-shot, then the shipped demo pipeline and its report."""
    zs = zero_shot(cache_dir, "digits_lt", templates="openai", **MODEL)["metrics"]
    pipe = load_pipeline("demo")
    pipe.cache_dir = cache_dir
    run_pipeline(pipe, runs_dir, progress, log)
    written = write_report(runs_dir)
    return {"zero_shot": zs, "table": written["table"], "report": written["report"], "runs_dir": runs_dir}
