"""What `vlmcache extract` is asked to do, and everything about it that can be checked before torch is imported.

The job's config (ExtractConfig), the name of the folder its caches live in (`cache_name`, which train-head and the
other readers use too, to find a cache by the flags that made it), and `prepare`: the options, the dataset, its
splits and its images checked, in a module that imports neither torch nor open_clip nor h5py. A mistyped flag or a
missing `--root` then answers in a fraction of a second instead of after torch's import (seconds, tens of seconds
on a busy machine). vlmcache.extract re-exports all of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from importlib.util import find_spec
from pathlib import Path

from vlmcache import guard
from vlmcache.choices import DATASETS, DEFAULT_TEMPLATE_SETS, TEMPLATE_SETS, USER_DATASETS, default_workers
from vlmcache.datasets import load_dataset
from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.images import FileSource
from vlmcache.lt_benchmarks import where_data
from vlmcache.splits import Dataset

DECODE_MODES = ("pil", "draft", "gpu")
COUNT_MAX = 2**31 - 1  # as vlmcache.schemas.COUNT_MAX: the largest count an option takes
SEED_MAX = 2**32 - 1  # as vlmcache.schemas.SEED_MAX (a test keeps them equal); pydantic is not needed to say so
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def model_names() -> list[str]:
    """The model names open_clip knows, read from its model-config folders without importing it (open_clip pulls
    in torch and torchvision). open_clip's own list_models() stays the last word (ExtractConfig.validate); this
    one lets a mistyped --model fail at once."""
    folders = [Path(str(resources.files("vlmcache") / "model_configs"))]
    spec = find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.json")})


@dataclass
class ExtractConfig:
    """Everything `vlmcache extract` needs; checked once in `check` (no torch) and `validate` (with open_clip)."""

    dataset: str
    root: str | None = None
    # the cache's dataset folder, `cache/<name>/<key>`: for imagefolder and split, default the root folder's name
    name: str | None = None
    split_files: dict[str, str] = field(default_factory=dict)
    classnames_file: str | None = None
    splits: list[str] | None = None  # None: every split the dataset defines
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    preprocess_from: str | None = None
    preprocess: str = "model"  # the weights' own preprocessing, or the seed study's ("seed")
    cache_dir: str = "cache"
    shard_size: int = 1024
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    tokens: bool = False
    tail_blocks: int = 0  # K > 0: also cache the prefix, the residual stream entering the tower's last K blocks
    views: int = 0
    view_seed: int = 0
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATE_SETS))
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    verify: bool = False  # on resume, also re-hash the finished shards
    holdout: float = 0.2
    seed: int = 0
    label_key: str = "cls"  # wds: the extension of each sample's label member
    decode: str = "pil"  # DECODE_MODES: how JPEGs are decoded (draft: at a reduced DCT scale; its own cache)

    def check(self) -> None:
        """Every option that can be checked without torch or open_clip; sets `name` to the cache's folder name."""
        for name in ("shard_size", "batch_size"):
            if not 1 <= getattr(self, name) <= COUNT_MAX:
                raise VlmcacheError(
                    f"--{name.replace('_', '-')} must be between 1 and {COUNT_MAX}, got {getattr(self, name)}."
                )
        for name in ("workers", "views", "tail_blocks"):  # 0: none (in the main process, one view, no prefix)
            if not 0 <= getattr(self, name) <= COUNT_MAX:
                raise VlmcacheError(
                    f"--{name.replace('_', '-')} must be between 0 and {COUNT_MAX}, got {getattr(self, name)}."
                )
        if self.decode not in DECODE_MODES:
            raise unknown_choice("--decode", self.decode, DECODE_MODES)
        if not self.templates:
            raise VlmcacheError(f"--templates needs at least one template set: {', '.join(TEMPLATE_SETS)}.")
        for t in self.templates:
            if t not in TEMPLATE_SETS:
                raise unknown_choice("template set", t, TEMPLATE_SETS)
        names = model_names()
        if names and self.model not in names:
            raise unknown_choice("model", self.model, names)
        if not 0 <= self.seed <= SEED_MAX or not 0 <= self.view_seed <= SEED_MAX:
            raise VlmcacheError(f"--seed and --view-seed must be between 0 and {SEED_MAX}.")
        guard.check_output(self.cache_dir, "--cache-dir", "cache-root")
        for split in self.split_files:  # the name rule: each split becomes a folder
            guard.check_name(split, f"The split name of {'--shards' if self.dataset == 'wds' else '--split-file'}")
        for split in self.splits or []:
            guard.check_name(split, "--splits")
        if self.name is not None:
            guard.check_name(self.name, "--name")
        self.name = cache_name(self.dataset, self.root, self.name)

    def validate(self) -> None:
        """`check`, then what needs open_clip: its own list of models and the template sets it holds."""
        from vlmcache.encoders import list_models
        from vlmcache.templates import get_templates

        self.check()
        for t in self.templates:
            get_templates(t)
        if self.model not in list_models():
            raise unknown_choice("model", self.model, list_models())


