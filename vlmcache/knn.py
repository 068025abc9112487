"""k-nearest-neighbour classification over cached training features (cosine similarity; faiss, or torch on a GPU).

Each of the k neighbours votes exp(similarity / temperature) for its class; with `balanced`, a class's votes
are divided by its number of training images. Votes become probabilities, which can be blended with a
trained run's softmax: p = (1 - w) * p_head + w * p_knn. A class that got no vote has probability 0 and log
probability -inf: it is in no top-k (and shows as -inf in --save-predictions' topk_scores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache import guard, text_cache
from vlmcache.encoders import pick_device
from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.features import Pooled, default_eval_split, find_cache, load_inputs, open_split
from vlmcache.metrics import Evaluator
from vlmcache.predictions import PredictionWriter

INDEXES = ("auto", "faiss", "torch")


class TorchIndex:
    """Exact inner-product search with torch on the features' device: what faiss's IndexFlatIP computes (every
    training row scored, the k best kept), over chunks of the training rows with a running top-k. On a CUDA GPU
    this is the GPU kNN: `pip install 'vlmcache[gpu]'` needs no faiss-gpu, which installs the same `faiss` module
    as faiss-cpu so that one package would silently shadow the other."""

    def __init__(self, train: np.ndarray, device: torch.device, chunk: int = 65536):
        self.train, self.chunk = torch.from_numpy(train).to(device), chunk

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(q).to(self.train.device)
        best_s = torch.empty(len(q), 0, device=q.device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        for lo in range(0, len(self.train), self.chunk):
            s = q @ self.train[lo : lo + self.chunk].T
            top = s.topk(min(k, s.shape[1]), dim=1)
            cand_s, cand_i = torch.cat([best_s, top.values], 1), torch.cat([best_i, top.indices + lo], 1)
            keep = cand_s.topk(min(k, cand_s.shape[1]), dim=1).indices
            best_s, best_i = cand_s.gather(1, keep), cand_i.gather(1, keep)
        return best_s.cpu().numpy(), best_i.cpu().numpy()


def build_index(train: np.ndarray, device: torch.device, index: str = "auto") -> tuple[object, str]:
    """An exact inner-product index over unit-norm rows, and what it is. `auto`: faiss's GPU index when a faiss
    with GPUs is installed and the device is CUDA, torch's search on a CUDA device otherwise, faiss on the CPU."""
    if index not in INDEXES:
        raise unknown_choice("--index", index, INDEXES)
    import faiss

    faiss_gpus = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if index == "torch" or (index == "auto" and device.type == "cuda" and not faiss_gpus):
        return TorchIndex(train, device), f"torch exact inner product on {device}"
    flat = faiss.IndexFlatIP(train.shape[1])
    where = "CPU"
    if faiss_gpus and device.type == "cuda":
        flat, where = faiss.index_cpu_to_all_gpus(flat), f"{faiss.get_num_gpus()} GPU(s)"
    flat.add(train)
    return flat, f"faiss {faiss.__version__} IndexFlatIP on {where}"


