"""Zero-shot classification from the cache: cosine similarity of image and class-text embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache import cache, guard, text_cache
from vlmcache.encoders import pick_device
from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.features import Pooled, default_eval_split, find_cache, open_split
from vlmcache.metrics import Evaluator
from vlmcache.predictions import PredictionWriter


def train_counts(model_dir, num_classes: int, dataset: str) -> np.ndarray:
    """Training images per class, for the shot groups: from the cached train split, else the shipped split
    definition; NaN (groups unknown) when neither exists."""
    if (model_dir / "train" / cache.MANIFEST).is_file():
        return np.bincount(open_split(model_dir, "train").labels(), minlength=num_classes)
    from vlmcache.datasets import load_dataset
    from vlmcache.lt_benchmarks import BENCHMARKS

    if dataset in BENCHMARKS:
        ds = load_dataset(dataset)
        if "train" in ds.splits:
            return np.bincount(ds.splits["train"].labels, minlength=num_classes)
    return np.full(num_classes, np.nan)


@torch.no_grad()
def zero_shot(
    cache_dir: str,
    dataset: str | None,
    model: str | None,
    pretrained: str | None,
    cache_key: str | None = None,
    templates: str = "openai",
    split: str | None = None,
    device: str = "auto",
    many: int = 100,
    few: int = 20,
    predictions: str | None = None,  # a parquet file for the per-image predictions
    overwrite: bool = False,  # predictions may replace a predictions file vlmcache wrote
) -> dict:
    if predictions:  # the output guard, before any work
        guard.check_output(predictions, "--save-predictions", "predictions", overwrite)
    dev = pick_device(device)
    model_dir = find_cache(cache_dir, dataset, model, pretrained, cache_key)
    dataset = model_dir.parent.name  # given, or the one cache's
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    if not text.sets:
        raise VlmcacheError(
            f"The cache '{model_dir}' was imported ({text.fingerprint['imported_from']['source']}): it has image "
            f"embeddings and class names but no class-text embeddings, so there is no zero-shot classifier. "
            f"Train a head on it (vlmcache train-head), or run kNN."
        )
    if templates not in text.sets:
        raise unknown_choice("template set (extract it with --templates)", templates, text.sets)
    weights = torch.from_numpy(text.sets[templates][1]).to(dev)  # (C, D), unit norm
    split = split or default_eval_split(model_dir)
    data = Pooled.load(open_split(model_dir, split), dev)
    counts = train_counts(model_dir, len(text.classnames), dataset)
    writer = PredictionWriter(Path(predictions), open_split(model_dir, split), text.classnames) if predictions else None
    evaluator = Evaluator(counts, text.classnames, predictions=writer)
    try:
        for x, y in data.chunks():
            evaluator.update(text.logit_scale * F.normalize(x, dim=-1) @ weights.T, y)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    metrics, table = evaluator.compute(many, few)
    if writer is not None:
        writer.close()
    return {
        "dataset": dataset,
        "cache": str(model_dir),
        "split": split,
        "templates": templates,
        "metrics": metrics,
        "per_class": table,
        **({"predictions": str(predictions)} if predictions else {}),
    }
