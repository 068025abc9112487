"""Stage 2's training loop against its limit: `fit` samples/s over the same head's bare forward and backward.

    python benchmarks/train_loop.py                  # linear (pooled) and decoder (tokens), plus one
                                                     # ImageNet-LT-sized epoch (115,846 x 512, 1,000 classes)

Both sides run in this process on the same in-memory tensors, head, loss (CE), optimizer (AdamW) and batch
size. The bare side steps through contiguous slices with nothing else; `fit` adds what training needs: the
sampler's permutation, gathering rows by index, the learning-rate schedule and loss bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vlmcache.features import Pooled
from vlmcache.heads import build_head
from vlmcache.losses import build_loss
from vlmcache.samplers import build_sampler
from vlmcache.train import TrainConfig, fit


def bare(head, x, y, batch_size: int, epochs: int) -> float:
    """Samples/s of forward, loss, backward and optimizer step alone, on contiguous slices."""
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(y), batch_size):
            loss = F.cross_entropy(head(x[i : i + batch_size]), y[i : i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return epochs * len(y) / (time.perf_counter() - t0)


def looped(head, x, y, batch_size: int, epochs: int, num_classes: int) -> float:
    data = Pooled(x, y)  # `fit` needs only .batches and len; tokens in memory index the same way
    cfg = TrainConfig(dataset="bench", epochs=epochs, batch_size=batch_size, lr=1e-3).resolve()
    loss = build_loss("ce", torch.bincount(y, minlength=num_classes).cpu().numpy())
    t0 = time.perf_counter()
    fit(head, data, loss, build_sampler("instance", y), cfg, x.device)
    return epochs * len(y) / (time.perf_counter() - t0)


def measure(name: str, make_head, x, y, batch_size: int, epochs: int, num_classes: int, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    loop_rates, bare_rates = [], []
    for _ in range(repeats):  # interleaved, best of each, so that both see the same machine state
        bare_rates.append(bare(make_head(), x, y, batch_size, epochs))
        loop_rates.append(looped(make_head(), x, y, batch_size, epochs, num_classes))
    return {
        "head": name,
        "n": len(y),
        "batch_size": batch_size,
        "loop_samples_per_s": round(max(loop_rates), 1),
        "bare_samples_per_s": round(max(bare_rates), 1),
        "ratio": round(max(loop_rates) / max(bare_rates), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=50, help="token sequence length T (ViT-B-32 at 224: 50)")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--skip-epoch", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    results = {"device": str(dev), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}

    n, d, c = 20_000, 512, 1000
    x, y = torch.randn(n, d, generator=g).to(dev), torch.randint(0, c, (n,), generator=g).to(dev)
    results["linear"] = measure("linear", lambda: build_head("linear", d, c).to(dev), x, y, 256, 2, c)

    n_tok = 512 if dev.type == "cpu" else 8192
    xt = torch.randn(n_tok, args.tokens, args.width, generator=g).to(dev)
    yt = torch.randint(0, c, (n_tok,), generator=g).to(dev)
    results["decoder"] = measure(
        "decoder", lambda: build_head("decoder", args.width, c).to(dev), xt, yt, 64, 1, c, repeats=2
    )
    results["decoder"]["token_shape"] = [args.tokens, args.width]

    if not args.skip_epoch:
        n, d, c = 115_846, 512, 1000  # ImageNet-LT train, ViT-B pooled width
        x, y = torch.randn(n, d, generator=g).to(dev), torch.randint(0, c, (n,), generator=g).to(dev)
        head = build_head("linear", d, c).to(dev)
        t0 = time.perf_counter()
        looped(head, x, y, 256, 1, c)
        results["imagenet_lt_epoch"] = {
            "n": n,
            "dim": d,
            "classes": c,
            "batch_size": 256,
            "head": "linear",
            "seconds": round(time.perf_counter() - t0, 3),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
