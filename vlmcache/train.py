"""Stage 2: train a head (and optionally a decoupled second stage) on cached features, evaluate, save a run.

A run folder holds `config.json` (the resolved config), `metrics.json` (metrics, cost, per-epoch history),
`per_class.csv` and `head.pt` (weights plus what is needed to rebuild the head), so `vlmcache eval RUN`
can evaluate it again, with or without post-hoc corrections. The run's config is `train_config.TrainConfig`; the
training loop, the run's model and evaluation are in `loop.py`.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmcache import atomic, cache, guard, runlock, runs, text_cache
from vlmcache.encoders import pick_device
from vlmcache.epochlog import EpochLog
from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.features import cache_parts, default_eval_split, find_cache, open_split, pretrained_of
from vlmcache.heads import HEADS, CosineClassifier, build_head, full_head_params, upgrade_head_file
from vlmcache.loop import (
    OnRawCosines,
    RunModel,
    bind_tail,
    bind_text,
    evaluate,
    fit,
    frozen_features,
    inputs,
    post_hoc,
    use_views,
)
from vlmcache.losses import build_loss
from vlmcache.memory import peak_rss_mb, start_peak_memory
from vlmcache.predictions import FILE as PREDICTIONS
from vlmcache.predictions import PredictionWriter, require_pyarrow
from vlmcache.recipe import check_finite_parameters, double_corrections
from vlmcache.samplers import build_sampler
from vlmcache.stage2 import STAGE2, build_stage2
from vlmcache.train_config import TrainConfig


def _run_dir(cfg: TrainConfig) -> Path:
    """This run's folder, checked by the output guard before any work (runs.run_folder)."""
    return runs.run_folder(cfg.out, cfg.runs_dir, cfg.run_name(), cfg.overwrite)


def load_run(run_dir: str | Path, device: torch.device) -> tuple[TrainConfig, RunModel, dict]:
    """A finished train-head run, every file checked against its schema, the head against its cache."""
    run_dir = Path(run_dir)
    if runs.read_kind(run_dir) == "finetune":
        meta = runs.read_json(run_dir / "config.json", "run")
        weights = meta.get("weights")  # the tuned tower, saved in the run folder under this name (None: a tail run)
        then = (
            f" To train heads on its features: vlmcache extract --pretrained {run_dir / Path(str(weights)).name} "
            f"(or finetune --reextract)."
            if weights
            else ""
        )
        raise VlmcacheError(
            f"'{run_dir}' is a fine-tuning run; its head needs its tuned tower (vlmcache eval handles both).{then}"
        )
    _, cfg = runs.read_config(run_dir, TrainConfig)
    try:
        cfg.resolve()
    except VlmcacheError as e:
        raise VlmcacheError(f"'{run_dir}/config.json': {e}") from None
    saved = upgrade_head_file(runs.load_head_file(run_dir, device))
    if saved["head"] not in HEADS or (saved["stage2"] is not None and saved["stage2"] not in STAGE2):
        raise VlmcacheError(f"'{run_dir}/head.pt' names a head or second stage this vlmcache does not have.")
    if (saved["head"], saved["stage2"]) != (cfg.head, cfg.stage2):  # the config decides the inputs, head.pt the head
        raise VlmcacheError(
            f"'{run_dir}/config.json' names the head {cfg.head} (second stage {cfg.stage2}), but its head.pt holds "
            f"{saved['head']} (second stage {saved['stage2']}); the two files are not one run's."
        )
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    split = open_split(model_dir, cfg.train_split)
    num_classes = int(split.fingerprint["num_classes"])
    width = {"tokens": split.token_shape, "prefix": split.prefix_shape}.get(
        HEADS[saved["head"]].input, lambda: (None, int(split.manifest["dims"]["pooled"]))
    )()[1]
    if (saved["num_classes"], saved["in_dim"]) != (num_classes, width):
        raise VlmcacheError(
            f"'{run_dir}/head.pt' is a head for {saved['num_classes']} classes and inputs of width "
            f"{saved['in_dim']}, but its cache '{model_dir}' has {num_classes} classes and width {width}."
        )
    try:
        head = build_head(saved["head"], saved["in_dim"], saved["num_classes"], **saved["head_params"]).to(device)
        if hasattr(head, "bind_tower"):
            bind_tail(head, split, device)
        if hasattr(head, "bind_text"):
            bind_text(head, split, text_cache.read_text(model_dir / text_cache.TEXT_FILE), device)
        stage2 = (
            build_stage2(saved["stage2"], head.classifier, **(saved.get("stage2_params") or {}))
            if saved.get("stage2")
            else None
        )
        head.load_state_dict(saved["head_state"])
        if stage2 is not None:
            stage2.load_state_dict(saved["stage2_state"] or {})
    except (RuntimeError, TypeError, ValueError) as e:
        raise VlmcacheError(f"The weights in '{run_dir}/head.pt' do not fit this vlmcache's heads: {e}") from None
    return cfg, RunModel(head, stage2).to(device), saved


