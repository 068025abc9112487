"""Ablation pipelines: a YAML file names datasets, models and seeds and a list of methods; any list in a
method expands into a grid. `run_pipeline` trains every run that is not finished yet and gathers one table.

    datasets: [places_lt]
    models: [{model: ViT-B-16, pretrained: openai}]
    seeds: [0, 1, 2]
    defaults: {epochs: 30, lr: 0.001}
    methods:
      - {name: softmax, head: decoder, loss: ce}
      - {name: focal, head: decoder, loss: focal, loss_params: {gamma: [1, 2]}}   # a grid over gamma
      - {name: cRT, stage2: crt, from: softmax}                                  # second stage on softmax

Runs are named by a hash of their config (as `train-head` names them), so a re-run skips finished runs. A run
that fails is recorded with its error and the grid goes on.
"""

from __future__ import annotations

import io
import itertools
import json
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from pydantic import TypeAdapter, ValidationError

from vlmcache import distributed, faults, guard, runlock, runs
from vlmcache.errors import VlmcacheError
from vlmcache.features import find_cache
from vlmcache.group import GROUP_SIZE, Outcome, make_groups, train_group
from vlmcache.schemas import SEED_MAX, describe
from vlmcache.train import inherit_first_stage, train_head
from vlmcache.train_config import TrainConfig

TOP_KEYS = {"name", "description", "cache_dir", "runs_dir", "datasets", "models", "seeds", "defaults", "methods"}
MODEL_KEYS = {"model", "pretrained", "cache_key", "preprocess"}
# what a method or `defaults` may set: TrainConfig fields, less those the pipeline decides
PIPELINE_OWNED = {
    "dataset",
    "model",
    "pretrained",
    "cache_dir",
    "cache_key",
    "runs_dir",
    "out",
    "overwrite",
    "seed",
    "from_run",
}
METHOD_FIELDS = {f.name for f in fields(TrainConfig)} - PIPELINE_OWNED
GRID_DICTS = ("loss_params", "head_params", "stage2_params", "sampler_params")  # their values may be lists too
METRICS = ("overall", "many", "medium", "few", "top5", "mean_per_class")
COSTS = ("train_seconds", "total_seconds", "total_with_first_stage_seconds", "samples_per_s", "peak_rss_mb")


