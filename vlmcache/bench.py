"""`vlmcache bench`: speed, memory and cache size, each figure next to its limit, both measured in one run.

- extraction: `extract` images/s over the bare encoder's images/s on the same batches (JPEG files, default
  loader workers); the loader alone says which of the two bounds it.
- stage-2 loop: `fit` samples/s over the same head's bare forward and backward on in-memory tensors; token
  streaming from HDF5 over a plain sequential read of the same file.
- cached against streaming: one epoch of `train-head` against `train-head --stream`, next to the limit
  (tower time + head time) / head time from the tower's bare passes and the cached epoch.
- prompt tuning: peak memory of a CoOp step over 1,000 to 8,142 class prompts, chunked and all at once.
- memory: peak RSS of train-head, zero-shot and kNN on a synthetic cache, each in a fresh process.
- cache size: bytes per image of pooled and tokens in float16, raw, gzip and blosc (hdf5plugin), and read speed.

Benchmarks are not tests: nothing here asserts a time. `--scale smoke` runs everything at toy sizes in seconds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmcache.errors import unknown_choice
from vlmcache.memory import peak_rss_mb


@dataclass(frozen=True)
class Scale:
    extract_models: tuple  # (model, images)
    loop_rows: int
    decoder_rows: int
    token_shape: tuple  # (T, W) of the decoder and token benchmarks
    token_rows: int
    epoch_rows: int  # one epoch of the linear head at this size (ImageNet-LT: 115,846)
    memory: tuple  # (rows, dim, classes, test rows) of the synthetic cache for the memory figures
    size_rows: int
    stream: tuple  # (model, images) of cached against --stream
    finetune: tuple  # (model, images, batch size)
    prompts: tuple  # (model, class counts, chunk, class counts all at once, address-space limit MB)


SCALES = {
    "smoke": Scale(
        (("vlmcache-tiny", 64),),
        2000,
        64,
        (17, 64),
        512,
        5000,
        (5000, 64, 100, 500),
        256,
        ("vlmcache-tiny", 64),
        ("vlmcache-tiny", 64, 32),
        ("vlmcache-tiny", (100, 400, 800), 50, (20, 40, 100), 8000),
    ),
    "default": Scale(
        (("vlmcache-tiny", 2000), ("ViT-B-16", 128)),
        20_000,
        512,
        (50, 768),
        4096,
        115_846,
        (115_846, 512, 1000, 20_000),
        2048,
        ("ViT-B-16", 128),
        ("ViT-B-16", 64, 32),
        ("ViT-B-16", (1000, 4000, 8142), 256, (50, 200, 1000), 16_000),
    ),
    "full": Scale(
        (("vlmcache-tiny", 2000), ("ViT-B-16", 256), ("ViT-L-14", 64)),
        20_000,
        512,
        (50, 768),
        8192,
        115_846,
        (437_513, 768, 8142, 24_426),
        4096,
        ("ViT-B-16", 256),
        ("ViT-B-16", 128, 32),
        ("ViT-B-16", (1000, 4000, 8142), 256, (50, 200, 1000), 16_000),
    ),
}


def machine() -> dict:
    import faiss
    import open_clip

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------- 1. extraction


def write_jpegs(root: Path, n: int, classes: int = 10, size=(500, 375), seed: int = 0, name: str = "train") -> Path:
    """n photo-sized JPEGs (smooth colour fields plus noise, so they compress and decode like photos)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    lines = []
    for i in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + k * c) for k in range(3)], -1) * 100 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img" / f"{name}{i:06d}.jpg", quality=90)
        lines.append(f"img/{name}{i:06d}.jpg {i % classes}")
    (root / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root / f"{name}.txt"


def bench_extraction(
    model: str, images: int, device: str = "auto", precision: str = "auto", batch_size: int = 64, tokens: bool = False
) -> dict:

    from vlmcache.datasets import read_split_file
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, ImageRows, default_workers, image_loader, run_extract
    from vlmcache.images import FileSource

    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images)
        cfg = ExtractConfig(
            dataset="split",
            name="split",
            root=str(root),
            split_files={"train": str(split_file)},
            model=model,
            pretrained="none",
            cache_dir=str(root / "cache"),
            batch_size=batch_size,
            workers=workers,
            tokens=tokens,
            device=device,
            precision=precision,
            templates=["photo"],
        )
        encoder = load_encoder(model, "none", device, precision)
        relpaths, _ = read_split_file(split_file)
        x = torch.stack([encoder.preprocess(Image.open(root / p).convert("RGB")) for p in relpaths])
        batches = list(torch.split(x, batch_size))

        def bare_encoder() -> float:
            encoder.encode_images(batches[0], tokens=tokens)  # warm-up
            _sync(encoder.device)
            t0 = time.perf_counter()
            for b in batches:
                pooled, tok = encoder.encode_images(b, tokens=tokens)
                pooled.cpu()
                if tok is not None:
                    tok.cpu()
            return len(x) / (time.perf_counter() - t0)

        # the ceiling is the best of two passes, one on each side of the extraction: identical passes on a
        # shared machine can differ by a fifth
        before = bare_encoder()
        summary = run_extract(cfg, log=lambda *a: None)
        split = summary["splits"][0]
        per_image = split["bytes"] / split["rows"]
        passes = [before, bare_encoder()]
        encoder_rate = max(passes)
        loader = image_loader(
            ImageRows(FileSource(root, relpaths), np.arange(len(relpaths)), encoder.preprocess), batch_size, workers
        )
        t0 = time.perf_counter()
        n = sum(len(b["rows"]) for b in loader)
        loader_rate = n / (time.perf_counter() - t0)
    rate = split["images_per_s"]
    return {
        "model": model,
        "pretrained": "none (random)",
        "device": summary["device"],
        "precision": summary["precision"],
        "images": images,
        "batch_size": batch_size,
        "workers": workers,
        "tokens": tokens,
        "extract_images_per_s": rate,
        "encoder_passes_images_per_s": [round(p, 1) for p in passes],
        "encoder_images_per_s": round(encoder_rate, 1),
        "ratio": round(rate / encoder_rate, 3),
        "goal": 0.9,
        "loader_images_per_s": round(loader_rate, 1),
        "bound_by": "encoder" if encoder_rate < loader_rate else "image decoding (the loader)",
        "cache_bytes_per_image": round(per_image, 1),
    }


