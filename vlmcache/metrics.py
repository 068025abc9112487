"""Long-tailed evaluation: overall and many / medium / few-shot accuracy, top-5, mean per-class accuracy.

Group accuracies follow Liu et al. (2019): the mean of per-class accuracies over the classes with more than
`many` training images (many), fewer than `few` (few), and the rest (medium). Logits are reduced to top-k
predictions chunk by chunk, so that 8,142 classes never need a dense per-class matrix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def shot_groups(train_class_counts, many: int = 100, few: int = 20) -> np.ndarray:
    """'many', 'medium' or 'few' for each class, from its number of training images."""
    counts = _as_numpy(train_class_counts)
    if counts.dtype.kind == "f" and np.isnan(counts).any():  # training counts unknown
        return np.full(len(counts), "", dtype=object)
    return np.where(counts > many, "many", np.where(counts < few, "few", "medium"))


def per_class_accuracy(preds, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) test samples per class."""
    preds, labels = _as_numpy(preds), _as_numpy(labels)
    total = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[preds == labels], minlength=num_classes)
    return correct, total


def shot_accuracy(logits_or_preds, labels, train_class_counts, many: int = 100, few: int = 20) -> dict:
    """`overall`, `many`, `medium`, `few` as fractions in [0, 1]; a group with no test classes is None."""
    x = _as_numpy(logits_or_preds)
    preds = x.argmax(1) if x.ndim == 2 else x
    labels = _as_numpy(labels)
    counts = _as_numpy(train_class_counts)
    correct, total = per_class_accuracy(preds, labels, len(counts))
    groups = shot_groups(counts, many, few)
    out = {"overall": float((preds == labels).mean()) if len(labels) else None}
    for g in ("many", "medium", "few"):
        sel = (groups == g) & (total > 0)
        out[g] = float((correct[sel] / total[sel]).mean()) if sel.any() else None
    return out


class Evaluator:
    """Accumulates top-k predictions from logits chunk by chunk, then computes every metric at once."""

    def __init__(self, train_class_counts, classnames: list[str] | None = None, k: int = 5, predictions=None):
        self.counts = _as_numpy(train_class_counts)
        self.classnames = classnames
        self.k = min(k, len(self.counts))
        self.top_k_means_something = len(self.counts) > k  # top-5 of 5 classes or fewer is always 1
        self.topk: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.predictions = predictions  # a predictions.PredictionWriter: each chunk's top-k, with its scores

    def update(self, logits: torch.Tensor, labels) -> None:
        """One chunk's scores (B, C). A class scored -inf is no prediction (kNN: a class that got no vote), so it
        never counts as a hit, however topk orders the ties it fills the top-k with."""
        top = logits.topk(self.k, dim=1)
        indices, values = _as_numpy(top.indices), _as_numpy(top.values.float())
        self.topk.append(np.where(np.isneginf(values), -1, indices))
        self.labels.append(_as_numpy(labels))
        if self.predictions is not None:
            self.predictions.write(indices, values, self.labels[-1])

    def compute(self, many: int = 100, few: int = 20) -> tuple[dict, pd.DataFrame]:
        topk, labels = np.concatenate(self.topk), np.concatenate(self.labels)
        preds = topk[:, 0]
        metrics = shot_accuracy(preds, labels, self.counts, many, few)
        correct, total = per_class_accuracy(preds, labels, len(self.counts))
        present = total > 0
        metrics["top5"] = float((topk == labels[:, None]).any(1).mean()) if self.top_k_means_something else None
        metrics["mean_per_class"] = float((correct[present] / total[present]).mean())
        metrics["test_images"] = int(len(labels))
        table = pd.DataFrame(
            {
                "class": np.arange(len(self.counts)),
                "name": self.classnames if self.classnames is not None else [""] * len(self.counts),
                "train_count": self.counts,
                "group": shot_groups(self.counts, many, few),
                "test_count": total,
                "correct": correct,
                "accuracy": np.where(present, correct / np.maximum(total, 1), np.nan),
            }
        )
        return metrics, table
