"""The class-text file `<cache_dir>/<dataset>/<key>/text.h5`: class names and, per template set, the (C, D)
class-text embeddings and the model's logit scale; written atomically, read back checked, verified."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmcache.atomic import h5_image, write_bytes_atomic
from vlmcache.cache import MANIFEST, open_h5, read_manifest
from vlmcache.errors import VlmcacheError

TEXT_FILE = "text.h5"


@dataclass
class TextCache:
    fingerprint: dict
    classnames: list[str]
    sets: dict[str, tuple[list[str], np.ndarray]]  # name -> (templates, (C, D) float32 unit-norm embeddings)
    logit_scale: float  # the model's exp(logit_scale): zero-shot logits are logit_scale * cos(image, text)


def write_text(path: Path, text: TextCache) -> None:
    """Write text.h5 atomically: one group per template set with its templates and (C, D) embeddings."""

    def build(f: h5py.File) -> None:
        f.attrs["fingerprint"] = json.dumps(text.fingerprint)
        f.attrs["logit_scale"] = text.logit_scale
        f.create_dataset("classnames", data=np.array(text.classnames, dtype=h5py.string_dtype()))
        for name, (templates, emb) in text.sets.items():
            g = f.create_group(name)
            # fletcher32, as shards have: a changed byte in the embeddings fails the read (and `cache verify`)
            g.create_dataset("embeddings", data=emb.astype(np.float32), fletcher32=emb.size > 0)
            g.create_dataset("templates", data=np.array(templates, dtype=h5py.string_dtype()))

    embeddings = sum(len(emb) * emb.shape[-1] * 4 for _, emb in text.sets.values())
    write_bytes_atomic(path, h5_image(build, expected=embeddings + (1 << 20)))


def text_sets(path: Path) -> list[str]:
    """The template sets whose class-text embeddings text.h5 holds (none when it is missing or unreadable, or
    holds class names only, as an imported cache's does)."""
    if not path.is_file():
        return []
    try:
        with open_h5(path) as f:
            return sorted(name for name, g in f.items() if isinstance(g, h5py.Group))
    except (VlmcacheError, OSError):
        return []


def read_text(path: Path) -> TextCache:
    """text.h5, checked: class names are strings, each set's embeddings a finite (classes, D) array with one row
    per class name, the logit scale positive and finite."""
    if not path.is_file():
        raise VlmcacheError(f"No class-text embeddings at '{path}'; run `vlmcache extract` first.")

    def strings(ds) -> list[str]:
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "OSU":
            raise ValueError(f"'{ds.name}' is not a list of strings")
        return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]

    with open_h5(path) as f:
        if "logit_scale" not in f.attrs or "fingerprint" not in f.attrs:
            raise VlmcacheError(
                f"'{path}' was written by an older vlmcache; extract again with --overwrite to rewrite it."
            )
        try:
            fingerprint = json.loads(f.attrs["fingerprint"])
            logit_scale = float(f.attrs["logit_scale"])
            classnames = strings(f["classnames"])
            sets = {}
            for name, g in f.items():
                if not isinstance(g, h5py.Group):
                    continue
                emb = g["embeddings"][()]
                if emb.ndim != 2 or emb.shape[0] != len(classnames) or emb.dtype.kind != "f":
                    raise ValueError(f"{name}/embeddings has shape {emb.shape}, not ({len(classnames)}, D)")
                if not np.isfinite(emb).all():
                    raise ValueError(f"{name}/embeddings holds NaN or inf")
                sets[name] = (strings(g["templates"]), emb)
        except (KeyError, ValueError, TypeError, OSError, json.JSONDecodeError) as e:
            raise VlmcacheError(
                f"'{path}' is not a valid class-text file ({e}); extract again with --overwrite to rewrite it."
            ) from None
    imported = isinstance(fingerprint, dict) and "imported_from" in fingerprint  # class names only: no texts
    if (
        not isinstance(fingerprint, dict)
        or not (np.isfinite(logit_scale) and logit_scale > 0)
        or not (sets or imported)
    ):
        raise VlmcacheError(f"'{path}' is not a valid class-text file (fingerprint, logit_scale or template sets).")
    return TextCache(fingerprint, classnames, sets, logit_scale)


def verify_text(model_dir: Path) -> list[str]:
    """text.h5 checked as `read_text` checks it when a run opens it (schema, shapes, finite embeddings, a positive
    logit scale), and its class names against every split's class count; one line per problem. The file records
    no sha256 of its own: its schema, and the HDF5 parse that a changed byte in its structure fails, are what is
    checked."""
    path = model_dir / TEXT_FILE
    splits = sorted(p for p in model_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
    if not path.exists():
        return [f"{path}: missing (class names and zero-shot texts are read from it)"] if splits else []
    try:
        text = read_text(path)
    except VlmcacheError as e:
        return [f"{path}: {e}"]
    problems = []
    for split_dir in splits:
        try:
            manifest = read_manifest(split_dir)
        except VlmcacheError:
            continue  # verify_split names it
        classes = manifest["fingerprint"]["num_classes"]
        if classes != len(text.classnames):
            problems.append(
                f"{path}: {len(text.classnames)} class names, the split '{split_dir.name}' has {classes} classes"
            )
    return problems
