"""Run folders: where outputs may go, how a finished run is published, and reading one back through its schemas.

A run folder holds config.json, metrics.json (written last: a folder with it is finished), per_class.csv and
head.pt. train-head builds the folder under a temporary name beside its final one and renames it into place
when every file is written, so `--overwrite` replaces a finished run only once the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

from vlmcache import guard
from vlmcache.errors import VlmcacheError


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """A folder that can be made and written (`guard.check_creatable`); kept for callers that check only that."""
    return guard.check_creatable(Path(path), option)


def run_folder(out: str | None, runs_dir: str, run_name: str, overwrite: bool) -> Path:
    """A run's folder (`--out`, else `--runs-dir`/its name), checked by the output guard before any work:
    creatable, not inside a cache or run, not someone else's folder (a run of ours resumes), and not a finished
    run unless --overwrite."""
    if out:
        run_dir = guard.check_output(out, "--out", "run", overwrite, reuse=True)
    else:
        guard.check_output(runs_dir, "--runs-dir", "runs")
        run_dir = Path(runs_dir) / guard.check_name(run_name, "The run name")
        guard.check_output(run_dir, "--runs-dir", "run", overwrite, reuse=True)
    if (run_dir / "metrics.json").is_file() and not overwrite:
        same = "" if out else " (same settings: a run's name is a hash of them)"  # --out names any folder
        raise VlmcacheError(f"The run '{run_dir}' exists already{same}; pass --overwrite to run it again.")
    return run_dir


def staging_dir(run_dir: Path) -> Path:
    """The temporary folder a run is built in, beside its final place (the same file system, so rename works);
    a new one each time (`guard.staging_folder`), so nothing already there is removed."""
    return guard.staging_folder(run_dir)


def publish_run(staging: Path, run_dir: Path) -> None:
    """Move a complete run folder into place; an older run there is removed only after the new one is in."""
    guard.publish_folder(staging, run_dir)


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlmcacheError(f"'{path}' is missing; the folder is not a finished {what}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise VlmcacheError(f"'{path}' is not valid JSON ({e}).") from None


def read_kind(run_dir: Path) -> str:
    """'head' (train-head) or 'finetune', from config.json."""
    meta = read_json(Path(run_dir) / "config.json", "run")
    if not isinstance(meta, dict):
        raise VlmcacheError(f"'{run_dir}/config.json' is not a vlmcache run config (not a JSON object).")
    kind = meta.get("kind", "head")
    if kind not in RUN_KINDS:
        raise VlmcacheError(f"'{run_dir}/config.json': kind must be 'head' or 'finetune', got {kind!r}.")
    return kind


# What evaluates a run folder of each kind (config.json's "kind"), named by import path: this module sits below
# the training modules, so it imports the one a run needs only when it evaluates one.
RUN_KINDS = {"head": "vlmcache.train:evaluate_run", "finetune": "vlmcache.finetune_eval:evaluate_finetuned"}


def check_post_hoc(tau_norm: float | None, logit_adjust: float | None) -> None:
    from vlmcache import schemas

    for name, value in (("--tau-norm", tau_norm), ("--logit-adjust", logit_adjust)):
        if value is not None and not schemas.finite(value):
            raise VlmcacheError(f"{name} must be a finite number, got {value}.")


def evaluate_run(
    run_dir: str | Path,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    split: str | None = None,
    device: str = "auto",
    save_predictions: bool = False,
) -> dict:
    """Evaluate a saved run of any kind again (`vlmcache eval`), optionally with post-hoc corrections and
    (train-head runs) the per-image predictions written to the run folder."""
    import importlib

    check_post_hoc(tau_norm, logit_adjust)
    kind = read_kind(Path(run_dir))
    module, name = RUN_KINDS[kind].split(":")
    if save_predictions and kind != "head":
        raise VlmcacheError(
            "--save-predictions: train-head runs write per-image predictions; fine-tuning runs not yet."
        )
    if save_predictions:  # the run's own predictions.parquet: replaced by each evaluation that saves them
        guard.check_output(Path(run_dir) / "predictions.parquet", "--save-predictions", "predictions", True, run_dir)
    extra = {"save_predictions": True} if save_predictions else {}
    return getattr(importlib.import_module(module), name)(run_dir, tau_norm, logit_adjust, split, device, **extra)


def read_config(run_dir: Path, config_type: type) -> tuple[dict, object]:
    """config.json checked against its schema: (the whole dict, its `config` as a `config_type`)."""
    from vlmcache import schemas

    path = Path(run_dir) / "config.json"
    return schemas.check_run_config(read_json(path, "run"), path, config_type)


def read_metrics(run_dir: Path) -> dict:
    from vlmcache import schemas

    path = Path(run_dir) / "metrics.json"
    return schemas.check_metrics(read_json(path, "run"), path)


def load_head_file(run_dir: Path, device) -> dict:
    import torch

    from vlmcache import schemas

    path = Path(run_dir) / "head.pt"
    if not path.is_file():
        raise VlmcacheError(f"'{run_dir}' is not a finished run (head.pt is missing).")
    try:  # weights_only: a run folder from elsewhere cannot run code when it is loaded
        saved = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache head (refused to load it: {e}).") from None
    return schemas.check_head_file(saved, path)


# --------------------------------------------------------------------------- run identity

# Where a run's outputs and inputs live, and how it ran, but not what it computes: never part of its identity.
NOT_IDENTITY = {
    "seed",
    "runs_dir",
    "out",
    "overwrite",
    "device",
    "cache_dir",
    "workers",
    "root",
    "from_run",
    "reextract",
    "reextract_tokens",
    "save_predictions",
    "log",
}


def method_label(config: dict, kind: str = "head") -> str:
    """`linear + focal + instance [+ crt]`, `finetune-last + linear + ce + instance`: the method's short name."""
    parts = [config.get("head"), config.get("loss"), config.get("sampler")]
    if config.get("head") == "tail":  # what trains in the tower's tail is the method
        parts[0] = f"tail-{(config.get('head_params') or {}).get('tune', 'adapter')}"
    parts += [config["stage2"]] if config.get("stage2") else []
    if kind == "finetune":
        tail = config.get("tail_blocks")  # finetune --tail-blocks K: `finetune-tail1-lora`
        parts.insert(0, f"finetune-{f'tail{tail}-' if tail else ''}{config.get('tune')}")
    return " + ".join(str(p) for p in parts)


