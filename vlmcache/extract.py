"""Stage 1: run the frozen encoders once over a dataset and write the HDF5 cache."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from vlmcache import atomic, cache, distributed, guard, handover, text_cache
from vlmcache.choices import default_workers  # noqa: F401 (re-exported: streaming, bench)
from vlmcache.device_decode import DeviceDecoder, EncodedRows, collate_encoded
from vlmcache.encoders import Encoder, load_encoder, math_mode
from vlmcache.errors import VlmcacheError
from vlmcache.extract_config import (  # noqa: F401 (re-exported: the config and its checks live without torch)
    DECODE_MODES,
    NAME_RE,
    ExtractConfig,
    cache_name,
    check_images_reachable,
    load_extract_dataset,
    prepare,
)
from vlmcache.image_rows import ImageRows, collate, image_loader
from vlmcache.memory import peak_rss_mb
from vlmcache.shard_writer import Publisher, ShardBuffer, ShardWriter, add_batch, build, encode_batch
from vlmcache.splits import Dataset, Split
from vlmcache.templates import get_templates
from vlmcache.templates import template_sets as known_template_sets

TOKEN_TAP = "visual.transformer output, before ln_post (includes the class token)"
VIEW_SCALE = (0.08, 1.0)


# --------------------------------------------------------------------------- the job


def _split_fingerprint(encoder: Encoder, dataset: Dataset, split: Split, cfg: ExtractConfig) -> dict:
    views = cfg.views if split.name == "train" else 0
    return {
        "encoder": encoder.fingerprint,
        "dataset": dataset.name,
        "split": split.name,
        "split_sha256": split.sha256,
        "n_rows": len(split),
        "num_classes": dataset.num_classes,
        "shard_size": cfg.shard_size,
        # float16 rounding of the outputs depends on the batch and the device's math: a resume must not mix them
        "batch_size": cfg.batch_size,
        **math_mode(encoder.device),
        "dtype": "float16",
        "tokens": cfg.tokens,
        "token_tap": TOKEN_TAP if cfg.tokens else None,
        "views": views,
        "view_tokens": bool(views and cfg.tokens),  # the views' token sequences too, for the decoder
        "view_seed": cfg.view_seed if views else None,
        "view_scale": list(VIEW_SCALE) if views else None,
        "view_flip": True if views else None,  # views made before the flip existed do not resume into this
        # only when asked, so that every cache made before prefixes existed keeps its fingerprint
        **(_prefix_fingerprint(cfg.tail_blocks, views) if cfg.tail_blocks else {}),
    }


def _prefix_fingerprint(k: int, views: int) -> dict:
    from vlmcache.tail import PREFIX_TAP

    return {"tail_blocks": k, "prefix_tap": PREFIX_TAP, "view_prefix": bool(views)}


def _prepare_split_dir(split_dir: Path, fingerprint: dict, cfg: ExtractConfig, log) -> dict | None:
    """The manifest to resume from, or None to start fresh. Refuses a mismatched fingerprint.

    What is done is decided from the manifest and the files' sizes; `cfg.verify` also re-hashes them.
    """
    if cfg.overwrite and split_dir.is_dir():  # only its own files: run_extract refused anything else inside, and
        guard.remove_split_files(split_dir)  # a damaged manifest is replaced too, never read
    manifest = cache.read_manifest(split_dir) if split_dir.is_dir() else None
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        raise VlmcacheError(
            f"The cache at '{split_dir}' was made with other settings, so resuming would mix them: "
            f"{cache.describe_diff(manifest['fingerprint'], fingerprint)}. "
            f"Pass --overwrite to start this split again, or --cache-dir for a separate cache."  # demo.OTHER_SETTINGS
        )
    split_dir.mkdir(parents=True, exist_ok=True)
    for p in atomic.remove_stale_tmp(split_dir):
        log(f"removed a leftover temporary file: {p.name}")
    if manifest is None:
        return None
    kept = []
    for entry in manifest["shards"]:
        path = split_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            log(f"shard {entry['file']} is missing or has the wrong size; it will be extracted again")
        elif cfg.verify and atomic.sha256_file(path) != entry["sha256"]:
            log(f"shard {entry['file']} differs from its sha256; it will be extracted again")
        else:
            kept.append(entry)
    manifest["shards"] = kept
    return manifest


def use_decode(source, encoder: Encoder, mode: str) -> None:
    """Set how a split's image source decodes (`draft`: JPEGs at a reduced DCT scale, no smaller than the
    encoder's input size on either side)."""
    if hasattr(source, "draft"):
        size = encoder.preprocess_cfg["size"]
        source.draft = ((size, size) if isinstance(size, int) else tuple(size)) if mode == "draft" else None