def cache_name(dataset: str, root: str | None, name: str | None) -> str:
    """The folder a dataset's caches live in: the benchmark's own name, or for the user's own images (imagefolder,
    split) `--name`, by default the root folder's name, so that several image folders are cached side by side."""
    if dataset not in USER_DATASETS:
        if name not in (None, dataset):
            raise VlmcacheError(f"--name names the caches of imagefolder and split datasets; {dataset} is {dataset}.")
        return dataset
    if name is None:
        name = Path(root).resolve().name if root else dataset
        if not NAME_RE.match(name) or name in DATASETS:
            name = dataset if not NAME_RE.match(name) else f"{dataset}-{name}"
        return name
    if not NAME_RE.match(name):
        raise VlmcacheError(
            f"--name '{name}' must be a plain folder name: letters, digits, '.', '_' or '-', at most 64 characters."
        )
    if name in DATASETS and name != dataset:
        raise VlmcacheError(f"--name '{name}' is a built-in dataset's name; choose another.")
    return name


def load_extract_dataset(cfg: ExtractConfig) -> Dataset:
    """The dataset to extract, named as its cache folder (`cfg.name`)."""
    dataset = load_dataset(
        cfg.dataset, cfg.root, cfg.split_files, cfg.classnames_file, cfg.holdout, cfg.seed, cfg.label_key
    )
    dataset.name = cfg.name or cache_name(cfg.dataset, cfg.root, None)
    return dataset


def check_images_reachable(dataset: Dataset, splits: list[str]) -> None:
    """Each split that reads image files has a --root, and the images it samples exist under it."""
    for s in splits:
        source = dataset.splits[s].source
        if isinstance(source, FileSource):
            if dataset.root is None:
                raise VlmcacheError(
                    f"{dataset.name} reads image files; pass --root, the folder its split paths start from. "
                    + where_data(dataset.name)
                )
            missing = source.first_missing()
            if missing:
                raise VlmcacheError(
                    f"None of the sampled images of the {s} split exist under --root '{dataset.root}' "
                    f"(for example '{missing}'). Is --root the folder the split file's paths start from? "
                    + where_data(dataset.name)
                )


def prepare(cfg: ExtractConfig) -> tuple[Dataset, list[str]]:
    """The options checked, the dataset loaded, and the splits to extract with their images found: all a mistake
    can be caught by, before torch is imported. Returns the dataset and the splits to extract."""
    cfg.check()
    dataset = load_extract_dataset(cfg)
    splits = cfg.splits or list(dataset.splits)
    missing = [s for s in splits if s not in dataset.splits]
    if missing:
        hint = " ".join(dataset.notes) or f"{cfg.dataset} has the splits: {', '.join(dataset.splits)}."
        raise VlmcacheError(
            f"Cannot extract the split(s) {', '.join(missing)} of {cfg.dataset}. {hint} {where_data(cfg.dataset)}"
        )
    check_images_reachable(dataset, splits)
    return dataset, splits
