"""Long-tailed datasets chosen by name: the registry (`DATASETS`, `load_dataset`), `--split-file` and `--shards`
values parsed, and the built-in digits_lt. The datasets themselves are built in `lt_benchmarks` (published
benchmarks) and `user_data` (your folders, split files and shards), from the splits of `splits`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from vlmcache import lt_benchmarks, user_data
from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.images import ArraySource
from vlmcache.splits import Dataset, Split

DIGITS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_IMBALANCE = 10  # largest / smallest training class
DIGITS_MAX_PER_CLASS = 140
DIGITS_TEST_PER_CLASS = 30


def _digits_lt(name: str, root, split_files: Mapping[str, str], seed: int = 0, **_) -> Dataset:
    """scikit-learn's bundled 8x8 digits, made long-tailed: class c keeps 140 * 10^(-c/9) training images."""
    if root is not None or split_files:
        raise VlmcacheError("digits_lt is built in; it takes no --root or --split-file.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        n_train = int(DIGITS_MAX_PER_CLASS * DIGITS_IMBALANCE ** (-c / 9))
        test_idx.extend(idx[:DIGITS_TEST_PER_CLASS])
        train_idx.extend(idx[DIGITS_TEST_PER_CLASS : DIGITS_TEST_PER_CLASS + n_train])
    splits = {}
    for split, idx in (("train", np.asarray(train_idx)), ("test", np.asarray(test_idx))):
        digest = hashlib.sha256(f"digits_lt-v1 seed={seed} ".encode() + idx.tobytes()).hexdigest()
        source = ArraySource(images[idx], [f"digits[{i}]" for i in idx])
        splits[split] = Split(
            split, source, digits.target[idx].astype(np.int64), f"sklearn digits, seed {seed}", digest
        )
    note = (
        f"digits_lt: scikit-learn's 8x8 digits, imbalance ratio {DIGITS_IMBALANCE} "
        f"({DIGITS_MAX_PER_CLASS} to {int(DIGITS_MAX_PER_CLASS / DIGITS_IMBALANCE)} training images per class), "
        f"{DIGITS_TEST_PER_CLASS} test images per class."
    )
    return Dataset(name, list(DIGITS_NAMES), splits, None, [note])


@dataclass(frozen=True)
class DatasetInfo:
    description: str
    build: Callable[..., Dataset]
    needs_root: bool


DATASETS: dict[str, DatasetInfo] = {
    "imagenet_lt": DatasetInfo(
        "ImageNet-LT (Liu et al. 2019): 1,000 classes, 1,280 to 5 train images per class", lt_benchmarks.benchmark, True
    ),
    "places_lt": DatasetInfo(
        "Places-LT (Liu et al. 2019): 365 classes, 4,980 to 5 train images per class", lt_benchmarks.benchmark, True
    ),
    "inat18": DatasetInfo(
        "iNaturalist 2018: 8,142 species, 1,000 to 2 train images per class; val is the test set",
        lt_benchmarks.benchmark,
        True,
    ),
    "imagefolder": DatasetInfo(
        "your images, one folder per class under --root (train/ and val/ or test/ if present)",
        user_data.imagefolder,
        True,
    ),
    "split": DatasetInfo(
        "your split files (--split-file NAME=PATH, lines 'relative/path label') under --root", user_data.split, True
    ),
    "wds": DatasetInfo(
        "your webdataset tar shards (--shards SPLIT=PATTERN, the label in each sample's .cls)",
        user_data.webdataset,
        False,
    ),
    "digits_lt": DatasetInfo(
        "built in: scikit-learn digits made long-tailed (10 classes, ratio 10), for the demo", _digits_lt, False
    ),
}


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split_files: Mapping[str, str] | None = None,
    classnames_file: str | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    label_key: str = "cls",
) -> Dataset:
    """Build a dataset by name. `root` may be None to inspect split definitions without images."""
    if name not in DATASETS:
        raise unknown_choice("dataset", name, DATASETS)
    if classnames_file and name not in ("split", "wds"):
        raise VlmcacheError(f"--classnames is for the 'split' and 'wds' datasets; {name} has its own class names.")
    return DATASETS[name].build(
        name, root, dict(split_files or {}), classnames_file=classnames_file, holdout=holdout, seed=seed,
        label_key=label_key,
    )  # fmt: skip


def parse_split_files(values: list[str] | None, option: str = "--split-file") -> dict[str, str]:
    """`["train=a.txt", "test=b.txt"]` -> `{"train": "a.txt", "test": "b.txt"}`."""
    out: dict[str, str] = {}
    example = "train=train.txt" if option == "--split-file" else "train='train-{000..009}.tar'"
    for value in values or []:
        split, sep, path = value.partition("=")
        if not sep or not split or not path:
            raise VlmcacheError(f"{option} takes NAME=PATH (for example {example}), got '{value}'.")
        if split in out:
            raise VlmcacheError(f"{option} names the split '{split}' twice.")
        out[split] = path
    return out