def knn_probs(
    sims: torch.Tensor,
    ids: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    temperature: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, k) similarities and neighbour ids -> (B, C) vote probabilities."""
    # shifted by each row's best similarity, which cancels in the normalisation: no overflow at a small
    # temperature, and the nearest neighbour's vote is 1, so a class with a vote never rounds to probability 0
    votes = torch.exp((sims - sims.max(1, keepdim=True).values) / temperature)
    scores = torch.zeros(len(sims), num_classes, dtype=votes.dtype, device=votes.device)
    scores.scatter_add_(1, train_labels[ids], votes)
    if class_weights is not None:
        scores = scores * class_weights
    return scores / scores.sum(1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def knn(
    cache_dir: str,
    dataset: str | None,
    model: str | None,
    pretrained: str | None,
    cache_key: str | None = None,
    k: int = 20,
    temperature: float = 0.07,
    balanced: bool = False,
    blend_run: str | None = None,
    blend_weight: float = 0.5,
    split: str | None = None,
    device: str = "auto",
    chunk: int = 1024,
    many: int = 100,
    few: int = 20,
    predictions: str | None = None,  # a parquet file for the per-image predictions
    index: str = "auto",  # INDEXES: faiss (CPU, or its GPU build) or torch's exact search on the device
    overwrite: bool = False,  # predictions may replace a predictions file vlmcache wrote
) -> dict:
    if predictions:  # the output guard, before any work
        guard.check_output(predictions, "--save-predictions", "predictions", overwrite)
    if k < 1:
        raise VlmcacheError(f"--k must be at least 1, got {k}.")
    if not temperature > 0:
        raise VlmcacheError(f"--temperature must be positive, got {temperature}.")
    if not 0 <= blend_weight <= 1:
        raise VlmcacheError(f"--blend-weight must be in [0, 1], got {blend_weight}.")
    dev = pick_device(device)
    model_dir = find_cache(cache_dir, dataset, model, pretrained, cache_key)
    dataset = model_dir.parent.name  # given, or the one cache's
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    train_split = open_split(model_dir, "train")
    num_classes = int(train_split.fingerprint["num_classes"])
    train = torch.from_numpy(train_split.load("pooled", np.float32))
    train = train.div_(train.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()  # F.normalize's, in place
    labels = torch.from_numpy(train_split.labels().astype(np.int64)).to(dev)
    counts = np.bincount(train_split.labels(), minlength=num_classes)
    if k > len(train):
        raise VlmcacheError(f"--k {k} is more than the {len(train)} cached training images.")
    index, index_name = build_index(np.ascontiguousarray(train), dev, index)
    class_weights = torch.from_numpy(1.0 / np.maximum(counts, 1)).float().to(dev) if balanced else None

    split = split or default_eval_split(model_dir)
    test = Pooled.load(open_split(model_dir, split), dev)
    head_chunks = None
    if blend_run is not None:
        from vlmcache.train import load_run

        run_cfg, run_model, _ = load_run(blend_run, dev)
        if run_cfg.dataset != dataset or (run_cfg.cache_key and run_cfg.cache_key != model_dir.name):
            raise VlmcacheError(
                f"The run '{blend_run}' was trained on {run_cfg.dataset}/{run_cfg.cache_key}, "
                f"not on {dataset}/{model_dir.name}."
            )
        run_model.eval()
        head_chunks = load_inputs(open_split(model_dir, split), run_cfg.head, dev, run_cfg.stream_tokens).chunks(chunk)

    def votes():  # each test chunk's log class probabilities from its neighbours (blended with a run's softmax)
        for x, y in test.chunks(chunk):
            q = F.normalize(x, dim=-1).float().cpu().numpy()
            sims, ids = index.search(np.ascontiguousarray(q), k)
            probs = knn_probs(
                torch.from_numpy(sims).to(dev),
                torch.from_numpy(ids).to(dev),
                labels,
                num_classes,
                temperature,
                class_weights,
            )
            if head_chunks is not None:
                hx, _ = next(head_chunks)
                probs = (1 - blend_weight) * torch.softmax(run_model(hx).float(), dim=1) + blend_weight * probs
            yield torch.log(probs), y  # -inf for a class that got no vote: never a top-k hit (metrics.Evaluator)

    writer = PredictionWriter(Path(predictions), open_split(model_dir, split), text.classnames) if predictions else None
    evaluator = Evaluator(counts, text.classnames, predictions=writer)
    try:
        for log_probs, y in votes():
            evaluator.update(log_probs, y)
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
        "k": k,
        "index": index_name,
        "temperature": temperature,
        "balanced": balanced,
        "blend_run": blend_run,
        "blend_weight": blend_weight if blend_run else None,
        "metrics": metrics,
        "per_class": table,
        **({"predictions": str(predictions)} if predictions else {}),
    }