def inherit_first_stage(cfg: TrainConfig) -> TrainConfig:
    """A second stage takes its data and head from its first-stage run (`--from`), so its config, run name and
    labels say the head it really trains on. Returns the first stage's config."""
    if runs.read_kind(Path(cfg.from_run)) == "finetune":
        raise VlmcacheError(
            f"--from '{cfg.from_run}' is a fine-tuning run; a second stage re-balances a train-head run's head (train "
            f"heads on the tuned tower's features: finetune --reextract, then train-head)."
        )
    _, first_cfg = runs.read_config(Path(cfg.from_run), TrainConfig)
    for key in ("dataset", "model", "pretrained", "preprocess", "head", "head_params", "cache_key", "cache_dir"):
        setattr(cfg, key, getattr(first_cfg, key))
    if cfg.head == "coop":  # TrainConfig refuses it when --head says so; here the head came from --from
        raise VlmcacheError("Second stages re-balance linear, cosine, decoder and tail heads, not coop prompts.")
    return first_cfg


def train_head(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[dict], None] | None = None,
    hold: str | None = None,
    wait: bool = False,
) -> dict:
    """Train, evaluate and save one run; returns the run's summary (metrics, cost, where it is).

    `hold` (the command's name, e.g. "vlmcache train-head") holds the folder the run goes into (`runlock`) from
    the moment the run is known to be valid until it is saved: another process there makes this one refuse, or
    wait with `wait`. Left None where the caller holds the folder itself (`ablate`)."""
    with ExitStack() as stack:
        holder = None if hold is None else (lambda folder: stack.enter_context(runlock.hold(folder, hold, wait, log)))
        job = prepare_run(cfg, log, hold=holder)
        try:
            t0 = time.perf_counter()
            history, selection = fit(
                job.fit_model,
                job.fit_data,
                job.loss_fn,
                job.sampler,
                cfg,
                job.device,
                job.on_epoch(on_epoch),
                job.select,
            )
            job.times["train_seconds"] = time.perf_counter() - t0
            return finish_run(job, history, selection)
        except BaseException:
            job.discard()
            raise


@dataclass
class RunJob:
    """A run between its set-up and its end: what `fit` trains and what `finish_run` evaluates and saves."""

    cfg: TrainConfig
    device: torch.device
    model_dir: Path
    run_dir: Path
    eval_name: str
    eval_data: object
    counts: np.ndarray
    classnames: list[str]
    in_dim: int
    num_classes: int
    model: RunModel
    fit_model: nn.Module
    fit_data: object
    head_params: dict
    loss_fn: nn.Module
    sampler: object
    select: Callable[[int, int], float] | None
    times: dict
    t_start: float
    memory_scope: str
    group_size: int = 1  # the runs trained together in this process's group (group.train_group)
    epoch_log: EpochLog | None = None  # --log
    staging: Path | None = None  # the folder the run is built in (guard.staging_folder), published when complete

    def staging_folder(self) -> Path:
        if self.staging is None:
            self.staging = guard.staging_folder(self.run_dir)
        return self.staging

    def discard(self) -> None:
        """A failed run: close its log and remove its staging folder (made for it alone); nothing else."""
        if self.epoch_log is not None:
            self.epoch_log.close()
            self.epoch_log = None
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    warnings: list[str] = field(default_factory=list)  # said when the run starts, kept in metrics.json

    def on_epoch(self, also: Callable[[dict], None] | None = None) -> Callable[[dict], None] | None:
        """What each epoch's row goes to: the run's --log, and `also` (a command's progress line)."""
        if self.epoch_log is None:
            return also
        if also is None:
            return self.epoch_log

        def both(row: dict) -> None:
            self.epoch_log(row)
            also(row)

        return both


