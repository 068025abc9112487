"""The pipeline file: a YAML file names datasets, models and seeds and a list of methods; any list in a method
expands into a grid. `load_pipeline` reads one and checks it, every value's line named in its errors.

    datasets: [places_lt]
    models: [{model: ViT-B-16, pretrained: openai}]
    seeds: [0, 1, 2]
    defaults: {epochs: 30, lr: 0.001}
    methods:
      - {name: softmax, head: decoder, loss: ce}
      - {name: focal, head: decoder, loss: focal, loss_params: {gamma: [1, 2]}}   # a grid over gamma
      - {name: cRT, stage2: crt, from: softmax}                                  # second stage on softmax

Its runs are planned in `planning.py` and trained by `ablate.run_pipeline`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from vlmcache import guard
from vlmcache.errors import VlmcacheError
from vlmcache.schemas import SEED_MAX
from vlmcache.train_config import TrainConfig

TOP_KEYS = {"name", "description", "cache_dir", "runs_dir", "datasets", "models", "seeds", "defaults", "methods"}
MODEL_KEYS = {"model", "pretrained", "cache_key", "preprocess", "tail_blocks", "views"}  # the last two: how --extract
# makes the cache a tail head needs (extract --tail-blocks K --views V); they do not pick the cache
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


# YAML's type of a plain value, by its resolved tag, and the TrainConfig field types each may fill: a setting of
# the wrong type is refused by its line (YAML reads `epochs: true` as a boolean, which Python would count as 1)
YAML_TYPES = {f"tag:yaml.org,2002:{t}": t for t in ("bool", "int", "float", "str", "null")}
ACCEPTS = {"int": {"int"}, "float": {"int", "float"}, "bool": {"bool"}, "str": {"str"}}
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a name (text)"}


def _field_type(name: str) -> tuple[str, bool] | None:
    """A TrainConfig field's base type and whether it may be null; None for fields of other shapes (dicts)."""
    kind = {f.name: str(f.type) for f in fields(TrainConfig)}.get(name, "")
    parts = [p.strip() for p in kind.split("|")]
    return (parts[0], "None" in parts) if parts[0] in ACCEPTS else None


def _check_type(v, key: str, where: str, line: str) -> None:
    found = _field_type(key)
    if found is None:
        return
    base, nullable = found
    got = YAML_TYPES.get(v.tag, "str")
    if got in ACCEPTS[base] or (got == "null" and nullable):
        return
    if base == "float" and got == "str" and SCIENTIFIC.fullmatch(v.value):
        return  # YAML 1.1 reads `1e-3` (no dot) as text; it is the number users mean
    raise VlmcacheError(
        f"{line}: '{key}' in {where} must be {TYPE_WORDS[base]}{' or null' if nullable else ''}, got '{v.value}' "
        f"(YAML reads it as {got}{'; quote it for text' if base == 'str' else ''})."
    )


def _check_setting_shapes(node, source: str, where: str, grids: bool) -> None:
    """Values of `defaults` or a method: a single value, or (in a method) a list of single values, a grid axis.
    loss_params and head_params are mappings of the same. Nested lists and other shapes are refused, and so is a
    value of the wrong type for its setting."""

    def line(n) -> str:
        return f"{source}, line {n.start_mark.line + 1}"

    def value(v, key: str) -> None:
        if isinstance(v, yaml.ScalarNode):
            _check_type(v, key, where, line(v))
            return
        if isinstance(v, yaml.SequenceNode) and grids:
            if not v.value:
                raise VlmcacheError(f"{line(v)}: the grid over '{key}' in {where} is an empty list.")
            for item in v.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise VlmcacheError(f"{line(item)}: '{key}' in {where}: a grid lists single values, not lists.")
                _check_type(item, key, where, line(item))
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
    from vlmcache.planning import plan  # here, not above: planning imports this module (Pipeline)

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
        for key in ("tail_blocks", "views"):
            if key in m and not (type(m[key]) is int and 0 <= m[key] <= 1000):
                raise VlmcacheError(f"{where}: '{key}' must be a whole number (extract --{key.replace('_', '-')}).")
        _check_model(m, where)
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not all(type(s) is int and 0 <= s <= SEED_MAX for s in seeds):
        raise VlmcacheError(f"{source}: 'seeds' must be a list of integers in [0, {SEED_MAX}], got {seeds!r}.")
    return datasets, models, seeds
