"""Section 3b: peak memory of a CoOp step over every class prompt, chunked and all at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vlmcache.bench.common import sync, table
from vlmcache.memory import peak_rss_mb


def bench_prompts(model: str, classes: tuple, chunk: int, unchunked: tuple, limit_mb: float) -> dict:
    """Peak memory of one CoOp step over every class prompt, chunked at each class count; all at once at small
    class counts (the slope per class), and at the smallest large count under an address-space limit."""
    chunked = [prompt_step_memory(model=model, classes=c, chunk=chunk) for c in classes]
    whole = [prompt_step_memory(model=model, classes=c, chunk=0) for c in unchunked]
    per_class = (whole[-1]["step_mb"] - whole[0]["step_mb"]) / (unchunked[-1] - unchunked[0])
    attempt = prompt_step_memory(limit_mb=limit_mb, model=model, classes=classes[1], chunk=0)
    return {
        "model": model,
        "class_chunk": chunk,
        "chunked": chunked,
        "unchunked": whole,
        "unchunked_mb_per_class": round(per_class, 2),
        "unchunked_estimate_mb": {str(c): round(whole[0]["step_mb"] + per_class * (c - unchunked[0])) for c in classes},
        "unchunked_attempt": {**attempt, "limit_mb": limit_mb},
    }


def prompt_step(model: str, classes: int, chunk: int, n_ctx: int = 16, batch: int = 256, device: str = "cpu") -> dict:
    """Memory and time of one CoOp training step (forward and backward over every class prompt), in this
    process: run it in a fresh one (`prompt_step_memory`). The peak is counted from just before the step."""
    from vlmcache.encoders import load_encoder
    from vlmcache.memory import current_rss_mb, reset_peak
    from vlmcache.prompts import CoOpHead

    enc = load_encoder(model, "none", device)
    dim = enc.model.text_projection.shape[1]
    names = [f"genus{i} species{i}" for i in range(classes)]  # about as many tokens as iNat's Latin names
    head = CoOpHead(dim, classes, n_ctx=n_ctx, class_chunk=chunk).to(enc.device)
    head.bind_text(enc.model, enc.tokenizer, names, 100.0)
    del enc.model.visual
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=gen).to(enc.device)
    y = torch.randint(classes, (batch,), generator=gen).to(enc.device)
    dev = enc.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = current_rss_mb()
        reset_peak()
    t0 = time.perf_counter()
    F.cross_entropy(head(x), y).backward()
    sync(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else peak_rss_mb()
    return {
        "model": model,
        "classes": classes,
        "class_chunk": chunk,
        "prompt_tokens": head.tokens.shape[1],
        "memory": "GPU allocated" if dev.type == "cuda" else "RSS",
        "base_mb": round(base, 1),
        "step_mb": round(peak - base, 1),
        "step_seconds": round(seconds, 2),
    }


_PROMPT_STEP = """
import json, sys
from vlmcache.bench.prompts import prompt_step
print(json.dumps(prompt_step(**json.loads(sys.argv[1]))))
"""


def prompt_step_memory(limit_mb: float | None = None, **kw) -> dict:
    """`prompt_step` in a fresh process; with `limit_mb` (address space) a step that needs more fails cleanly."""
    pre = None
    if limit_mb:
        import resource

        def pre():
            resource.setrlimit(resource.RLIMIT_AS, (int(limit_mb * 2**20),) * 2)

    res = subprocess.run(
        [sys.executable, "-c", _PROMPT_STEP, json.dumps(kw)], capture_output=True, text=True, preexec_fn=pre
    )
    if res.returncode:
        return {**kw, "failed": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(r: dict) -> list[str]:
    p = r["prompts"]
    a = p["unchunked_attempt"]
    measured = {w["classes"]: w["step_mb"] for w in p["unchunked"]}
    rows = [
        {
            "classes": c["classes"],
            "prompt tokens": c["prompt_tokens"],
            "chunked MB": c["step_mb"],
            "chunked step s": c["step_seconds"],
            "all at once MB": measured.get(c["classes"])
            or f"~{p['unchunked_estimate_mb'][str(c['classes'])]:,} (estimate)",
        }
        for c in p["chunked"]
    ]
    return [
        f"## 3b. Prompt tuning memory ({p['model']} text tower, one CoOp step over every class prompt)",
        "",
        f"Extra peak memory of one training step (forward and backward, batch 256), in a fresh process; chunks of "
        f"{p['class_chunk']} classes under gradient checkpointing against all classes at once. Chunked, the peak "
        f"is one chunk's activations (set by `class_chunk`) plus a small (classes x D) output.",
        "",
        table(rows),
        "",
        f"All at once, measured at {', '.join(str(w['classes']) for w in p['unchunked'])} classes: "
        f"{', '.join(str(w['step_mb']) for w in p['unchunked'])} MB, {p['unchunked_mb_per_class']} MB per class; "
        f"the estimates above extend that line. {a['classes']:,} classes at once under a {a['limit_mb']:,.0f} MB "
        f"address-space limit: " + (f"failed ({a['failed']})." if "failed" in a else f"{a['step_mb']} MB."),
    ]
