"""Zero-shot classification from the cache: cosine similarity of image and class-text embeddings."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache import cache
from vlmcache.encoders import pick_device
from vlmcache.errors import unknown_choice
from vlmcache.features import Pooled, default_eval_split, find_cache, open_split
from vlmcache.metrics import Evaluator


def train_counts(model_dir, num_classes: int, dataset: str) -> np.ndarray:
    """Training images per class, for the shot groups: from the cached train split, else the shipped split
    definition; NaN (groups unknown) when neither exists."""
    if (model_dir / "train" / cache.MANIFEST).is_file():
        return np.bincount(open_split(model_dir, "train").labels(), minlength=num_classes)
    from vlmcache.datasets import BENCHMARKS, load_dataset

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
) -> dict:
    dev = pick_device(device)
    model_dir = find_cache(cache_dir, dataset, model, pretrained, cache_key)
    dataset = model_dir.parent.name  # given, or the one cache's
    text = cache.read_text(model_dir / cache.TEXT_FILE)
    if templates not in text.sets:
        raise unknown_choice("template set (extract it with --templates)", templates, text.sets)
    weights = torch.from_numpy(text.sets[templates][1]).to(dev)  # (C, D), unit norm
    split = split or default_eval_split(model_dir)
    data = Pooled.load(open_split(model_dir, split), dev)
    counts = train_counts(model_dir, len(text.classnames), dataset)
    evaluator = Evaluator(counts, text.classnames)
    for x, y in data.chunks():
        evaluator.update(text.logit_scale * F.normalize(x, dim=-1) @ weights.T, y)
    metrics, table = evaluator.compute(many, few)
    return {
        "dataset": dataset,
        "cache": str(model_dir),
        "split": split,
        "templates": templates,
        "metrics": metrics,
        "per_class": table,
    }
