"""A fine-tuned tower and head: the model, its evaluation (after training, or again from a run folder as
`vlmcache eval RUN` does) and a new cache extracted with its tuned weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmcache import handover, runs
from vlmcache.datasets import Split
from vlmcache.encoders import Encoder, load_encoder, pick_precision
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.finetune_config import FinetuneConfig
from vlmcache.finetune_data import finetune_dataset
from vlmcache.heads import build_head, upgrade_head_file
from vlmcache.image_rows import ImageRows, image_loader
from vlmcache.metrics import Evaluator
from vlmcache.stage2 import logit_adjusted, tau_normalized

# --------------------------------------------------------------------------- the model


class TunedModel(nn.Module):
    """The open_clip image tower followed by a head on its pooled, projected embedding."""

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual, self.head = visual, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


# --------------------------------------------------------------------------- evaluation


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, split: Split, encoder: Encoder, counts, classnames, cfg, precision, logit_adjust=None):
    model.eval()
    evaluator = Evaluator(counts, classnames)
    log_prior = None
    if logit_adjust is not None:
        c = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
        log_prior = (c / c.sum()).log().float().to(encoder.device)
    part, finish = handover.cut(encoder.preprocess)  # uint8 from the workers, finished on the device
    data = ImageRows(split.source, np.arange(len(split)), part)
    skipped = 0
    for batch in image_loader(data, cfg.batch_size * 2, cfg.workers, encoder.device.type == "cuda"):
        skipped += len(batch["bad"])
        if batch["images"] is None:
            continue
        x = handover.finished(batch, encoder.device, finish)["images"].to(encoder.device, non_blocking=True)
        with autocast(encoder.device, precision):
            logits = model(x).float()
        if log_prior is not None:
            logits = logit_adjusted(logits, log_prior, logit_adjust)
        evaluator.update(logits, torch.from_numpy(split.labels[batch["rows"].numpy()]).to(encoder.device))
    metrics, table = evaluator.compute(cfg.many, cfg.few)
    return metrics, table, skipped


def _preprocess_tag(cfg: FinetuneConfig) -> str | None:
    """The pretrained tag whose preprocessing (and QuickGELU) the tuned weights file must be loaded with."""
    base = cfg.pretrained if cfg.pretrained and not Path(cfg.pretrained).is_file() else cfg.preprocess_from
    return None if base in (None, "none", "random") else base


def evaluate_finetuned(
    run_dir: str | Path,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    split: str | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate a finished fine-tuning run again (its tuned tower and head), as `vlmcache eval RUN` does."""
    run_dir = Path(run_dir)
    meta, cfg = runs.read_config(run_dir, FinetuneConfig)
    try:
        cfg.resolve()
    except VlmcacheError as e:
        raise VlmcacheError(f"'{run_dir}/config.json': {e}") from None
    if cfg.tail_blocks:
        raise VlmcacheError(
            f"'{run_dir}' is a finetune --tail-blocks run: its metrics.json holds its evaluation, and evaluating it "
            f"again is not supported yet (its tuned tail is in head.pt)."
        )
    weights = run_dir / Path(str(meta.get("weights"))).name  # the tuned tower lives in the run folder, by name
    if not weights.is_file():
        raise VlmcacheError(f"'{run_dir}' has no tuned weights '{weights.name}'; is it a finished fine-tuning run?")
    dataset = finetune_dataset(cfg)
    eval_split = dataset.split(split or meta["eval_split"])
    encoder = load_encoder(cfg.model, str(weights), device, "fp32", _preprocess_tag(cfg))
    saved = upgrade_head_file(runs.load_head_file(run_dir, encoder.device))
    if saved["num_classes"] != dataset.num_classes or len(meta["train_counts"]) != dataset.num_classes:
        raise VlmcacheError(
            f"'{run_dir}/head.pt' is a head for {saved['num_classes']} classes; "
            f"{cfg.dataset} has {dataset.num_classes}."
        )
    try:
        head = build_head(saved["head"], saved["in_dim"], saved["num_classes"], **saved["head_params"])
        head.load_state_dict(saved["head_state"])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise VlmcacheError(f"The weights in '{run_dir}/head.pt' do not fit this vlmcache's heads: {e}") from None
    if tau_norm is not None:
        if cfg.head != "linear":
            raise VlmcacheError("--tau-norm applies to a linear classifier (cosine weights are unit norm).")
        head.classifier = tau_normalized(head.classifier, tau_norm)
    model = TunedModel(encoder.model.visual, head).to(encoder.device)
    counts = np.asarray(meta["train_counts"])
    # many/medium/few are the training split's counts: recorded, and checked against the split they came from (a
    # config.json edited or copied beside other data would regroup the classes silently)
    actual = np.bincount(dataset.split(cfg.train_split).labels, minlength=dataset.num_classes)
    if not np.array_equal(counts, actual):
        c = int(np.flatnonzero(counts != actual)[0])
        raise VlmcacheError(
            f"'{run_dir}/config.json' records {int(counts[c])} training images for class {c}, but the training "
            f"split '{cfg.train_split}' of {cfg.dataset} has {int(actual[c])}; the run was trained on other data."
        )
    precision = pick_precision(cfg.precision, encoder.device)
    metrics, _, _ = evaluate(model, eval_split, encoder, counts, dataset.classnames, cfg, precision, logit_adjust)
    return {
        "run": str(run_dir),
        "split": eval_split.name,
        "tau_norm": tau_norm,
        "logit_adjust": logit_adjust,
        "metrics": metrics,
    }


def reextract(cfg: FinetuneConfig, weights: Path, log=print) -> dict:
    """A new cache of every split from the tuned tower (a new key: its fingerprint holds the file's sha256)."""
    ecfg = ExtractConfig(
        dataset=cfg.dataset,
        root=cfg.root,
        split_files=cfg.split_files,
        classnames_file=cfg.classnames_file,
        holdout=cfg.holdout,
        seed=cfg.holdout_seed,
        model=cfg.model,
        pretrained=str(weights),
        preprocess_from=_preprocess_tag(cfg),
        cache_dir=cfg.cache_dir,
        workers=cfg.workers,
        tokens=cfg.reextract_tokens,
        device=cfg.device,
    )
    summary = run_extract(ecfg, log=log)
    return {"path": summary["cache"], "key": summary["key"]}