# finetune's --tail-blocks settings at their defaults (finetune_config.TAIL_ONLY): left out of a run's identity, so runs
# made before they existed group with runs made after
FINETUNE_TAIL_UNSET = {"tail_blocks": 0, "views": 0, "view_seed": 0, "round_prefix": True}


def identity_settings(config: dict, depth: int = 0) -> dict:
    """Every setting that changes a run's result except its seed, flattened (`loss_params.gamma`); a second stage
    carries its first stage's settings under `first.`, read from the first-stage run when it is there."""
    out = {}
    for k, v in sorted(config.items()):
        if k in NOT_IDENTITY or (k == "tune" and v is None):  # train-head's --tune unset: runs made before it existed
            continue
        if k in FINETUNE_TAIL_UNSET and v == FINETUNE_TAIL_UNSET[k]:  # likewise finetune without --tail-blocks
            continue
        if isinstance(v, dict):
            out.update({f"{k}.{pk}": pv for pk, pv in sorted(v.items())})
        else:
            out[k] = v
    first = config.get("from_run")
    if first:
        try:
            first_cfg = read_json(Path(first) / "config.json", "run")["config"] if depth < 3 else None
        except (VlmcacheError, KeyError, TypeError):
            first_cfg = None
        if isinstance(first_cfg, dict):
            out.update({f"first.{k}": v for k, v in identity_settings(first_cfg, depth + 1).items()})
        else:  # the first-stage run is gone: its folder name without the seed part still tells methods apart
            out["first"] = re.sub(r"__s\d+__", "__", Path(first).name)
    return out


def identity_key(config: dict) -> str:
    """Equal for two runs exactly when everything but the seed is equal: the key report groups seeds by."""
    blob = json.dumps(identity_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