def check_device_decode(cfg: ExtractConfig, encoder: Encoder) -> None:
    """--decode gpu needs the plain eval transform (augmented views are made on the CPU), a preprocessing it can
    reproduce on the device, and a CUDA encoder."""
    if cfg.views:
        raise VlmcacheError(
            "--decode gpu makes the eval transform only; --views are cropped on the CPU: use --decode pil."
        )
    DeviceDecoder(encoder.preprocess_cfg, encoder.device)  # refuses a preprocessing it cannot reproduce
    if encoder.device.type != "cuda":
        raise VlmcacheError(
            f"--decode gpu decodes JPEGs on a CUDA device (nvJPEG); this run's device is {encoder.device}. Use "
            f"--decode pil (the reference) or --decode draft on a CPU."
        )


def _shard_rows(shards: list[int], size: int, n: int) -> int:
    return sum(min((i + 1) * size, n) - i * size for i in shards)


def extract_split(
    encoder: Encoder, dataset: Dataset, split: Split, cfg: ExtractConfig, split_dir: Path, progress=None, log=print
) -> dict:
    """Extract one split into `split_dir`, resuming from its manifest. Returns the split's summary.

    Under torchrun, rank r takes every world-th unfinished shard (global row ranges), so every row is
    extracted exactly once whatever the world size, and a resume may use another one.
    """
    rank, world = distributed.rank_world()
    fingerprint = _split_fingerprint(encoder, dataset, split, cfg)
    n, size = len(split), cfg.shard_size
    n_shards = (n + size - 1) // size
    manifest = _open_manifest(encoder, split, cfg, split_dir, fingerprint, n_shards, log)
    done = {e["index"] for e in manifest["shards"]}
    todo = [i for i in range(n_shards) if i not in done]
    mine = todo[rank::world]
    t0 = time.perf_counter()
    publisher = Publisher(split_dir, manifest)
    if progress is not None and rank == 0:
        if world == 1:
            progress.start(split.name, total=n, completed=n - _shard_rows(todo, size, n))
        else:
            progress.start(f"{split.name} (rank 0 of {world})", total=_shard_rows(mine, size, n))

    if fingerprint["view_tokens"] and rank == 0 and todo:
        t, w = manifest["dims"]["tokens"]
        gb = n * fingerprint["views"] * t * w * 2 / 1e9
        log(f"note: caching the tokens of {fingerprint['views']} views per training image takes about {gb:,.1f} GB.")
    if cfg.tail_blocks and rank == 0 and todo:
        t, w = manifest["dims"]["prefix"]
        nbytes = n * (1 + fingerprint["views"]) * t * w * 2
        amount = f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.1f} MB"
        log(f"note: the prefix of {cfg.tail_blocks} tail block(s), {t} x {w} float16 per image and view, takes about "
            f"{amount} for the {split.name} split.")  # fmt: skip
    on_device = None  # --decode gpu: the workers read the files, the device decodes and resizes
    if mine:
        use_decode(split.source, encoder, cfg.decode)
        rows = np.concatenate([np.arange(i * size, min((i + 1) * size, n)) for i in mine])
        views = fingerprint["views"]
        if cfg.decode == "gpu":
            on_device = DeviceDecoder(encoder.preprocess_cfg, encoder.device)
            data, collate_fn = EncodedRows(split.source, rows), collate_encoded
        else:  # the workers hand over uint8 images, made float and normalised on the encoder's device
            transform, finish = handover.cut(encoder.preprocess)
            view_transform, finish_views = handover.cut(encoder.train_transform(VIEW_SCALE)) if views else (None, None)
            data = ImageRows(split.source, rows, transform, views, view_transform, cfg.view_seed)
            collate_fn = collate
        loader = image_loader(data, cfg.batch_size, cfg.workers, encoder.device.type == "cuda", collate_fn)
        buffers: dict[int, ShardBuffer] = {}
        writer = ShardWriter(lambda buf: build(buf, split, split_dir, manifest["dims"], cfg), publisher)

        def file_batch(batch: dict, outputs: Callable[[], dict]) -> None:
            """A batch whose encoding is done (or waited for here) into its shards; full shards to the writer."""
            add_batch(buffers, batch, outputs(), split, size, n)
            for index in sorted(i for i, b in buffers.items() if b.full):
                writer.submit(buffers.pop(index))
            writer.publish_ready()
            if progress is not None and rank == 0:
                progress.advance(len(batch["rows"]) + len(batch["bad"]))

        try:  # batch k+1 is queued on the device before batch k's outputs are waited for
            pending = None
            for batch in loader:
                if on_device is not None:
                    batch = on_device(batch)
                else:
                    batch = handover.finished(batch, encoder.device, finish, finish_views)
                outputs = encode_batch(encoder, batch, cfg.tokens, cfg.tail_blocks)
                if pending is not None:
                    file_batch(*pending)
                pending = (batch, outputs)
            if pending is not None:
                file_batch(*pending)
            writer.drain()
        finally:
            writer.close()
        if buffers:  # cannot happen unless the loader lost rows; never publish a partial shard
            raise RuntimeError(f"rows missing from shards {sorted(buffers)} of {split_dir}")
    publisher.finish(-(-len(todo) // world))

    if rank == 0:
        manifest["complete"] = len(manifest["shards"]) == n_shards
        atomic.write_json_atomic(split_dir / cache.MANIFEST, manifest)
    distributed.barrier()
    manifest = cache.read_manifest(split_dir)
    if manifest["complete"] and not any(e["rows"] for e in manifest["shards"]):
        raise VlmcacheError(f"The {split.name} split of {dataset.name} has no rows: {cache.empty_reason(manifest)}")
    seconds = time.perf_counter() - t0
    return {
        "split": split.name,
        "rows": sum(e["rows"] for e in manifest["shards"]),
        "skipped": sum(len(e["skipped"]) for e in manifest["shards"]),
        "shards": n_shards,
        "resumed_shards": n_shards - len(todo),
        "bytes": sum(e["bytes"] for e in manifest["shards"]),
        "seconds": round(seconds, 3),
        "images_per_s": round(_shard_rows(todo, size, n) / seconds, 1) if todo and seconds > 0 else None,
        "path": str(split_dir),
        **({"cpu_decoded": on_device.cpu_decoded} if on_device is not None else {}),
    }


def _open_manifest(
    encoder: Encoder, split: Split, cfg: ExtractConfig, split_dir: Path, fingerprint: dict, n_shards: int, log
) -> dict:
    """The split's manifest, to resume from or new. Rank 0 prepares the folder; every rank gets the manifest, or
    the error."""
    state = None
    if distributed.rank_world()[0] == 0:
        try:
            manifest = _prepare_split_dir(split_dir, fingerprint, cfg, log)
            fresh = manifest is None
            if fresh:
                manifest = {
                    "format": cache.FORMAT,
                    "fingerprint": fingerprint,
                    "origin": split.origin,
                    "n_rows": len(split),
                    "n_shards": n_shards,
                    "complete": False,
                    "dims": probe_dims(encoder, cfg.tokens, cfg.tail_blocks),
                    "shards": [],
                }
            # how to make this split again: `cache verify --repair` re-extracts damaged shards with it
            manifest["extract_config"] = {**asdict(cfg), "splits": [split.name], "overwrite": False}
            if fresh:  # before the first shard: a folder of shards without a manifest is never one of ours
                atomic.write_json_atomic(split_dir / cache.MANIFEST, manifest)
            state = ("ok", manifest)
        except VlmcacheError as e:
            state = ("error", str(e))
    state = distributed.broadcast(state)
    if state[0] == "error":
        raise VlmcacheError(state[1])
    return state[1]


def probe_dims(encoder: Encoder, tokens: bool, prefix: int = 0) -> dict:
    """Output shapes from one blank image, so that a shard of only skipped rows still has typed datasets; with
    `prefix` K, also the prefix's (T, W)."""
    size = encoder.preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else size
    if prefix:
        pooled, tok, pre = encoder.encode_with_prefix(torch.zeros(1, 3, h, w), tokens, prefix)
    else:
        pooled, tok = encoder.encode_images(torch.zeros(1, 3, h, w), tokens=tokens)
    dims = {"pooled": pooled.shape[1], "tokens": list(tok.shape[1:]) if tok is not None else None}
    return {**dims, "prefix": list(pre.shape[1:])} if prefix else dims


def check_text_file(model_dir: Path, overwrite: bool) -> None:
    """Before any work: an existing `<model_dir>/text.h5` that cannot be read is someone else's file or a damaged
    one of ours; it is replaced only with --overwrite, never silently."""
    path = model_dir / text_cache.TEXT_FILE
    if overwrite or not path.is_file():
        return
    try:
        text_cache.read_text(path)
    except VlmcacheError as e:
        raise VlmcacheError(f"{e} It is kept; pass --overwrite to replace it (never without).") from None


def extract_text(
    encoder: Encoder, dataset: Dataset, template_sets: list[str], model_dir: Path, log=print, overwrite: bool = False
) -> Path:
    """Class-text embeddings for each template set, in `<model_dir>/text.h5` (kept sets are reused). An unreadable
    text.h5 is rewritten only with `overwrite` (`check_text_file` refused it before any work otherwise)."""
    path = model_dir / text_cache.TEXT_FILE
    fingerprint = {"encoder": encoder.fingerprint, "dataset": dataset.name}
    sets = {}
    old = None
    if path.is_file():
        try:
            old = text_cache.read_text(path)
        except VlmcacheError as e:
            if not overwrite:
                raise
            log(f"{e} Rewriting it (--overwrite).")
    if old is not None:
        if old.fingerprint == fingerprint and old.classnames == dataset.classnames:
            # keep sets whose templates are unchanged; a renamed or edited set is encoded again
            known = known_template_sets()
            sets = {k: v for k, v in old.sets.items() if k in known and v[0] == known[k]}
    missing = [t for t in template_sets if t not in sets]
    if not missing:
        return path
    for name in missing:
        templates = get_templates(name)
        sets[name] = (templates, encoder.encode_classnames(dataset.classnames, templates).cpu().numpy())
    logit_scale = float(encoder.model.logit_scale.exp()) if hasattr(encoder.model, "logit_scale") else 100.0
    text_cache.write_text(path, text_cache.TextCache(fingerprint, dataset.classnames, sets, logit_scale))
    return path


def run_extract(
    cfg: ExtractConfig, progress=None, log=print, model_dir: Path | None = None, prepared: tuple | None = None
) -> dict:
    """Extract every requested split and the class-text embeddings. Returns a summary dict.

    `model_dir` (repair) names the `<dataset>/<key>` folder to write into; by default it is made from
    `cfg.cache_dir`, the dataset and the encoder's key. Either way each split's fingerprint must match.
    `prepared`: what `prepare(cfg)` returned, when the caller checked the inputs before importing torch."""
    dataset, splits = prepared if prepared is not None else prepare(cfg)
    cfg.validate()
    distributed.init_from_env()
    rank, world = distributed.rank_world()
    device = distributed.local_device(cfg.device)
    encoder = load_encoder(
        cfg.model, cfg.pretrained, device, cfg.precision, cfg.preprocess_from, preprocess_mode=cfg.preprocess
    )
    if cfg.decode == "gpu":
        check_device_decode(cfg, encoder)
    if cfg.decode != "pil":  # its numbers differ: a cache (a key) of its own, as another preprocessing would be
        encoder.fingerprint = {**encoder.fingerprint, "decode": cfg.decode}
    if cfg.decode == "gpu":  # torchvision's decoder and resize
        import torchvision

        encoder.fingerprint["torchvision"] = torchvision.__version__
    if cfg.tokens and not encoder.supports_tokens:
        raise VlmcacheError(
            f"--tokens needs a ViT image tower (open_clip VisionTransformer); {cfg.model} has "
            f"{type(encoder.model.visual).__name__}. Extract pooled features only, or pick a ViT model."
        )
    if cfg.tail_blocks:
        from vlmcache.tail import check_tail_blocks

        check_tail_blocks(encoder.model.visual, cfg.tail_blocks, cfg.model)
    model_dir = Path(model_dir) if model_dir is not None else Path(cfg.cache_dir) / dataset.name / encoder.key
    if rank == 0:
        if encoder.note:  # a weights file's QuickGELU is the tag's too: said, not decided silently
            log(f"note: {encoder.note}")
        _note_siblings(model_dir, encoder, log)
    guard.check_cache_folders(model_dir, splits, "extract", cfg.overwrite)  # before any work: nothing written yet
    check_text_file(model_dir, cfg.overwrite)
    t0 = time.perf_counter()
    results = [extract_split(encoder, dataset, dataset.splits[s], cfg, model_dir / s, progress, log) for s in splits]
    text_path = extract_text(encoder, dataset, cfg.templates, model_dir, log, cfg.overwrite) if rank == 0 else None
    peak = distributed.gather(peak_rss_mb())
    distributed.barrier()
    return {
        "dataset": dataset.name,
        "key": encoder.key,
        "cache": str(model_dir),
        "model": cfg.model,
        "pretrained": encoder.fingerprint["pretrained"],
        "device": str(encoder.device),
        "precision": encoder.precision,
        "processes": world,
        "rank": rank,
        "peak_rss_mb": peak,  # per process, rank 0 first (on rank 0 only under torchrun)
        "splits": results,
        "text": {"path": str(text_path or model_dir / text_cache.TEXT_FILE), "template_sets": cfg.templates},
        "seconds": round(time.perf_counter() - t0, 3),
        "notes": dataset.notes,
        "config": asdict(cfg),
    }


def repair_split(split_dir: Path, root: str | None = None, log=print) -> list[str]:
    """Extract the damaged or missing shards of one split again, into this split folder and nowhere else.

    The split's own settings come from its manifest (validated like every field there); the images come from
    `root` when given (they moved), else from where extraction found them. Nothing is deleted until the images
    and the split definition are found to be the ones the cache was made from.
    """
    split_dir = Path(split_dir)
    manifest = cache.read_manifest(split_dir)
    if manifest is None:
        raise VlmcacheError(f"No manifest in '{split_dir}'; nothing to repair.")
    damaged = cache.damaged_shards(split_dir, manifest)
    if not damaged and manifest.get("complete"):
        return []
    cfg = _recorded_config(split_dir, manifest, root)
    dataset = load_extract_dataset(cfg)
    if split_dir.name not in dataset.splits:
        raise VlmcacheError(f"'{split_dir}': {cfg.dataset} has no split '{split_dir.name}' to extract again.")
    try:
        check_images_reachable(dataset, [split_dir.name])
    except VlmcacheError as e:
        raise VlmcacheError(f"Cannot repair '{split_dir}': {e} Pass the images' folder with --root.") from None
    if dataset.splits[split_dir.name].sha256 != manifest["fingerprint"].get("split_sha256"):
        raise VlmcacheError(
            f"Cannot repair '{split_dir}': the split definition found now ({dataset.splits[split_dir.name].origin}) "
            f"differs from the one the cache was made from (sha256)."
        )
    for name in damaged:  # bare shard names (the manifest's schema refuses anything else): inside split_dir
        (split_dir / name).unlink(missing_ok=True)
        log(f"repairing {split_dir / name}: {damaged[name]}")
    manifest["shards"] = [e for e in manifest["shards"] if e["file"] not in damaged]
    manifest["complete"] = False
    atomic.write_json_atomic(split_dir / cache.MANIFEST, manifest)
    run_extract(cfg, log=log, model_dir=split_dir.parent)
    return sorted(damaged)


def _recorded_config(split_dir: Path, manifest: dict, root: str | None) -> ExtractConfig:
    """The ExtractConfig a manifest records, typed and checked; it extracts only this split, into this cache."""
    from pydantic import TypeAdapter, ValidationError

    from vlmcache.schemas import describe

    recorded = manifest.get("extract_config")
    if str(manifest.get("origin", "")).startswith("import:"):
        raise VlmcacheError(
            f"'{split_dir}' was imported ({manifest['origin']}), not extracted: there is nothing to re-extract. "
            f"Import it again with `vlmcache import ... --overwrite`."
        )
    if not recorded:
        raise VlmcacheError(f"'{split_dir}' does not record how it was extracted; re-extract it with --overwrite.")
    unknown = sorted(set(recorded) - {f.name for f in fields(ExtractConfig)})
    if unknown:
        raise VlmcacheError(f"'{split_dir}/{cache.MANIFEST}': extract_config has unknown keys {unknown}.")
    try:
        cfg = TypeAdapter(ExtractConfig).validate_python(recorded)
    except ValidationError as e:
        raise VlmcacheError(f"'{split_dir}/{cache.MANIFEST}': extract_config.{describe(e)}.") from None
    if "name" not in recorded:  # made before --name: the folder it lives in is its name
        cfg.name = split_dir.parent.parent.name
    cfg.splits, cfg.overwrite, cfg.verify = [split_dir.name], False, False
    cfg.cache_dir = str(split_dir.parent.parent.parent)
    if root is not None:
        cfg.root = str(root)
    return cfg


def _note_siblings(model_dir: Path, encoder: Encoder, log) -> None:
    """Say why a new key was made when a cache of the same model and weights exists with other settings."""
    prefix = model_dir.name.rsplit("__", 1)[0] + "__"
    if model_dir.exists() or not model_dir.parent.is_dir():
        return
    for other in sorted(model_dir.parent.glob(prefix + "*")):
        for split_dir in sorted(p for p in other.iterdir() if p.is_dir()):
            m = cache.read_manifest(split_dir)
            if m:
                log(
                    f"note: {other.name} caches {encoder.name} with other settings "
                    f"({cache.describe_diff(m['fingerprint']['encoder'], encoder.fingerprint)}); writing a new cache."
                )
                break
