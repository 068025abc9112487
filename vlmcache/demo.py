"""`vlmcache demo`: the whole loop on the built-in digits_lt data with the tiny random-weight model."""

from __future__ import annotations

from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.knn import knn
from vlmcache.train import TrainConfig, train_head
from vlmcache.zeroshot import zero_shot

MODEL = dict(model="vlmcache-tiny", pretrained="none")
# digits_lt has 568 training images: small batches and many epochs; the linear probe standardises inputs.
LINEAR = dict(head="linear", head_params={"normalize": "standardize"}, epochs=60, lr=1e-2, batch_size=64)
FIRST_STAGES = [
    ("linear + ce", dict(LINEAR, loss="ce")),
    ("linear + focal", dict(LINEAR, loss="focal")),
    ("linear + class-balanced sampling", dict(LINEAR, loss="ce", sampler="class_balanced")),
    ("linear + balanced softmax", dict(LINEAR, loss="balanced_softmax")),
    ("linear + LADE", dict(LINEAR, loss="lade")),
    ("decoder + balanced softmax", dict(head="decoder", loss="balanced_softmax", epochs=30, lr=3e-3, batch_size=64)),
]


def run_demo(cache_dir: str, runs_dir: str, workers: int = 0, progress=None, log=print) -> dict:
    """Extract digits_lt, then evaluate zero-shot, kNN, several heads and losses, and a second stage."""
    extract = run_extract(
        ExtractConfig(dataset="digits_lt", cache_dir=cache_dir, shard_size=256, tokens=True, workers=workers, **MODEL),
        progress=progress,
        log=log,
    )
    rows = [("zero-shot (openai templates)", zero_shot(cache_dir, "digits_lt", templates="openai", **MODEL)["metrics"])]
    rows.append(
        ("kNN, k=10, class-balanced votes", knn(cache_dir, "digits_lt", k=10, balanced=True, **MODEL)["metrics"])
    )
    first_run = None
    for name, params in FIRST_STAGES:
        result = train_head(
            TrainConfig(dataset="digits_lt", cache_dir=cache_dir, runs_dir=runs_dir, overwrite=True, **MODEL, **params)
        )
        rows.append((name, result["metrics"]))
        first_run = first_run or result["run"]
    crt = train_head(
        TrainConfig(
            dataset=None,
            stage2="crt",
            from_run=first_run,
            cache_dir=cache_dir,
            runs_dir=runs_dir,
            overwrite=True,
            epochs=30,
            lr=1e-2,
            batch_size=64,
        )
    )
    rows.append(("linear + ce, then cRT", crt["metrics"]))
    return {"extract": extract, "results": rows, "runs_dir": runs_dir}