def shipped_pipelines() -> dict[str, Path]:
    folder = Path(str(resources.files("vlmcache") / "pipelines"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


# --------------------------------------------------------------------------- parsing


def _check_keys(node, allowed: set[str], where: str, source: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        raise VlmcacheError(f"{source}, line {node.start_mark.line + 1}: {where} must be a mapping (key: value).")
    for key_node, _ in node.value:
        if key_node.value not in allowed:
            raise VlmcacheError(
                f"{source}, line {key_node.start_mark.line + 1}: unknown key '{key_node.value}' in {where}; "
                f"valid keys: {', '.join(sorted(allowed))}."
            )


def _child(node, key: str):
    for k, v in node.value:
        if k.value == key:
            return v
    return None


def _check_duplicate_keys(root, source: str) -> None:
    """A key given twice in one mapping is an error naming both lines (YAML would keep the last silently).
    Nodes are visited once each, so anchors reused many times cost nothing."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for k, v in node.value:
                key, line = str(k.value), k.start_mark.line + 1
                if key in lines:
                    raise VlmcacheError(f"{source}, lines {lines[key]} and {line}: the key '{key}' is given twice.")
                lines[key] = line
                stack.append(v)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _check_setting_shapes(node, source: str, where: str, grids: bool) -> None:
    """Values of `defaults` or a method: a single value, or (in a method) a list of single values, a grid axis.
    loss_params and head_params are mappings of the same. Nested lists and other shapes are refused."""

    def line(n) -> str:
        return f"{source}, line {n.start_mark.line + 1}"

    def value(v, key: str) -> None:
        if isinstance(v, yaml.ScalarNode):
            return
        if isinstance(v, yaml.SequenceNode) and grids:
            if not v.value:
                raise VlmcacheError(f"{line(v)}: the grid over '{key}' in {where} is an empty list.")
            for item in v.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise VlmcacheError(f"{line(item)}: '{key}' in {where}: a grid lists single values, not lists.")
            return
        kind = "a list (grids belong in methods)" if isinstance(v, yaml.SequenceNode) else "a mapping or a list"
        raise VlmcacheError(f"{line(v)}: '{key}' in {where} takes a single value, not {kind}.")

    for k, v in node.value:
        if k.value in GRID_DICTS:
            if not isinstance(v, yaml.MappingNode):
                raise VlmcacheError(f"{line(v)}: '{k.value}' in {where} must be a mapping (name: value).")
            for pk, pv in v.value:
                value(pv, f"{k.value}.{pk.value}")
        elif k.value in ("name", "from"):
            if not isinstance(v, yaml.ScalarNode):
                raise VlmcacheError(f"{line(v)}: '{k.value}' in {where} takes one value.")
        else:
            value(v, k.value)


def grid_size(pipe_data: dict) -> int:
    """How many runs a parsed (shape-checked) pipeline expands to, counted without expanding it."""
    per_method = 0
    for item in pipe_data["methods"]:
        n = 1
        for k, v in item.items():
            if k in GRID_DICTS and isinstance(v, dict):
                for pv in v.values():
                    n *= len(pv) if isinstance(pv, list) else 1
            elif isinstance(v, list):
                n *= len(v)
        per_method += n
    return (
        len(pipe_data.get("datasets") or [])
        * len(pipe_data.get("models") or [])
        * len(pipe_data.get("seeds", [0]) or [])
        * per_method
    )


def _check_list_of_mappings(node, allowed: set[str], where: str, source: str) -> None:
    if node is None:
        return
    if not isinstance(node, yaml.SequenceNode):
        raise VlmcacheError(f"{source}, line {node.start_mark.line + 1}: {where} must be a list.")
    for item in node.value:
        _check_keys(item, allowed, where, source)


@dataclass
class Method:
    name: str
    settings: dict  # TrainConfig fields, values possibly lists (grid axes)
    from_method: str | None = None


@dataclass
class Pipeline:
    source: str
    name: str
    datasets: list[str]
    models: list[dict]
    seeds: list[int]
    defaults: dict
    methods: list[Method]
    cache_dir: str = "cache"
    runs_dir: str = "runs"
    description: str = ""


def _check_model(entry: dict, where: str) -> None:
    """The model is an open_clip model, and its weights a tag of it, 'none', or a file (which may be elsewhere)."""
    from vlmcache.encoders import RANDOM, openclip
    from vlmcache.errors import unknown_choice

    open_clip = openclip()

    model, pretrained = str(entry["model"]), entry.get("pretrained")
    if model not in open_clip.list_models():
        raise VlmcacheError(f"{where}: {unknown_choice('model', model, open_clip.list_models())}")
    tags = open_clip.list_pretrained_tags_by_model(model)
    looks_like_file = isinstance(pretrained, str) and ("/" in pretrained or "." in pretrained)
    if (
        pretrained is not None
        and str(pretrained).lower() not in RANDOM
        and pretrained not in tags
        and not looks_like_file
    ):
        raise VlmcacheError(f"{where}: '{pretrained}' is not a pretrained tag of {model}; tags: {', '.join(tags)}.")


MAX_RUNS = 5000


def load_pipeline(path: str | Path, max_runs: int = MAX_RUNS) -> Pipeline:
    """Parse and validate a pipeline file (or the name of a shipped one, e.g. `demo`).

    The grid's size is counted from the parsed file before anything is expanded, and a grid of more than
    `max_runs` runs is refused with its count."""
    path = Path(path)
    if not path.is_file() and str(path) in shipped_pipelines():
        path = shipped_pipelines()[str(path)]
    if not path.is_file():
        raise VlmcacheError(f"The pipeline '{path}' does not exist; shipped: {', '.join(shipped_pipelines())}.")
    text = path.read_text(encoding="utf-8")
    source = str(path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # safe: plain data only, never Python objects
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise VlmcacheError(f"{source}{line}: not valid YAML ({getattr(e, 'problem', e)}).") from None
    if root is None:
        raise VlmcacheError(f"{source}: the pipeline is empty.")
    methods_node = _check_shapes(root, source)
    size = grid_size(data)
    if size > max_runs:
        raise VlmcacheError(
            f"{source}: the grid expands to {size:,} runs, more than --max-runs {max_runs:,}. Shrink the grid, or "
            f"raise --max-runs if you mean it."
        )
    methods = _methods(methods_node, data, source)
    datasets, models, seeds = _axes(root, data, source)
    pipe = Pipeline(
        source,
        str(data.get("name", path.stem)),
        [str(d) for d in datasets],
        models,
        seeds,
        dict(data.get("defaults") or {}),
        methods,
        str(data.get("cache_dir", "cache")),
        str(data.get("runs_dir", f"runs/{path.stem}")),
        str(data.get("description", "")),
    )
    for run in plan(pipe):  # every expanded config must resolve: names, parameters, values
        try:
            run.config(stage2_from="(first stage)" if run.from_method else None).resolve()
        except VlmcacheError as e:
            raise VlmcacheError(f"{source}: method '{run.method}': {e}") from None
    return pipe


def _check_shapes(root, source: str):
    """Keys, duplicates and the shape of every value, from the YAML nodes (so errors name their line); returns
    the `methods` node."""
    _check_keys(root, TOP_KEYS, "the pipeline", source)
    _check_duplicate_keys(root, source)
    _check_list_of_mappings(_child(root, "models"), MODEL_KEYS, "models", source)
    for key in ("datasets", "seeds"):
        node = _child(root, key)
        if node is not None and not (
            isinstance(node, yaml.SequenceNode) and all(isinstance(n, yaml.ScalarNode) for n in node.value)
        ):
            raise VlmcacheError(f"{source}, line {node.start_mark.line + 1}: '{key}' must be a list of single values.")
    for entry in getattr(_child(root, "models"), "value", []):
        for k, v in entry.value:
            if not isinstance(v, yaml.ScalarNode):
                raise VlmcacheError(f"{source}, line {v.start_mark.line + 1}: models' '{k.value}' takes one value.")
    if _child(root, "defaults") is not None:
        _check_keys(_child(root, "defaults"), METHOD_FIELDS, "defaults", source)
        _check_setting_shapes(_child(root, "defaults"), source, "defaults", grids=False)
    methods_node = _child(root, "methods")
    if methods_node is None or not isinstance(methods_node, yaml.SequenceNode) or not methods_node.value:
        raise VlmcacheError(f"{source}: 'methods' must list at least one method.")
    _check_list_of_mappings(methods_node, METHOD_FIELDS | {"name", "from"}, "a method", source)
    for node in methods_node.value:
        _check_setting_shapes(node, source, "a method", grids=True)
    for key in ("name", "description", "cache_dir", "runs_dir"):
        node = _child(root, key)
        if node is not None and not isinstance(node, yaml.ScalarNode):
            raise VlmcacheError(f"{source}, line {node.start_mark.line + 1}: '{key}' takes one value.")
    return methods_node


def _methods(methods_node, data: dict, source: str) -> list[Method]:
    """The methods, named once each, with `from` naming a method above and going with `stage2`."""
    methods, names = [], set()
    for node, item in zip(methods_node.value, data["methods"], strict=True):
        line = node.start_mark.line + 1
        if not item.get("name"):
            raise VlmcacheError(f"{source}, line {line}: every method needs a name.")
        if item["name"] in names:
            raise VlmcacheError(f"{source}, line {line}: the method name '{item['name']}' is used twice.")
        names.add(item["name"])
        settings = {k: v for k, v in item.items() if k not in ("name", "from")}
        frm = item.get("from")
        if frm is not None and frm not in names:
            raise VlmcacheError(f"{source}, line {line}: 'from: {frm}' names no method above it.")
        if (frm is None) != ("stage2" not in settings and "stage2" not in (data.get("defaults") or {})):
            raise VlmcacheError(f"{source}, line {line}: a method has 'stage2' and 'from' together, or neither.")
        methods.append(Method(str(item["name"]), settings, frm))
    return methods


def _axes(root, data: dict, source: str) -> tuple[list, list, list]:
    """The grid's datasets, models (each checked) and seeds."""
    datasets = data.get("datasets")
    if not datasets or not isinstance(datasets, list):
        raise VlmcacheError(f"{source}: 'datasets' must list at least one dataset.")
    for d in datasets:  # the name rule: a dataset names the cache's and the runs' folders
        guard.check_name(str(d), f"{source}: the dataset")
    models = data.get("models") or []
    if not models:
        raise VlmcacheError(f"{source}: 'models' must list at least one {{model, pretrained}}.")
    for node, m in zip(_child(root, "models").value, models, strict=True):
        where = f"{source}, line {node.start_mark.line + 1}"
        if "model" not in m:
            raise VlmcacheError(f"{where}: every entry of 'models' needs 'model' (and usually 'pretrained').")
        _check_model(m, where)
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not all(type(s) is int and 0 <= s <= SEED_MAX for s in seeds):
        raise VlmcacheError(f"{source}: 'seeds' must be a list of integers in [0, {SEED_MAX}], got {seeds!r}.")
    return datasets, models, seeds


# --------------------------------------------------------------------------- planning


def _expand(settings: dict) -> list[tuple[dict, dict]]:
    """A method's settings -> [(concrete settings, {axis: value})], one per grid point."""
    axes: dict[tuple, list] = {}
    for k, v in settings.items():
        if k in GRID_DICTS and isinstance(v, dict):
            for pk, pv in v.items():
                if isinstance(pv, list):
                    axes[(k, pk)] = pv
        elif isinstance(v, list):
            axes[(k,)] = v
    out = []
    for values in itertools.product(*axes.values()) if axes else [()]:
        concrete = {k: (dict(v) if isinstance(v, dict) else v) for k, v in settings.items()}
        label = {}
        for axis, value in zip(axes, values, strict=True):
            if len(axis) == 1:
                concrete[axis[0]] = value
            else:
                concrete[axis[0]][axis[1]] = value
            label[".".join(axis)] = value
        out.append((concrete, label))
    return out


@dataclass
class PlannedRun:
    dataset: str
    model: dict
    seed: int
    method: str  # the method's name plus its grid point, e.g. "focal[loss_params.gamma=1]"
    settings: dict
    from_method: str | None
    pipeline: Pipeline = field(repr=False)

    def config(self, stage2_from: str | None = None) -> TrainConfig:
        """The run's TrainConfig, every value converted to its field's type (YAML reads 1e-3 as a string)."""
        kw = {
            **self.pipeline.defaults,
            **self.settings,
            "dataset": self.dataset,
            "model": str(self.model["model"]),
            "pretrained": _opt_str(self.model.get("pretrained")),
            "cache_key": _opt_str(self.model.get("cache_key")),
            "preprocess": str(self.model.get("preprocess", "model")),
            "cache_dir": self.pipeline.cache_dir,
            "runs_dir": self.pipeline.runs_dir,
            "seed": self.seed,
            "from_run": stage2_from,
        }
        try:
            return TypeAdapter(TrainConfig).validate_python(kw)
        except ValidationError as e:
            raise VlmcacheError(describe(e)) from None


def _opt_str(value) -> str | None:
    return None if value is None else str(value)


def plan(pipe: Pipeline) -> list[PlannedRun]:
    """Every run of the pipeline, first stages before the second stages that build on them."""
    runs = []
    for dataset, model, seed in itertools.product(pipe.datasets, pipe.models, pipe.seeds):
        for method in pipe.methods:
            for settings, label in _expand(method.settings):
                name = method.name + (f"[{','.join(f'{k}={v}' for k, v in label.items())}]" if label else "")
                runs.append(PlannedRun(dataset, model, seed, name, settings, method.from_method, pipe))
    return sorted(runs, key=lambda r: r.from_method is not None)


def same_configs(planned: list[PlannedRun]) -> dict[int, int]:
    """Runs of the plan that another, earlier run already is (two method names that resolve to one config):
    {index: index of that earlier run}. Found from the pipeline alone, before any cache is read (`--dry-run` lists
    them); `run_pipeline` finds the same pairs again by run folder and trains each once. A second stage is the
    same as another when its settings are and its first stage is the same run."""
    canonical: dict[tuple, int] = {}
    same_as: dict[int, int] = {}  # index -> the index of the first run with its config (itself when it is first)
    for i, run in enumerate(planned):
        parent = None
        if run.from_method is not None:
            firsts = [
                j
                for j, f in enumerate(planned)
                if f.from_method is None
                and (f.dataset, f.seed, f.model) == (run.dataset, run.seed, run.model)
                and (f.method == run.from_method or f.method.startswith(run.from_method + "["))
            ]
            if len(firsts) != 1 or firsts[0] not in same_as:
                continue  # run_pipeline names the problem when it gets there
            parent = same_as[firsts[0]]
        try:
            cfg = run.config("(first stage)" if parent is not None else None).resolve()
        except VlmcacheError:
            continue
        key = (parent, json.dumps(asdict(cfg), sort_keys=True, default=str))
        same_as[i] = canonical.setdefault(key, i)
    return {i: j for i, j in same_as.items() if i != j}


# --------------------------------------------------------------------------- pre-flight


@dataclass
class MissingCache:
    dataset: str
    model: dict
    tokens: bool  # a decoder in the grid needs the cache's tokens
    reason: str
    exists: bool = False  # there is a cache, without the tokens: made again with them

    def command(self, cache_dir: str) -> str:
        m = self.model
        pretrained = m.get("pretrained")
        return (
            f"vlmcache extract --dataset {self.dataset} --model {m['model']}"
            + (f" --pretrained {pretrained}" if pretrained is not None else "")
            + (" --preprocess seed" if m.get("preprocess") == "seed" else "")
            + (" --tokens" if self.tokens else "")
            + (" --overwrite" if self.exists else "")
            + f" --cache-dir {cache_dir}"
            + ("" if self.dataset in NO_USER_DATA else " --root ROOT")
        )


NO_USER_DATA = ("digits_lt",)  # datasets whose images ship with vlmcache: `ablate --extract` can make them


def missing_caches(pipe: Pipeline) -> list[MissingCache]:
    """Every (dataset, model) cache the grid reads that is not there, or lacks the tokens a decoder needs:
    checked before the first run, so that a grid does not fail run by run."""
    from vlmcache import cache

    planned = plan(pipe)
    found = []
    for dataset, model in itertools.product(pipe.datasets, pipe.models):
        tokens = any(
            r.dataset == dataset and r.model == model and {**pipe.defaults, **r.settings}.get("head") == "decoder"
            for r in planned
        )
        try:
            model_dir = find_cache(
                pipe.cache_dir, dataset, str(model["model"]), _opt_str(model.get("pretrained")),
                _opt_str(model.get("cache_key")), str(model.get("preprocess", "model")),
            )  # fmt: skip
        except VlmcacheError as e:
            found.append(MissingCache(dataset, model, tokens, str(e)))
            continue
        manifest = cache.read_manifest(model_dir / "train")
        if tokens and not (manifest and manifest["fingerprint"].get("tokens")):
            found.append(MissingCache(dataset, model, tokens, f"'{model_dir}' has no tokens for the decoder", True))
    return found


def extract_missing(pipe: Pipeline, missing: list[MissingCache], progress=None, log=print) -> None:
    """Make the missing caches of datasets that need no user data (--extract); refuse the others."""
    from vlmcache.extract import ExtractConfig, run_extract

    need_data = [m for m in missing if m.dataset not in NO_USER_DATA]
    if need_data:
        raise VlmcacheError(
            "--extract makes caches of built-in data only; these need your images: "
            + "; ".join(m.command(pipe.cache_dir) for m in need_data)
        )
    for m in missing:
        log(f"extracting: {m.command(pipe.cache_dir)}")
        cfg = ExtractConfig(
            dataset=m.dataset, model=str(m.model["model"]), pretrained=_opt_str(m.model.get("pretrained")),
            preprocess=str(m.model.get("preprocess", "model")), cache_dir=pipe.cache_dir, tokens=m.tokens,
            workers=0, shard_size=256, overwrite=m.exists,
        )  # fmt: skip
        run_extract(cfg, progress=progress, log=log)


# --------------------------------------------------------------------------- running


def _row(
    run: PlannedRun, cfg: TrainConfig | None, status: str, result: dict | None, error: str | None, run_dir: str | None
) -> dict:
    row = {
        "dataset": run.dataset,
        "model": run.model["model"],
        "pretrained": cfg.pretrained if cfg is not None else run.model.get("pretrained"),
        "method": run.method,
        "seed": run.seed,
        "status": status,
        "error": error,
        "run": run_dir,
    }
    if cfg is not None:
        row["group_key"] = runs.identity_key(asdict(cfg))
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in GRID_DICTS:
                for k, v in value.items():
                    row[f"{f.name}.{k}"] = v
            elif f.name in THRESHOLDS:  # `many` and `few` are accuracy columns: the thresholds get their own
                row[THRESHOLDS[f.name]] = value
            elif f.name not in ("dataset", "model", "pretrained", "seed", "runs_dir", "out", "overwrite"):
                row[f.name] = value
    for m in METRICS:
        row[m] = (result or {}).get("metrics", {}).get(m)
    for c in COSTS:
        row[c] = (result or {}).get("cost", {}).get(c)
    if result is not None:
        row["group_size"] = result.get("cost", {}).get("group_size", 1)
        row["selected_on_reported_split"] = bool(result.get("warnings"))
    return row


THRESHOLDS = {"many": "many_threshold", "few": "few_threshold"}  # TrainConfig field -> results.csv column


def run_pipeline(
    pipe: Pipeline,
    runs_dir: str | None = None,
    progress=None,
    log=print,
    group: bool = True,
    group_size: int = GROUP_SIZE,
    wait: bool = False,
) -> pd.DataFrame | None:
    """Train every unfinished run, record failures, and write results.csv (and .parquet with pyarrow).

    First stages train before the second stages that build on them. With `group` (the default), the runs of a
    phase that read the same cache train together (`group.train_group`), each run's numbers what they are
    alone; `group=False` trains them one by one. Two methods that resolve to one config (one run folder) train
    once, and both rows name that run. Under torchrun the groups are spread over the processes (largest first,
    each to the least loaded), every process trains its own, and rank 0 writes the table, which it returns
    (other ranks return None).

    The runs folder is held for the whole pipeline (`runlock`): another process writing into it makes this one
    refuse, or wait with `wait`. results.csv keeps the rows of every other pipeline that wrote there; the
    returned table is this pipeline's rows."""
    if runs_dir:
        pipe = replace(pipe, runs_dir=runs_dir)
    if group_size < 1:
        raise VlmcacheError(f"--group-size must be at least 1, got {group_size}.")
    planned = plan(pipe)
    out = guard.check_output(pipe.runs_dir, "the runs folder (--runs-dir or runs_dir)", "runs")
    guard.check_own_files(out, ("results.csv", "results.parquet"), "ablate")
    out.mkdir(parents=True, exist_ok=True)
    distributed.init_from_env()
    rank, world = distributed.rank_world()
    with _hold_runs_folder(out, rank, wait, log) as previous:
        rows = _train_phases(pipe, planned, progress, log, group, group_size, rank, world)
        if rank != 0:
            return None
        table = pd.DataFrame([rows[i] for i in range(len(planned))])
        table.insert(0, "pipeline", pipe.name)
        table = _carry_group_walls(previous, table)
        write_results(out, merge_results(previous, table))
    return table


@contextmanager
def _hold_runs_folder(out: Path, rank: int, wait: bool, log):
    """The runs folder's lock, taken by rank 0 for every process of a torchrun grid (one pipeline, many
    processes), and the results.csv found there (rank 0's to merge; None elsewhere). A refusal, or a results.csv
    that cannot be merged, is raised on every rank, so that none trains."""
    with ExitStack() as stack:
        error = previous = None
        if rank == 0:
            try:
                stack.enter_context(runlock.hold(out, "vlmcache ablate", wait, log))
                previous = read_previous_results(out)
            except VlmcacheError as e:
                error = str(e)
        error = distributed.broadcast(error)
        if error is not None:
            raise VlmcacheError(error)
        yield previous


def _train_phases(pipe, planned, progress, log, group: bool, group_size: int, rank: int, world: int) -> dict:
    """Every planned run's row (index -> row): first stages, then the second stages that build on them."""
    done: dict[tuple, str | None] = {}  # (dataset, model, seed, method) -> run dir of a finished first stage
    rows: dict[int, dict] = {}
    if progress is not None:
        progress.start(len(planned))
    for second in (False, True):
        phase = [i for i, r in enumerate(planned) if (r.from_method is not None) == second]
        pending: list[tuple[int, TrainConfig, str]] = []
        same: dict[int, int] = {}  # a run whose config another run of the phase has: index -> that run's index
        claimed: dict[str, int] = {}  # run folder -> the index of the run that trains it
        for i in phase:
            run = planned[i]
            cfg = run_dir = None
            try:
                cfg = _configure(run, done)
                run_dir = str(Path(pipe.runs_dir) / cfg.run_name())
                if run_dir in claimed:
                    same[i] = claimed[run_dir]
                    continue
                claimed[run_dir] = i
                if (Path(run_dir) / "metrics.json").is_file():
                    rows[i] = _row(run, cfg, "resumed", runs.read_metrics(Path(run_dir)), None, run_dir)
                else:
                    pending.append((i, cfg, run_dir))
                    continue
            except VlmcacheError as e:
                rows[i] = _failed(run, cfg, e, None, run_dir, log)
            if progress is not None:
                progress.advance(run.method)
        for i, j in same.items():
            log(
                f"same config: {planned[i].method} is {planned[j].method} ({planned[i].dataset}, seed "
                f"{planned[i].seed}): trained once, both rows name its run"
            )
        groups = make_groups([cfg for _, cfg, _ in pending], group_size if group else 1)
        mine: dict[int, dict] = {}
        for members in _share(groups, world)[rank]:
            _train(planned, [pending[j] for j in members], mine, progress, log)
        for part in distributed.all_gather(mine):
            rows.update(part)
        for i, j in same.items():
            rows[i] = {**rows[j], "method": planned[i].method, "same_config_as": planned[j].method}
            if progress is not None:
                progress.advance(planned[i].method)
        for i in phase:
            run = planned[i]
            key = (run.dataset, json.dumps(run.model, sort_keys=True), run.seed, run.method)
            done[key] = rows[i]["run"] if rows[i]["status"] != "failed" else None
    return rows


RESULTS = "results.csv"


def read_previous_results(out: Path) -> pd.DataFrame | None:
    """The runs folder's results.csv as another pipeline (or an earlier run of this one) left it, read before any
    run trains, so that a table this pipeline could not keep stops it before it costs anything."""
    from vlmcache.report import read_results_csv

    path = out / RESULTS
    if not path.is_file():
        return None
    try:
        return read_results_csv(path)
    except VlmcacheError as e:
        raise VlmcacheError(
            f"{e} It would be merged with this pipeline's results; move it away (or fix it) and run again."
        ) from None


def _carry_group_walls(previous: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """A resumed run keeps the wall time of the group it trained in, as the previous results.csv recorded it
    (metrics.json cannot hold it: a run is saved before its group ends)."""
    if previous is None or "group_wall_seconds" not in previous.columns:
        return table
    walls = previous.dropna(subset=["run", "group_wall_seconds"]).drop_duplicates("run", keep="last")
    known = dict(zip(walls["run"].astype(str), walls["group_wall_seconds"], strict=True))
    carried = table["run"].astype(str).map(known)
    if "group_wall_seconds" in table.columns:
        carried = table["group_wall_seconds"].where(table["group_wall_seconds"].notna(), carried)
    return table.assign(group_wall_seconds=carried)


def merge_results(previous: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """This pipeline's rows, after the previous table's rows of every other pipeline: a pipeline's rows are
    replaced only by the same pipeline (its `name`). Rows from before the `pipeline` column were written by an
    unknown pipeline: such a row goes only when this pipeline has a row of its dataset, model, seed and method
    (a re-run of that pipeline, as before the column existed)."""
    if previous is None or previous.empty:
        return table
    name = table["pipeline"].iloc[0]
    theirs = previous["pipeline"] if "pipeline" in previous.columns else pd.Series(np.nan, index=previous.index)
    keys = ["dataset", "model", "seed", "method"]
    mine = set(map(tuple, table[keys].astype(str).to_numpy()))
    same_row = np.array([tuple(r) in mine for r in previous[keys].astype(str).to_numpy()], dtype=bool)
    keep = (theirs.notna() & (theirs.astype(str) != str(name))) | (theirs.isna() & ~same_row)
    return pd.concat([previous[keep.to_numpy()], table], ignore_index=True)


def write_results(out: Path, table: pd.DataFrame) -> None:
    """results.csv (and results.parquet with pyarrow) in the runs folder, each replaced atomically."""
    from vlmcache.cache import write_bytes_atomic

    write_bytes_atomic(out / RESULTS, table.to_csv(index=False).encode())
    try:
        buffer = io.BytesIO()
        table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(buffer)
    except ImportError:
        return  # Parquet needs pyarrow (or fastparquet); the CSV has everything
    write_bytes_atomic(out / "results.parquet", buffer.getvalue())


def _configure(run: PlannedRun, done: dict) -> TrainConfig:
    """The run's resolved config: a second stage's first-stage run found among the finished ones, the cache
    found and recorded by key (as train-head records it), so that the run's name is its final one."""
    stage2_from = None
    if run.from_method is not None:
        key = (run.dataset, json.dumps(run.model, sort_keys=True), run.seed)
        firsts = [
            m
            for (d, mo, s, m), r in done.items()
            if (d, mo, s) == key and (m == run.from_method or m.startswith(run.from_method + "["))
        ]
        if len(firsts) != 1:
            raise VlmcacheError(
                f"'from: {run.from_method}' needs exactly one finished first-stage run; found {len(firsts)}."
            )
        stage2_from = done[(*key, firsts[0])]
        if stage2_from is None:
            raise VlmcacheError(f"its first stage '{firsts[0]}' failed.")
    cfg = run.config(stage2_from).resolve()
    if cfg.stage2:
        inherit_first_stage(cfg)  # its head, not the default one, names and labels the run
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    cfg.cache_key = model_dir.name
    cfg.cache_dir = str(model_dir.parent.parent.resolve())
    return cfg


def _share(groups: list[list[int]], world: int) -> list[list[list[int]]]:
    """The groups of each process: largest first, each to the process with the fewest runs so far (the same
    answer on every rank, so none needs telling)."""
    shares: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for g in sorted(groups, key=len, reverse=True):
        r = load.index(min(load))
        shares[r].append(g)
        load[r] += len(g)
    return shares


def _train(planned: list[PlannedRun], members: list[tuple], rows: dict, progress, log) -> None:
    """Train one group of (index, config, run folder) (one run alone: `train_head`, the single-run path) and
    record each run's row."""

    def record(j: int, outcome: Outcome) -> None:
        i, cfg, run_dir = members[j]
        run = planned[i]
        if outcome.error is None:
            rows[i] = _row(run, cfg, "done", outcome.result, None, run_dir)
        else:
            rows[i] = _failed(run, cfg, outcome.error, outcome.trace, run_dir, log)
        if progress is not None:
            progress.advance(run.method)
        faults.hit("run_recorded")

    if len(members) == 1:
        try:
            outcome = Outcome(result=train_head(_placed(*members[0][1:]), log=log))
        except Exception as e:  # noqa: BLE001 - a bug or a crash in one run must not stop the grid
            outcome = Outcome(error=e, trace=traceback.format_exc())
        record(0, outcome)
        return
    t0 = time.perf_counter()
    train_group([_placed(cfg, run_dir) for _, cfg, run_dir in members], log=log, on_done=record)
    wall = round(time.perf_counter() - t0, 3)
    for i, _, _ in members:  # each run's own seconds are its share; the group's wall time is the group's
        rows[i]["group_wall_seconds"] = wall


def _placed(cfg: TrainConfig, run_dir: str) -> TrainConfig:
    """The config a run trains with: its folder, and under torchrun `auto` made this process's own GPU (the
    device is not part of a run's name)."""
    return replace(cfg, out=run_dir, device=distributed.local_device(cfg.device))


def _failed(run: PlannedRun, cfg, error: BaseException, trace: str | None, run_dir: str | None, log) -> dict:
    """A failed run's row; a crash (not a user error) keeps its traceback in the run folder's error.txt."""
    message = str(error) if isinstance(error, VlmcacheError) else f"{type(error).__name__}: {error}"
    if not isinstance(error, VlmcacheError) and run_dir and trace:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "error.txt").write_text(trace)
    log(f"run failed: {run.dataset} / {run.model['model']} / {run.method} / seed {run.seed}: {message}")
    return _row(run, cfg, "failed", None, message, run_dir)
