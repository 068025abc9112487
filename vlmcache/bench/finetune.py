"""Section 3c: fine-tuning against the bare forward, backward and optimiser step."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache.bench.common import sync, table, write_jpegs
from vlmcache.memory import keep_heap


def bench_finetune(model: str, images: int, batch_size: int, device: str = "auto") -> dict:
    """The better of `finetune`'s second and third epochs (JPEGs decoded and augmented by the loader; the
    checkpoint written after each is not counted) against the better of two bare passes (forward, backward and
    AdamW step of the same tower and head on as many images already in memory); the augmenting loader alone says
    whether decoding could bound it."""
    from vlmcache import handover
    from vlmcache.datasets import load_dataset
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import default_workers, probe_dims
    from vlmcache.finetune import finetune
    from vlmcache.finetune_config import FinetuneConfig
    from vlmcache.finetune_data import AugmentedRows, EpochBatches, training_loader
    from vlmcache.finetune_eval import TunedModel
    from vlmcache.heads import build_head

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_files = {"train": str(write_jpegs(root, images)), "test": str(write_jpegs(root, 8, seed=1, name="test"))}
        encoder = load_encoder(model, "none", device)
        if encoder.device.type == "cpu":
            keep_heap()  # as `vlmcache finetune` sets on a CPU, for both sides of the ratio (memory.keep_heap)
        head = build_head("linear", probe_dims(encoder, False)["pooled"], 10)
        net = TunedModel(encoder.model.visual.requires_grad_(True), head).to(encoder.device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        size = encoder.preprocess_cfg["size"]
        x = torch.randn(batch_size, 3, *((size, size) if isinstance(size, int) else size)).to(encoder.device)
        y = torch.randint(10, (batch_size,)).to(encoder.device)
        steps = -(-images // batch_size)

        def bare() -> float:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync(encoder.device)
            return steps * batch_size / (time.perf_counter() - t0)

        before = bare()
        cfg = FinetuneConfig(
            dataset="split", root=str(root), split_files=split_files, model=model, pretrained="none", epochs=3,
            batch_size=batch_size, device=device, runs_dir=str(root / "runs"),
        )  # fmt: skip
        result = finetune(cfg, log=lambda *a: None)
        passes = [before, bare()]
        split = load_dataset("split", str(root), split_files, None).split("train")
        rows = np.arange(len(split))
        batches = EpochBatches(batch_size)
        batches.set_epoch(1, rows, rows)
        part, finish = handover.cut(encoder.train_transform())  # as finetune's loader: uint8, finished on the device
        loader = training_loader(AugmentedRows(split, part, 0), batches, default_workers(), False)
        t0 = time.perf_counter()
        n = sum(len(handover.finished(b, encoder.device, finish)["rows"]) for b in loader)
        loader = n / (time.perf_counter() - t0)
    epochs = [h["samples_per_s"] for h in result["history"]]
    rate = max(epochs[1:])  # warm epochs, as the bare passes are; best of two, as the bare passes are
    return {
        "model": model,
        "device": result["cost"]["device"],
        "precision": result["cost"]["precision"],
        "images": images,
        "batch_size": batch_size,
        "finetune_images_per_s": rate,
        "epochs_images_per_s": epochs,
        "bare_passes_images_per_s": [round(p, 2) for p in passes],
        "bare_images_per_s": round(max(passes), 2),
        "ratio": round(rate / max(passes), 3),
        "loader_images_per_s": round(loader, 1),
        "tuned_params": result["cost"]["tuned_tower_params"],
    }


def markdown(r: dict) -> list[str]:
    ft = r.get("finetune")
    if not ft:
        return []
    row = {
        "model": ft["model"],
        "device": ft["device"],
        "precision": ft["precision"],
        "finetune img/s": ft["finetune_images_per_s"],
        "bare img/s": f"{ft['bare_images_per_s']} (passes: {', '.join(map(str, ft['bare_passes_images_per_s']))})",
        "ratio": ft["ratio"],
        "loader img/s": ft["loader_images_per_s"],
    }
    return [
        "## 3c. Fine-tuning against the bare forward and backward",
        "",
        f"The better of the second and third `finetune` epochs ({ft['images']} JPEGs, random resized crop and flip in "
        f"{ft['batch_size']}-image batches, the whole tower and a linear head: {ft['tuned_params']:,} tower "
        f"parameters) against the same model's bare forward, backward and AdamW step on tensors in memory "
        f"(best of two passes).",
        "",
        table([row]),
        "",
        "The loader's workers are started once per run and kept across epochs. Forked anew each epoch, as they "
        "were until 2026-12-01, they shared the trainer's memory copy-on-write, and while they lived every page "
        "that a training step writes (weights, gradients, AdamW's state, the activations' heap) was copied first: "
        "ViT-B-16 trained at 1.2 to 1.4 img/s beside two idle forked workers against 1.9 without them or with "
        "forkserver workers (batches of 8 on this CPU), and this figure was 0.69 to 0.73. Kept, they cost that "
        "in the first epoch alone, which the figure leaves out (it takes the second and third).",
    ]
