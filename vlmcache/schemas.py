"""Schemas of the files vlmcache reads back: a manifest, a run's config.json, metrics.json and head.pt.

Caches and run folders are copied, moved, edited and handed over, so nothing in them is trusted: each file is
checked against its schema (types, ranges, cross-field consistency) when it is opened, and a file that fails is
one error naming the file and the field. Paths inside them are bare names within their folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from vlmcache.errors import VlmcacheError

SHARD_FILE = re.compile(r"^shard-(\d{5,})\.h5$")
COUNT_MAX = 2**31 - 1  # the largest count an option takes (epochs, steps, batch sizes, workers): torch's int32
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and every torch generator take seeds in [0, 2**32)


def describe(e: ValidationError, limit: int = 3) -> str:
    """`shards.2.file: String should match pattern ... (got '../x.h5')`, for the first few errors."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "(the whole file)"
        given = err.get("input")
        shown = repr(given) if isinstance(given, str | int | float | bool) or given is None else type(given).__name__
        parts.append(f"{loc}: {err['msg']} (got {shown[:80]})")
    more = f"; and {len(e.errors()) - limit} more" if len(e.errors()) > limit else ""
    return "; ".join(parts) + more


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


# --------------------------------------------------------------------------- manifest.json


class Skipped(_Strict):
    row: int = Field(ge=0)
    path: str
    reason: str


class ShardEntry(_Strict):
    model_config = ConfigDict(strict=True, extra="forbid")

    file: str = Field(pattern=SHARD_FILE.pattern)  # a bare name inside the split folder, never a path
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    index: int = Field(ge=0)
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    rows: int = Field(ge=0)
    skipped: list[Skipped]

    @model_validator(mode="after")
    def _consistent(self) -> ShardEntry:
        if int(SHARD_FILE.match(self.file).group(1)) != self.index:
            raise ValueError(f"the file '{self.file}' is not the name of shard {self.index}")
        if self.stop < self.start:
            raise ValueError(f"the row range [{self.start}, {self.stop}) is empty or reversed")
        if self.rows + len(self.skipped) != self.stop - self.start:
            raise ValueError(
                f"{self.rows} rows plus {len(self.skipped)} skipped do not fill the range [{self.start}, {self.stop})"
            )
        rows = [s.row for s in self.skipped]
        if len(set(rows)) != len(rows) or any(not self.start <= r < self.stop for r in rows):
            raise ValueError("skipped rows repeat or lie outside the shard's range")
        return self


class Dims(_Strict):
    pooled: int = Field(ge=1)
    tokens: list[int] | None = Field(default=None, min_length=2, max_length=2)
    prefix: list[int] | None = Field(default=None, min_length=2, max_length=2)


class Fingerprint(_Strict):
    num_classes: int = Field(ge=1, le=10_000_000)
    tokens: bool = False
    tail_blocks: int = Field(default=0, ge=0)
    views: int = Field(default=0, ge=0)
    shard_size: int | None = Field(default=None, ge=1)


class Manifest(_Strict):
    format: Literal[1]
    fingerprint: Fingerprint
    origin: str
    n_rows: int = Field(ge=0)
    n_shards: int = Field(ge=0)
    complete: bool
    dims: Dims
    shards: list[ShardEntry]
    extract_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        size = self.fingerprint.shard_size
        if size is not None and self.n_shards != -(-self.n_rows // size):
            raise ValueError(f"n_shards {self.n_shards} does not fit {self.n_rows} rows in shards of {size}")
        if self.fingerprint.tokens and (self.dims.tokens is None or min(self.dims.tokens) < 1):
            raise ValueError("the fingerprint says tokens are cached but dims.tokens gives no (T, W) shape")
        if self.fingerprint.tail_blocks and (self.dims.prefix is None or min(self.dims.prefix) < 1):
            raise ValueError("the fingerprint says a prefix is cached but dims.prefix gives no (T, W) shape")
        indices = [e.index for e in self.shards]
        if len(set(indices)) != len(indices):
            raise ValueError(f"a shard is listed twice (indices {sorted(indices)})")
        previous = 0
        for e in sorted(self.shards, key=lambda e: e.start):
            if e.index >= self.n_shards or e.stop > self.n_rows:
                raise ValueError(f"shard {e.index} lies outside {self.n_shards} shards of {self.n_rows} rows")
            if size is not None and (e.start != e.index * size or e.stop != min(e.start + size, self.n_rows)):
                raise ValueError(f"shard {e.index} covers [{e.start}, {e.stop}), not its rows in shards of {size}")
            if e.start < previous:
                raise ValueError(f"shard {e.index}'s rows [{e.start}, {e.stop}) overlap another shard's")
            previous = e.stop
        if self.complete:
            covered = sum(e.stop - e.start for e in self.shards)
            if len(self.shards) != self.n_shards or covered != self.n_rows:
                raise ValueError(
                    f"marked complete, but {len(self.shards)} of {self.n_shards} shards cover {covered} of "
                    f"{self.n_rows} rows"
                )
        return self


def check_manifest(data: Any, path: Path) -> dict:
    """The manifest as read, once it passes the schema."""
    if not isinstance(data, dict):
        raise VlmcacheError(f"The manifest '{path}' is not a JSON object; re-extract with --overwrite.")
    if data.get("format") != 1:
        raise VlmcacheError(f"The manifest '{path}' has format {data.get('format')!r}; this vlmcache reads 1.")
    try:
        Manifest.model_validate(data)
    except ValidationError as e:
        raise VlmcacheError(
            f"The manifest '{path}' is not valid: {describe(e)}. It was edited or damaged; "
            f"re-extract the split with --overwrite."
        ) from None
    return data


# --------------------------------------------------------------------------- run folders


def finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    overall: float = Field(ge=0, le=1, allow_inf_nan=False)
    many: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    medium: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    few: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top5: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    mean_per_class: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)


