"""A pipeline's runs: its grids expanded into one planned run per (dataset, model, seed, method and grid point),
the runs that resolve to one config, and the caches the grid reads that are missing (checked before the first run).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

from pydantic import TypeAdapter, ValidationError

from vlmcache.errors import VlmcacheError
from vlmcache.features import find_cache
from vlmcache.pipeline import GRID_DICTS, Pipeline
from vlmcache.schemas import describe
from vlmcache.train_config import TrainConfig

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
    exists: bool = False  # there is a cache, without the tokens or the prefix: made again with them
    prefix: bool = False  # a tail head in the grid needs the cache's prefix (the model entry's tail_blocks, views)

    def command(self, cache_dir: str) -> str:
        m = self.model
        pretrained = m.get("pretrained")
        return (
            f"vlmcache extract --dataset {self.dataset} --model {m['model']}"
            + (f" --pretrained {pretrained}" if pretrained is not None else "")
            + (" --preprocess seed" if m.get("preprocess") == "seed" else "")
            + (" --tokens" if self.tokens else "")
            + (f" --tail-blocks {m.get('tail_blocks') or 'K'}" if self.prefix else "")
            + (f" --views {m['views']}" if self.prefix and m.get("views") else "")
            + (" --overwrite" if self.exists else "")
            + f" --cache-dir {cache_dir}"
            + ("" if self.dataset in NO_USER_DATA else " --root ROOT")
        )


NO_USER_DATA = ("digits_lt",)  # datasets whose images ship with vlmcache: `ablate --extract` can make them


def missing_caches(pipe: Pipeline) -> list[MissingCache]:
    """Every (dataset, model) cache the grid reads that is not there, or lacks the tokens a decoder needs or the
    prefix a tail head needs: checked before the first run, so that a grid does not fail run by run."""
    from vlmcache import cache

    planned = plan(pipe)
    found = []
    for dataset, model in itertools.product(pipe.datasets, pipe.models):
        heads = {
            {**pipe.defaults, **r.settings}.get("head") for r in planned if r.dataset == dataset and r.model == model
        }
        tokens, prefix = "decoder" in heads, "tail" in heads
        try:
            model_dir = find_cache(
                pipe.cache_dir, dataset, str(model["model"]), _opt_str(model.get("pretrained")),
                _opt_str(model.get("cache_key")), str(model.get("preprocess", "model")),
            )  # fmt: skip
        except VlmcacheError as e:
            found.append(MissingCache(dataset, model, tokens, str(e), prefix=prefix))
            continue
        fingerprint = (cache.read_manifest(model_dir / "train") or {}).get("fingerprint", {})
        lacks = []
        if tokens and not fingerprint.get("tokens"):
            lacks.append("tokens for the decoder")
        if prefix and not fingerprint.get("tail_blocks"):
            lacks.append("prefix for the tail head")
        if lacks:
            found.append(
                MissingCache(dataset, model, tokens, f"'{model_dir}' has no {' and no '.join(lacks)}", True, prefix)
            )
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
    no_k = [m for m in missing if m.prefix and not m.model.get("tail_blocks")]
    if no_k:
        raise VlmcacheError(
            f"{pipe.source}: a tail head needs a prefix cache, and --extract takes its K from the model entry: add "
            f"tail_blocks (and views) to {{model: {no_k[0].model['model']}, ...}}, or run: "
            + no_k[0].command(pipe.cache_dir)
        )
    for m in missing:
        log(f"extracting: {m.command(pipe.cache_dir)}")
        cfg = ExtractConfig(
            dataset=m.dataset, model=str(m.model["model"]), pretrained=_opt_str(m.model.get("pretrained")),
            preprocess=str(m.model.get("preprocess", "model")), cache_dir=pipe.cache_dir, tokens=m.tokens,
            tail_blocks=int(m.model.get("tail_blocks") or 0) if m.prefix else 0,
            views=int(m.model.get("views") or 0) if m.prefix else 0,
            workers=0, shard_size=256, overwrite=m.exists,
        )  # fmt: skip
        run_extract(cfg, progress=progress, log=log)