def bench_streaming(model: str, images: int, device: str = "auto") -> list[dict]:
    """One epoch of `train-head` from the cache against `train-head --stream` (the tower on every step) on the
    same JPEGs, for the linear and the decoder head. The limit of the speed-up is (tower + head) / head, with the
    tower's time from its bare forward passes over the same images and the head's from the cached epoch."""
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, default_workers, run_extract
    from vlmcache.train import TrainConfig, train_head

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_jpegs(root, images)
        test_file = write_jpegs(root, max(8, images // 8), seed=1, name="test")
        common = dict(dataset="split", model=model, pretrained="none", cache_dir=str(root / "cache"), device=device)
        run_extract(
            ExtractConfig(
                **common,
                name="split",
                root=str(root),
                split_files={"train": str(split_file), "test": str(test_file)},
                tokens=True,
                templates=["photo"],
                workers=default_workers(),
            ),
            log=lambda *a: None,
        )
        encoder = load_encoder(model, "none", device)
        size = encoder.preprocess_cfg["size"]
        x = torch.randn(64, 3, *((size, size) if isinstance(size, int) else size))
        encoder.encode_images(x[:8])  # warm-up
        _sync(encoder.device)
        t0 = time.perf_counter()
        for _ in range(max(1, images // 64)):
            encoder.encode_images(x)[0].cpu()
        tower_per_image = (time.perf_counter() - t0) / (max(1, images // 64) * 64)
        del encoder
        for head, batch in (("linear", 256), ("decoder", 64)):
            epochs = {}
            for stream in (False, True):
                cfg = TrainConfig(
                    **common,
                    head=head,
                    epochs=1,
                    batch_size=batch,
                    stream=stream,
                    runs_dir=str(root / "runs"),
                    eval_split="test",
                )
                epochs[stream] = train_head(cfg, log=lambda *a: None)["history"][0]["seconds"]
            head_s = epochs[False]
            limit = (tower_per_image * images + head_s) / head_s
            out.append(
                {
                    "head": head,
                    "tower": model,
                    "images": images,
                    "cached_epoch_s": round(head_s, 3),
                    "stream_epoch_s": round(epochs[True], 3),
                    "tower_epoch_s": round(tower_per_image * images, 3),
                    "measured_speedup": round(epochs[True] / head_s, 1),
                    "limit_speedup": round(limit, 1),
                    "ratio": round(epochs[True] / head_s / limit, 3),
                }
            )
    return out


def bench_finetune(model: str, images: int, batch_size: int, device: str = "auto") -> dict:
    """The second of two `finetune` epochs (JPEGs decoded and augmented by the loader; the checkpoint written
    after each is not counted) against the bare forward, backward and AdamW step of the same tower and head on
    as many images already in memory; the augmenting loader alone says whether decoding could bound it."""
    from vlmcache.datasets import load_dataset
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import default_workers, image_loader, probe_dims
    from vlmcache.finetune import AugmentedRows, FinetuneConfig, TunedModel, finetune
    from vlmcache.heads import build_head

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_files = {"train": str(write_jpegs(root, images)), "test": str(write_jpegs(root, 8, seed=1, name="test"))}
        encoder = load_encoder(model, "none", device)
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
            _sync(encoder.device)
            return steps * batch_size / (time.perf_counter() - t0)

        before = bare()
        cfg = FinetuneConfig(
            dataset="split", root=str(root), split_files=split_files, model=model, pretrained="none", epochs=2,
            batch_size=batch_size, device=device, runs_dir=str(root / "runs"),
        )  # fmt: skip
        result = finetune(cfg, log=lambda *a: None)
        passes = [before, bare()]
        split = load_dataset("split", str(root), split_files, None).split("train")
        rows = np.arange(len(split))
        data = AugmentedRows(split, rows, rows, encoder.train_transform(), 0, 1)
        t0 = time.perf_counter()
        n = sum(len(b["rows"]) for b in image_loader(data, batch_size, default_workers()))
        loader = n / (time.perf_counter() - t0)
    rate = result["history"][-1]["samples_per_s"]  # the second epoch: warm, as the bare passes are
    return {
        "model": model,
        "device": result["cost"]["device"],
        "precision": result["cost"]["precision"],
        "images": images,
        "batch_size": batch_size,
        "finetune_images_per_s": rate,
        "bare_passes_images_per_s": [round(p, 2) for p in passes],
        "bare_images_per_s": round(max(passes), 2),
        "ratio": round(rate / max(passes), 3),
        "loader_images_per_s": round(loader, 1),
        "tuned_params": result["cost"]["tuned_tower_params"],
    }


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- 2. the stage-2 loop


def _bare(head, x, y, batch_size: int, epochs: int) -> float:
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(y), batch_size):
            loss = F.cross_entropy(head(x[i : i + batch_size]), y[i : i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    _sync(x.device)
    return epochs * len(y) / (time.perf_counter() - t0)


def _looped(head, data, batch_size: int, epochs: int, num_classes: int) -> float:
    from vlmcache.losses import build_loss
    from vlmcache.samplers import build_sampler
    from vlmcache.train import TrainConfig, fit

    cfg = TrainConfig(dataset="bench", epochs=epochs, batch_size=batch_size, lr=1e-3).resolve()
    loss = build_loss("ce", torch.bincount(data.y, minlength=num_classes).cpu().numpy()).to(data.y.device)
    t0 = time.perf_counter()
    fit(head, data, loss, build_sampler("instance", data.y), cfg, data.y.device)
    return epochs * len(data) / (time.perf_counter() - t0)


def bench_loop(name: str, make_head, data, x, batch_size: int, epochs: int, classes: int, repeats: int = 2) -> dict:
    """Interleaved runs, best of each side, so both see the same machine state."""
    loop, bare = [], []
    for _ in range(repeats):
        torch.manual_seed(0)
        bare.append(_bare(make_head(), x, data.y, batch_size, epochs))
        loop.append(_looped(make_head(), data, batch_size, epochs, classes))
    goal = 0.9 if name == "linear" else 0.8
    return {
        "head": name,
        "rows": len(data),
        "batch_size": batch_size,
        "loop_samples_per_s": round(max(loop), 1),
        "bare_samples_per_s": round(max(bare), 1),
        "ratio": round(max(loop) / max(bare), 3),
        "goal": goal,
    }


def bench_token_read(rows: int, shape: tuple, folder: Path, block_rows: int = 256) -> dict:
    """Streaming an epoch's tokens in shuffled blocks against one plain sequential pass over the same file."""
    from vlmcache import cache
    from vlmcache.features import Tokens
    from vlmcache.samplers import build_sampler

    split_dir = _synthetic_tokens(folder, rows, shape)
    split = cache.SplitCache(split_dir)
    t0 = time.perf_counter()
    for i in range(0, rows, 4096):
        split.read_tokens(i, min(i + 4096, rows))
    sequential = rows / (time.perf_counter() - t0)
    stream = Tokens(split, torch.device("cpu"), in_memory=False, block_rows=block_rows)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in stream.batches(build_sampler("instance", stream.y).epoch(gen), 256, gen))
    streamed = n / (time.perf_counter() - t0)
    mb = shape[0] * shape[1] * 2 / 2**20
    return {
        "rows": rows,
        "token_shape": list(shape),
        "block_rows": block_rows,
        "stream_rows_per_s": round(streamed, 1),
        "sequential_rows_per_s": round(sequential, 1),
        "stream_mb_per_s": round(streamed * mb, 1),
        "sequential_mb_per_s": round(sequential * mb, 1),
        "ratio": round(streamed / sequential, 3),
        "note": "warm page cache: the file was just written",
    }


def _synthetic_tokens(folder: Path, rows: int, shape: tuple, shard_size: int = 1024) -> Path:
    from vlmcache import cache

    rng = np.random.default_rng(0)
    return cache.write_arrays(
        folder / "synth" / "bench__random__00000000" / "train",
        rng.normal(size=(rows, shape[1])).astype(np.float16),
        np.arange(rows) % 10,
        {"num_classes": 10},
        rng.normal(size=(rows, *shape)).astype(np.float16),
        shard_size,
    )


# --------------------------------------------------------------------------- 4. memory


_MEASURE = """
import json, sys
from vlmcache.cli import app
from vlmcache.memory import peak_rss_mb
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), file=sys.stderr)
"""


def _peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one vlmcache command in a fresh process."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr[-2000:]}")
    return json.loads(res.stderr.strip().splitlines()[-1])["peak_rss_mb"], seconds


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
    _sync(dev)
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
from vlmcache.bench import prompt_step
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


def bench_memory(rows: int, dim: int, classes: int, test_rows: int, folder: Path) -> dict:
    """Peak RSS of train-head (one epoch, linear), zero-shot and kNN on an iNat-sized synthetic pooled cache."""
    from vlmcache import cache

    rng = np.random.default_rng(0)
    counts = np.maximum(2, (1000 * np.exp(-np.linspace(0, 6.2, classes)))).astype(int)  # a long tail, 1000 to 2
    labels = np.repeat(np.arange(classes), counts)
    labels = np.resize(labels, rows) if len(labels) < rows else labels[:rows]
    model_dir = folder / "split" / "vlmcache-tiny__random__00000000"
    for split, n, lab in (("train", rows, labels), ("test", test_rows, rng.integers(0, classes, test_rows))):
        fingerprint = {"num_classes": classes, "dataset": "split", "encoder": {"model": "bench"}}
        pooled = rng.normal(size=(n, dim)).astype(np.float16)
        cache.write_arrays(model_dir / split, pooled, lab, fingerprint, shard_size=65536)
    text = rng.normal(size=(classes, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    cache.write_text(
        model_dir / cache.TEXT_FILE,
        cache.TextCache({}, [f"c{i}" for i in range(classes)], {"photo": (["{}"], text)}, 100.0),
    )
    common = ["-d", "split", "-m", "vlmcache-tiny", "-p", "none", "--cache-dir", str(folder), "--json"]
    out = {
        "rows": rows,
        "dim": dim,
        "classes": classes,
        "test_rows": test_rows,
        "pooled_mb_float32": round(rows * dim * 4 / 2**20, 1),
    }
    for name, argv in (
        ("train_head_linear_1_epoch", ["train-head", *common, "--epochs", "1", "--runs-dir", str(folder / "runs")]),
        ("zero_shot", ["zero-shot", *common, "--templates", "photo"]),
        ("knn_k20", ["knn", *common, "--k", "20"]),
    ):
        rss, seconds = _peak_rss(argv)
        out[name] = {"peak_rss_mb": round(rss, 1), "seconds": round(seconds, 1)}
    return out


# --------------------------------------------------------------------------- 5. cache size


def bench_cache_size(rows: int, dim: int, token_shape: tuple, folder: Path) -> dict:
    """Bytes per image and sequential read speed of pooled and tokens, raw and compressed."""
    codecs = {"none": {}, "gzip-4": {"compression": "gzip", "compression_opts": 4}}
    try:
        import hdf5plugin

        codecs["blosc-lz4"] = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        codecs["blosc-zstd"] = dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    # CLIP-like values: float16 embeddings of modest range (random normals compress like real features do: poorly)
    arrays = {
        "pooled": (rng.normal(size=(rows, dim)) * 0.5).astype(np.float16),
        "tokens": (rng.normal(size=(rows, *token_shape)) * 0.5).astype(np.float16),
    }
    out = {"rows": rows, "pooled_dim": dim, "token_shape": list(token_shape), "codecs": {}}
    for codec, kw in codecs.items():
        row = {}
        for name, arr in arrays.items():
            path = folder / f"{codec}-{name}.h5"
            chunks = (1, *arr.shape[1:]) if name == "tokens" else (min(4096, rows), dim)
            t0 = time.perf_counter()
            with h5py.File(path, "w") as f:
                f.create_dataset(name, data=arr, chunks=chunks, **kw)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with h5py.File(path, "r") as f:
                f[name][()]
            read_s = time.perf_counter() - t0
            row[name] = {
                "bytes_per_image": round(path.stat().st_size / rows, 1),
                "read_mb_per_s": round(arr.nbytes / 2**20 / read_s, 1),
                "write_mb_per_s": round(arr.nbytes / 2**20 / write_s, 1),
            }
        out["codecs"][codec] = row
    return out


# --------------------------------------------------------------------------- the suite


def run_bench(scale: str = "default", device: str = "auto", log=print) -> dict:
    if scale not in SCALES:
        raise unknown_choice("scale", scale, SCALES)
    s = SCALES[scale]
    from vlmcache.features import Pooled
    from vlmcache.heads import build_head

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    results = {"scale": scale, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    log("extraction ...")
    results["extraction"] = [bench_extraction(m, n, device=str(dev)) for m, n in s.extract_models]
    results["extraction"].append(
        bench_extraction(s.extract_models[-1][0], max(16, s.extract_models[-1][1] // 2), device=str(dev), tokens=True)
    )
    log("stage-2 loop ...")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.loop_rows, 512, generator=g).to(dev)
    y = torch.randint(0, 1000, (s.loop_rows,), generator=g).to(dev)
    linear = bench_loop("linear", lambda: build_head("linear", 512, 1000).to(dev), Pooled(x, y), x, 256, 2, 1000)
    t, w = s.token_shape
    xt = torch.randn(s.decoder_rows, t, w, generator=g).to(dev)
    yt = torch.randint(0, 1000, (s.decoder_rows,), generator=g).to(dev)
    # tokens held in memory are gathered by index exactly as pooled rows are
    decoder = bench_loop("decoder", lambda: build_head("decoder", w, 1000).to(dev), Pooled(xt, yt), xt, 64, 1, 1000)
    decoder["token_shape"] = [t, w]
    results["loop"] = [linear, decoder]
    xe = torch.randn(s.epoch_rows, 512, generator=g).to(dev)
    ye = torch.randint(0, 1000, (s.epoch_rows,), generator=g).to(dev)
    t0 = time.perf_counter()
    _looped(build_head("linear", 512, 1000).to(dev), Pooled(xe, ye), 256, 1, 1000)
    results["epoch"] = {
        "rows": s.epoch_rows,
        "dim": 512,
        "classes": 1000,
        "head": "linear",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        log("token reads ...")
        results["token_read"] = bench_token_read(s.token_rows, s.token_shape, Path(tmp) / "tokens")
        log("memory ...")
        results["memory"] = bench_memory(*s.memory, Path(tmp) / "memory")
        log("cache size ...")
        (Path(tmp) / "size").mkdir()
        results["cache_size"] = bench_cache_size(s.size_rows, 512, s.token_shape, Path(tmp) / "size")
    log("cached against streaming ...")
    results["cached_vs_streaming"] = bench_streaming(*s.stream, device=str(dev))
    log("fine-tuning ...")
    results["finetune"] = bench_finetune(*s.finetune, device=str(dev))
    log("prompt tuning memory ...")
    model, classes, chunk, whole, limit = s.prompts
    results["prompts"] = bench_prompts(model, classes, chunk, whole, limit)
    return results


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def to_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# vlmcache benchmarks",
        "",
        f"Measured by `vlmcache bench --scale {r['scale']}` on {r['date']}. Each figure stands next to its "
        "limit, both measured in the same run. Random weights everywhere (speed does not depend on them).",
        "",
        "## Machine",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}, "
        f"GPU: {m['gpu'] or 'none'}. Python {m['python']}, torch {m['torch']}, open_clip {m['open_clip']}, "
        f"h5py {m['h5py']} (HDF5 {m['hdf5']}), faiss {m['faiss']}, numpy {m['numpy']}.",
        "",
        "## 1. Extraction against the bare encoder (goal: ratio at least 0.9)",
        "",
        _row(
            [
                "model",
                "device",
                "precision",
                "tokens",
                "extract img/s",
                "encoder img/s",
                "ratio",
                "loader img/s",
                "bound by",
                "cache B/img",
            ]
        ),
        _row(["---"] * 10),
    ]
    for e in r["extraction"]:
        lines.append(
            _row(
                [
                    e["model"],
                    e["device"],
                    e["precision"],
                    e["tokens"],
                    e["extract_images_per_s"],
                    e["encoder_images_per_s"],
                    e["ratio"],
                    e["loader_images_per_s"],
                    e["bound_by"],
                    e["cache_bytes_per_image"],
                ]
            )
        )
    lines += [
        "",
        "The loader is the same DataLoader without the encoder: where it is slower than the encoder, JPEG "
        "decoding and resizing bound extraction, and the ratio to the encoder says little.",
        "",
        "On a CPU with glibc's default malloc, a ViT forward pass page-faults its large activation buffers afresh "
        "each time, and how often depends on the process's history: identical encoder passes differ by up to a "
        "fifth, and extraction may meet the slow state while the ceiling met the fast one. With "
        "`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967295`, ViT-B-16 extraction reached 5.0 img/s against a "
        "bare 5.09 / 5.14 (0.98; README, Benchmarks).",
        "",
        "## 2. Stage-2 loop against the bare forward and backward (goals: 0.9 pooled, 0.8 tokens)",
        "",
        _row(["head", "rows", "batch", "loop samples/s", "bare samples/s", "ratio", "goal"]),
        _row(["---"] * 7),
    ]
    for lp in r["loop"]:
        lines.append(
            _row(
                [
                    lp["head"] + (f" (tokens {lp['token_shape']})" if "token_shape" in lp else ""),
                    lp["rows"],
                    lp["batch_size"],
                    lp["loop_samples_per_s"],
                    lp["bare_samples_per_s"],
                    lp["ratio"],
                    lp["goal"],
                ]
            )
        )
    e = r["epoch"]
    t = r["token_read"]
    sized = " (ImageNet-LT's size)" if e["rows"] == 115_846 else ""
    lines += [
        "",
        f"One epoch of the linear head on a pooled set of {e['rows']:,} x {e['dim']}{sized}, "
        f"{e['classes']:,} classes: {e['seconds']} s.",
        "",
        f"Token streaming ({t['rows']:,} rows of {t['token_shape']}, blocks of {t['block_rows']}, shuffled "
        f"windows): {t['stream_mb_per_s']} MB/s against a plain sequential read's {t['sequential_mb_per_s']} "
        f"MB/s, ratio {t['ratio']} ({t['note']}).",
        "",
        "## 3. Cached against streaming",
        "",
        "One epoch of `train-head` from the cache against `train-head --stream` (the frozen tower on every step, "
        "as the seed's code does) on the same JPEGs and the same seed. Limit: (tower + head) / head, the tower's "
        "time from its bare forward passes over as many images, the head's from the cached epoch.",
        "",
        _row(["head", "tower", "images", "cached epoch s", "stream epoch s", "speed-up", "limit", "ratio"]),
        _row(["---"] * 8),
    ]
    for c in r["cached_vs_streaming"]:
        lines.append(
            _row(
                [
                    c["head"],
                    c["tower"],
                    c["images"],
                    c["cached_epoch_s"],
                    c["stream_epoch_s"],
                    f"{c['measured_speedup']}x",
                    f"{c['limit_speedup']}x",
                    c["ratio"],
                ]
            )
        )
    per_image = {c["head"]: c["cached_epoch_s"] / c["images"] * 1000 for c in r["cached_vs_streaming"]}
    tower_ms = r["cached_vs_streaming"][0]["tower_epoch_s"] / r["cached_vs_streaming"][0]["images"] * 1000
    lines += [
        "",
        f"Per image: the tower {tower_ms:.1f} ms, "
        + ", ".join(f"the {h} head {ms:.3f} ms" for h, ms in per_image.items())
        + ". A ratio above 1: streaming also decodes and resizes every image, which the limit leaves out. "
        f"At ImageNet-LT's 115,846 training images a streamed epoch costs about "
        f"{tower_ms * 115_846 / 3.6e6:.1f} h of tower time on this machine, every epoch of every run.",
    ]
    p = r["prompts"]
    a = p["unchunked_attempt"]
    lines += [
        "",
        f"## 3b. Prompt tuning memory ({p['model']} text tower, one CoOp step over every class prompt)",
        "",
        f"Extra peak memory of one training step (forward and backward, batch 256), in a fresh process; chunks of "
        f"{p['class_chunk']} classes under gradient checkpointing against all classes at once. Chunked, the peak "
        f"is one chunk's activations (set by `class_chunk`) plus a small (classes x D) output.",
        "",
        _row(["classes", "prompt tokens", "chunked MB", "chunked step s", "all at once MB"]),
        _row(["---"] * 5),
    ]
    measured = {w["classes"]: w["step_mb"] for w in p["unchunked"]}
    for c in p["chunked"]:
        at_once = measured.get(c["classes"]) or f"~{p['unchunked_estimate_mb'][str(c['classes'])]:,} (estimate)"
        lines.append(_row([c["classes"], c["prompt_tokens"], c["step_mb"], c["step_seconds"], at_once]))
    lines += [
        "",
        f"All at once, measured at {', '.join(str(w['classes']) for w in p['unchunked'])} classes: "
        f"{', '.join(str(w['step_mb']) for w in p['unchunked'])} MB, {p['unchunked_mb_per_class']} MB per class; "
        f"the estimates above extend that line. {a['classes']:,} classes at once under a {a['limit_mb']:,.0f} MB "
        f"address-space limit: " + (f"failed ({a['failed']})." if "failed" in a else f"{a['step_mb']} MB."),
    ]
    ft = r.get("finetune")
    if ft:
        lines += [
            "",
            "## 3c. Fine-tuning against the bare forward and backward",
            "",
            f"The second of two `finetune` epochs ({ft['images']} JPEGs, random resized crop and flip in "
            f"{ft['batch_size']}-image batches, the whole tower and a linear head: {ft['tuned_params']:,} tower "
            f"parameters) against the same model's bare forward, backward and AdamW step on tensors in memory "
            f"(best of two passes).",
            "",
            _row(["model", "device", "precision", "finetune img/s", "bare img/s", "ratio", "loader img/s"]),
            _row(["---"] * 7),
            _row(
                [
                    ft["model"],
                    ft["device"],
                    ft["precision"],
                    ft["finetune_images_per_s"],
                    f"{ft['bare_images_per_s']} (passes: {', '.join(map(str, ft['bare_passes_images_per_s']))})",
                    ft["ratio"],
                    ft["loader_images_per_s"],
                ]
            ),
            "",
            "Identical bare passes differ by up to a fifth on a shared CPU; a profile of `finetune` (py-spy) puts "
            "about 95% of an epoch in forward, backward and the optimizer step, the rest mostly waiting for the "
            "first batch of each epoch.",
        ]
    mem = r["memory"]
    lines += [
        "",
        f"## 4. Memory (synthetic pooled cache: {mem['rows']:,} x {mem['dim']}, {mem['classes']:,} classes, "
        f"{mem['test_rows']:,} test rows; {mem['pooled_mb_float32']} MB as float32)",
        "",
        _row(["command", "peak RSS (MB)", "seconds"]),
        _row(["---"] * 3),
    ]
    for name in ("train_head_linear_1_epoch", "zero_shot", "knn_k20"):
        lines.append(_row([name.replace("_", " "), mem[name]["peak_rss_mb"], mem[name]["seconds"]]))
    cs = r["cache_size"]
    lines += [
        "",
        f"## 5. Cache size and read speed ({cs['rows']:,} rows; pooled {cs['pooled_dim']}, tokens "
        f"{cs['token_shape']}, float16)",
        "",
        _row(["codec", "pooled B/img", "pooled read MB/s", "tokens B/img", "tokens read MB/s", "tokens write MB/s"]),
        _row(["---"] * 6),
    ]
    for codec, row in cs["codecs"].items():
        lines.append(
            _row(
                [
                    codec,
                    row["pooled"]["bytes_per_image"],
                    row["pooled"]["read_mb_per_s"],
                    row["tokens"]["bytes_per_image"],
                    row["tokens"]["read_mb_per_s"],
                    row["tokens"]["write_mb_per_s"],
                ]
            )
        )
    lines += [
        "",
        "The data are random normals in float16, a lower bound on what compression saves: real embeddings "
        "may compress somewhat better. The cache stores them raw, for read speed.",
        "",
        "## 6. GPU",
        "",
    ]
    if m["gpu"]:
        lines.append("The extraction rows above ran on the GPU.")
    else:
        lines.append(
            "Not measured: no GPU on this machine. Open rows: ViT-B-16 and ViT-L-14 extraction at fp16 and "
            "bf16 with CPU JPEG decoding (and torchvision.io.decode_jpeg on the device), each against the "
            "encoder-only ceiling; `finetune` under bf16 autocast, with and without gradient checkpointing, against "
            "the bare step; cached against `--stream` and prompt-tuning memory (allocated GPU memory) on the GPU. "
            "`vlmcache bench` fills them on a GPU machine."
        )
    return "\n".join(lines) + "\n"