class RunResult(BaseModel):
    """metrics.json: written last, so a run folder with one is finished."""

    model_config = ConfigDict(extra="allow")

    metrics: Metrics
    cost: dict[str, Any]
    history: list[dict[str, Any]]


def check_metrics(data: Any, path: Path) -> dict:
    try:
        RunResult.model_validate(data)
    except ValidationError as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache metrics.json: {describe(e)}.") from None
    return data


class RunMeta(BaseModel):
    """config.json of a run: the resolved config and what evaluation needs."""

    model_config = ConfigDict(extra="allow")

    config: dict[str, Any]
    kind: Literal["head", "finetune"] = "head"
    eval_split: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    train_counts: list[int] = Field(min_length=1)
    weights: str | None = None  # fine-tuning: the tuned tower's file; only its name is used, inside the run folder


def check_run_config(data: Any, path: Path, config_type: type) -> tuple[dict, Any]:
    """config.json's dict and its `config` as an instance of `config_type` (TrainConfig or FinetuneConfig).

    Every key of the config must be a field of the dataclass and of its type; the caller's `resolve()` then
    checks ranges and names as it does for a command line.
    """
    try:
        meta = RunMeta.model_validate(data)
    except ValidationError as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache run config: {describe(e)}.") from None
    if any(c < 0 for c in meta.train_counts):
        raise VlmcacheError(f"'{path}': train_counts holds a negative count.")
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(meta.config) - known)
    if unknown:
        raise VlmcacheError(f"'{path}': config has unknown keys {unknown}; it was written by another vlmcache.")
    try:
        cfg = TypeAdapter(config_type).validate_python(meta.config)
    except ValidationError as e:
        raise VlmcacheError(f"'{path}' is not a valid run config: config.{describe(e)}.") from None
    except VlmcacheError as e:
        raise VlmcacheError(f"'{path}': {e}") from None
    return data, cfg


class HeadFile(BaseModel):
    """head.pt: the head by name with its settings and weights, and an optional second stage."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, strict=True)

    head: str
    in_dim: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    head_params: dict[str, Any]
    head_state: dict[str, Any]
    stage2: str | None = None
    stage2_params: dict[str, Any] | None = None
    stage2_state: dict[str, Any] | None = None


def check_head_file(saved: Any, path: Path) -> dict:
    """head.pt's dict, every tensor in it finite (a diverged head is not a result)."""
    import torch

    if not isinstance(saved, dict):
        raise VlmcacheError(f"'{path}' is not a vlmcache head (it holds a {type(saved).__name__}).")
    try:
        HeadFile.model_validate(saved)
    except ValidationError as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache head: {describe(e)}.") from None
    for part in ("head_state", "stage2_state"):
        for name, t in (saved.get(part) or {}).items():
            if not isinstance(t, torch.Tensor):
                raise VlmcacheError(f"'{path}': {part}.{name} is not a tensor.")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise VlmcacheError(f"'{path}': {part}.{name} holds NaN or inf; the run diverged.")
    return saved