def prepare_run(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    shared: dict | None = None,
    memory_scope=None,
    hold: Callable[[Path], None] | None = None,
):
    """Everything before the training loop: the config resolved, the cache found, inputs loaded, the model, loss,
    sampler and selection built. `shared` (a dict kept across runs: `group.train_group`) holds inputs already
    loaded by an earlier run of the same cache, so a group reads each split once; `memory_scope` is the
    group's peak-memory scope (None: this run starts its own). `hold(folder)` takes the runs folder's lock once
    the run is known to be valid and before anything is written (so a mistake leaves no folder behind)."""
    t_start = time.perf_counter()
    cfg.resolve()
    if cfg.save_predictions:
        require_pyarrow()
    for warning in double_corrections(cfg):
        log(f"warning: {warning}")
    device = pick_device(cfg.device)
    memory_scope = memory_scope or start_peak_memory(device)
    first = None
    if cfg.stage2:
        inherit_first_stage(cfg)
        _, first_model, first_saved = load_run(cfg.from_run, device)
        first = (first_model.head, first_saved)
    model_dir = _locate_cache(cfg)
    eval_name = cfg.eval_split or default_eval_split(model_dir)
    train_split, eval_split = open_split(model_dir, cfg.train_split), open_split(model_dir, eval_name)
    num_classes = int(train_split.fingerprint["num_classes"])
    if num_classes < 2:  # else a head of one logit fails deep inside the loss ("got shape torch.Size([1])")
        raise VlmcacheError(
            f"The cache '{model_dir}' holds {num_classes} class; a classifier needs at least 2. Extract images "
            f"(or split-file labels) of two or more classes."
        )
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    run_dir = _run_dir(cfg)
    if hold is not None:
        hold(run_dir.parent)
        run_dir = _run_dir(cfg)  # again: a process this one waited for may have finished the same run
    warnings = selection_warnings(cfg, eval_name)
    for warning in warnings:
        log(f"warning: {warning}")

    t_load = time.perf_counter()
    augment = use_views(cfg, train_split, log)
    train_data, eval_data = inputs(cfg, cfg.head, [train_split, eval_split], device, augment, shared)
    counts = np.bincount(train_data.y.cpu().numpy(), minlength=num_classes)
    times = {"load_seconds": time.perf_counter() - t_load}

    torch.manual_seed(cfg.seed)
    t_features = time.perf_counter()
    model, fit_model, fit_data, head_params = _build_model(cfg, first, train_data, train_split, text, device, shared)
    loss_fn = build_loss(cfg.loss, counts, **cfg.loss_params).to(device)
    # the classifier whose scale the logits carry: a second stage's own (cRT's trained copy; the frozen one that
    # LWS, DisAlign and MaRC scale), else the head's
    classifier = fit_model.classifier if cfg.stage2 else model.head.classifier
    if cfg.loss == "ldam" and isinstance(classifier, CosineClassifier):
        loss_fn = OnRawCosines(loss_fn, classifier)
    sampler = build_sampler(cfg.sampler, fit_data.y, **cfg.sampler_params)
    select = _selector(cfg, model, eval_data, eval_name, model_dir, counts, device, shared)
    times["features_seconds"] = time.perf_counter() - t_features
    if device.type == "cuda" and memory_scope != "group":
        torch.cuda.reset_peak_memory_stats(device)
    times["prepare_seconds"] = time.perf_counter() - t_start
    job = RunJob(
        cfg, device, model_dir, run_dir, eval_name, eval_data, counts, text.classnames, train_data.dim, num_classes,
        model, fit_model, fit_data, head_params, loss_fn, sampler, select, times, t_start, memory_scope,
        warnings=warnings,
    )  # fmt: skip
    if cfg.log:  # live inside the run's own staging folder: nothing outside the run is made or removed
        try:
            job.epoch_log = EpochLog(cfg.log, job.staging_folder() / "logs", cfg.select_on)
        except BaseException:  # (tensorboard missing): the staging folder made for it goes too
            job.discard()
            raise
    return job


