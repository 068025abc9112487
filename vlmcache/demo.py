"""`vlmcache demo`: the whole loop on the built-in digits_lt data with the tiny random-weight model."""

from __future__ import annotations

import contextlib

from vlmcache import guard
from vlmcache.ablate import run_pipeline
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.pipeline import load_pipeline
from vlmcache.report import write_report
from vlmcache.zeroshot import zero_shot

MODEL = dict(model="vlmcache-tiny", pretrained="random")


@contextlib.contextmanager
def one_thread():
    """Run the block on one intra-op thread, then restore the count. The demo's tensors (a 64-wide tower,
    10 classes) are too small to gain from intra-op threads, and threads that wait on each other collapse when
    the cores are busy: on 2 cores under a load of 2 the demo took 5 min with torch's default threads and
    1 min 22 s with one (48 s against 45 s on a quiet machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_outputs(cache_dir: str, runs_dir: str) -> None:
    """Both of the demo's outputs, before any work: a refused --runs-dir must not leave a freshly written cache."""
    guard.check_output(cache_dir, "--cache-dir", "cache-root")
    guard.check_output(runs_dir, "--runs-dir", "runs")


OTHER_SETTINGS = " Pass --overwrite to start this split again"  # extract's advice, which the demo cannot take


def extract(cache_dir: str, workers: int = 0, progress=None, log=print) -> dict:
    cfg = ExtractConfig(dataset="digits_lt", cache_dir=cache_dir, shard_size=256, tokens=True, workers=workers, **MODEL)
    try:
        return run_extract(cfg, progress=progress, log=log)
    except VlmcacheError as e:  # a digits_lt cache made by `vlmcache extract` with other settings
        if OTHER_SETTINGS not in str(e):
            raise
        raise VlmcacheError(
            f"{str(e).split(OTHER_SETTINGS)[0]} The demo never replaces a cache: pass --cache-dir for a folder of its "
            f"own, or remove that cache."
        ) from None


def evaluate(cache_dir: str, runs_dir: str, progress=None, log=print) -> dict:
    """Zero-shot, then the shipped demo pipeline and its report."""
    zs = zero_shot(cache_dir, "digits_lt", templates="openai", **MODEL)["metrics"]
    pipe = load_pipeline("demo")
    pipe.cache_dir = cache_dir
    run_pipeline(pipe, runs_dir, progress, log)
    written = write_report(runs_dir)
    return {"zero_shot": zs, "table": written["table"], "report": written["report"], "runs_dir": runs_dir}