def selection_warnings(cfg: TrainConfig, eval_name: str) -> list[str]:
    """What is wrong with the run's model selection, said on stderr and kept in metrics.json's `warnings`: an
    epoch selected on the split the run reports makes that score optimistic (`report` marks such rows)."""
    if cfg.select_on and cfg.select_on == eval_name:
        return [
            f"--select-on {cfg.select_on}: the epoch is selected on the split the run reports ({eval_name}), so its "
            f"score is optimistic; select on a held-out split (val) for numbers to publish."
        ]
    return []


def finish_run(job: RunJob, history: list[dict], selection: dict | None) -> dict:
    """Evaluate the trained run, check it, and save its folder; returns its summary. `job.times` holds the
    training loop's seconds by now."""
    cfg = job.cfg
    if selection is not None:
        selection = {"split": cfg.select_on, **selection}
    t_eval = time.perf_counter()
    eval_model = post_hoc(job.model, cfg.tau_norm)
    writer = None
    if cfg.save_predictions:  # in the run's staging folder, published with it
        spot = job.staging_folder() / PREDICTIONS
        writer = PredictionWriter(spot, open_split(job.model_dir, job.eval_name), job.classnames)
    try:
        metrics, table = evaluate(
            eval_model, job.eval_data, job.counts, job.classnames, cfg.logit_adjust, cfg.many, cfg.few, writer
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    if job.epoch_log is not None:
        job.epoch_log.close()
        job.epoch_log = None
    job.times["eval_seconds"] = time.perf_counter() - t_eval
    if job.group_size > 1:
        # In a group the runs take turns, so the clock since this run's set-up is the group's time, not its own:
        # its whole run is its share of the group, the phases it spent working (set-up, its own steps, its
        # evaluation). The group's wall time is the pipeline's to record (results.csv's group_wall_seconds).
        job.times["total_seconds"] = sum(job.times[k] for k in ("prepare_seconds", "train_seconds", "eval_seconds"))
    else:
        job.times["total_seconds"] = time.perf_counter() - job.t_start
    cost = _cost(cfg, job.times, history, job.device, job.memory_scope)
    if job.group_size > 1:  # seconds are this run's own; memory is the group's process's
        cost["group_size"] = job.group_size
        cost["total_seconds_scope"] = "share of group"

    check_finite_parameters(job.model)
    saved = {
        "head": cfg.head,
        "in_dim": job.in_dim,
        "num_classes": job.num_classes,
        "head_params": job.head_params,
        "head_state": job.model.head.state_dict(),
        "stage2": cfg.stage2,
        "stage2_params": dict(cfg.stage2_params),
        "stage2_state": job.model.stage2.state_dict() if job.model.stage2 is not None else None,
    }
    config = {
        "config": asdict(cfg),
        "cache": str(job.model_dir),
        "eval_split": job.eval_name,
        "train_counts": job.counts.tolist(),
        "argv": sys.argv,
    }
    result = {"run": str(job.run_dir), "metrics": metrics, "cost": cost, "history": history, "selection": selection}
    if job.warnings:
        result["warnings"] = list(job.warnings)
    _save_run(job.run_dir, job.staging_folder(), saved, table, config, result)
    job.staging = None  # published
    return result


def _locate_cache(cfg: TrainConfig) -> Path:
    """The run's cache; what the config left out (dataset, model, weights) becomes the found cache's, and the
    cache is recorded by key and absolute root so that `eval` and second stages find it from anywhere."""
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    cfg.dataset, cfg.model, _ = cache_parts(model_dir)
    cfg.pretrained = cfg.pretrained or pretrained_of(model_dir)
    cfg.cache_key = model_dir.name
    cfg.cache_dir = str(model_dir.parent.parent.resolve())
    return model_dir


def _build_model(cfg: TrainConfig, first, train_data, train_split, text, device: torch.device, shared=None):
    """(the run's model, the module that trains, the data it trains on, the head's full settings). A second
    stage trains on the frozen first-stage head's features; a first stage builds its head, fits its input
    statistics and, with --text-init, starts from the class texts."""
    if first is not None:
        head, first_saved = first
        head.requires_grad_(False)
        stage2 = build_stage2(cfg.stage2, head.classifier, **cfg.stage2_params).to(device)
        fit_data = frozen_features(head, train_data)  # one pass of the frozen head over train
        return RunModel(head, stage2), stage2, fit_data, dict(first_saved["head_params"])
    head_params = full_head_params(cfg.head, cfg.head_params)
    num_classes = int(train_split.fingerprint["num_classes"])
    head = build_head(cfg.head, train_data.dim, num_classes, **head_params).to(device)
    if hasattr(head, "bind_tower"):
        bind_tail(head, train_split, device)
    if hasattr(head, "bind_text"):
        bind_text(head, train_split, text, device)
    if getattr(head, "needs_input_stats", False):
        key = ("input statistics", id(getattr(train_data, "x", train_data)), head.normalize)
        if shared is not None and key in shared:  # a group's runs on the same rows: computed once
            head.shift.copy_(shared[key][0])
            head.scale.copy_(shared[key][1])
        else:
            head.fit_input(x for x, _ in train_data.chunks())
            if shared is not None:
                shared[key] = (head.shift.clone(), head.scale.clone())
    if cfg.text_init:
        if cfg.text_init not in text.sets:
            raise unknown_choice("template set of --text-init", cfg.text_init, text.sets)
        init = head.init_from_text if hasattr(head, "init_from_text") else head.classifier.init_from_text
        init(torch.from_numpy(text.sets[cfg.text_init][1]).to(device), text.logit_scale)
    model = RunModel(head)
    return model, model, train_data, head_params


def _selector(
    cfg: TrainConfig, model: RunModel, eval_data, eval_name: str, model_dir: Path, counts, device, shared=None
):
    """With --select-on SPLIT, the function that scores the model on that split after each epoch; else None."""
    if not cfg.select_on:
        return None
    select_data = (
        eval_data
        if cfg.select_on == eval_name
        else inputs(cfg, cfg.head, [_selection_split(model_dir, cfg.select_on)], device, shared=shared)[0]
    )

    def select(epoch: int, step: int) -> float:
        scored = evaluate(post_hoc(model, cfg.tau_norm), select_data, counts, None, cfg.logit_adjust)
        return scored[0]["overall"]

    return select


def _selection_split(model_dir: Path, name: str) -> cache.SplitCache:
    if not (model_dir / name / cache.MANIFEST).is_file():
        raise VlmcacheError(
            f"--select-on {name}: the cache '{model_dir}' has no '{name}' split to select the best epoch on. "
            f"Extract it, or pass --select-on none to report the last epoch."
        )
    return open_split(model_dir, name)


def _cost(cfg: TrainConfig, times: dict, history: list[dict], device: torch.device, memory_scope: str) -> dict:
    """metrics.json's cost: each phase's seconds, samples/s of the training loop, peak memory and, for a second
    stage, what the method costs from scratch (this stage plus the first stage it builds on)."""
    samples = sum(h["samples_per_s"] * h["seconds"] for h in history)
    train_seconds = times["train_seconds"]
    cost = {
        "train_seconds": round(train_seconds, 3),  # the optimisation loop alone: what samples_per_s measures
        "load_seconds": round(times["load_seconds"], 3),
        "features_seconds": round(times["features_seconds"], 3),  # a second stage's frozen pass, input statistics
        "eval_seconds": round(times["eval_seconds"], 3),
        "total_seconds": round(times["total_seconds"], 3),  # everything this run did
        "samples_per_s": round(samples / train_seconds, 1) if train_seconds > 0 else None,
        "device": str(device),
        **_peak_memory(device, memory_scope),
    }
    if cfg.stage2:
        first_cost = runs.read_metrics(Path(cfg.from_run))["cost"]
        first_total = first_cost.get("total_seconds")
        if first_total is None:  # a run written before total_seconds existed
            first_total = (first_cost.get("train_seconds") or 0) + (first_cost.get("load_seconds") or 0)
        cost["first_stage_seconds"] = first_total
        cost["total_with_first_stage_seconds"] = round(cost["total_seconds"] + first_total, 3)
    return cost


def _peak_memory(device: torch.device, scope: str) -> dict:
    out = {"peak_rss_mb": peak_rss_mb(), "peak_rss_scope": scope}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _save_run(run_dir: Path, staging: Path, saved: dict, table, config: dict, result: dict) -> None:
    """head.pt, per_class.csv, config.json and, last, metrics.json, written into the run's staging folder (which
    holds its logs and predictions already), that replaces `run_dir` only once complete."""
    atomic.save_torch_atomic(saved, staging / "head.pt")
    atomic.write_bytes_atomic(staging / "per_class.csv", table.to_csv(index=False).encode())
    atomic.write_json_atomic(staging / "config.json", config)
    atomic.write_json_atomic(staging / "metrics.json", result)  # last: a run with metrics.json is complete
    runs.publish_run(staging, run_dir)


def evaluate_run(
    run_dir: str | Path,
    tau_norm: float | None = None,
    logit_adjust: float | None = None,
    split: str | None = None,
    device: str = "auto",
    save_predictions: bool = False,
) -> dict:
    """Evaluate a saved train-head run again, optionally with post-hoc tau-normalisation or logit adjustment
    (`runs.evaluate_run` takes a run of any kind); `save_predictions` writes this evaluation's per-image
    predictions to the run folder's predictions.parquet."""
    runs.check_post_hoc(tau_norm, logit_adjust)
    dev = pick_device(device)
    cfg, model, saved = load_run(run_dir, dev)
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    config, _ = runs.read_config(Path(run_dir), TrainConfig)
    eval_name = split or config["eval_split"]
    (data,) = inputs(cfg, cfg.head, [open_split(model_dir, eval_name)], dev)
    counts = np.asarray(config["train_counts"])
    if len(counts) != saved["num_classes"]:
        raise VlmcacheError(
            f"'{run_dir}/config.json': train_counts has {len(counts)} classes, its head {saved['num_classes']}."
        )
    # many/medium/few are the training split's counts: checked against the cache (a hand-edited or copied
    # config.json would regroup the classes silently)
    actual = np.bincount(open_split(model_dir, cfg.train_split).labels(), minlength=len(counts))[: len(counts)]
    if not np.array_equal(counts, actual):
        c = int(np.flatnonzero(counts != actual)[0])
        raise VlmcacheError(
            f"'{run_dir}/config.json' records {int(counts[c])} training images for class {c}, but its cache's "
            f"'{cfg.train_split}' split has {int(actual[c])}; the run was trained on other data."
        )
    # the run's own post-hoc corrections apply unless a flag replaces them (0 turns either off)
    tau_norm = cfg.tau_norm if tau_norm is None else tau_norm
    logit_adjust = cfg.logit_adjust if logit_adjust is None else logit_adjust
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    writer = None
    if save_predictions:
        writer = PredictionWriter(Path(run_dir) / PREDICTIONS, open_split(model_dir, eval_name), text.classnames)
    try:
        metrics, _ = evaluate(
            post_hoc(model, tau_norm), data, counts, text.classnames, logit_adjust, cfg.many, cfg.few, writer
        )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {
        "run": str(run_dir),
        "split": eval_name,
        "tau_norm": tau_norm,
        "logit_adjust": logit_adjust,
        "metrics": metrics,
        **({"predictions": str(writer.close())} if writer is not None else {}),
    }
