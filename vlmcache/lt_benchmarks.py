"""The published long-tailed benchmarks (ImageNet-LT, Places-LT, iNaturalist 2018): their split files, shipped or
under --root, their class names, and where their images and split files come from."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.splits import Dataset, file_split, read_classnames


def _package_file(relpath: str) -> Path:
    return Path(str(resources.files("vlmcache") / "data" / relpath))


def check_root(root: str | os.PathLike | None, name: str) -> Path | None:
    if root is None:
        return None
    root = Path(root)
    if not root.is_dir():
        raise VlmcacheError(
            f"The image root '{root}' for {name} does not exist or is not a folder (--root). {where_data(name)}"
        )
    return root


@dataclass(frozen=True)
class Benchmark:
    """A published long-tailed benchmark: split files by split name, and its class names."""

    files: dict[str, tuple[str, ...]]  # split -> candidate file names under --root or shipped
    classnames: Callable[[], list[str]]
    num_classes: int
    images: str  # where the images are published
    splits_from: str  # where the split files not shipped with vlmcache are published


def _imagenet_names() -> list[str]:
    from open_clip import IMAGENET_CLASSNAMES  # the standard CLIP names, in ImageNet-LT's label order

    return list(IMAGENET_CLASSNAMES)


def _places_names() -> list[str]:
    # `apartment_building-outdoor apartment_building-outdoor` -> "apartment building (outdoor)"
    names = []
    for line in read_classnames(_package_file("places_lt/classnames.txt")):
        base, _, qualifier = line.split(maxsplit=1)[-1].replace("_", " ").partition("-")
        names.append(f"{base} ({qualifier})" if qualifier else base)
    return names


def _inat_names() -> list[str]:
    return [line.split("\t", 1)[1] for line in read_classnames(_package_file("inat18/classnames.txt"))]


BENCHMARKS: dict[str, Benchmark] = {
    "imagenet_lt": Benchmark(
        {
            "train": ("ImageNet_LT_train.txt",),
            "val": ("ImageNet_LT_val.txt",),
            "test": ("ImageNet_LT_test.txt",),
        },
        _imagenet_names,
        1000,
        "ILSVRC-2012 (ImageNet-1k) train and val images, https://image-net.org/download.php (registration); "
        "val sorted into one folder per class (wnid), as the split files' paths expect",
        "ImageNet_LT_train.txt: the OLTR project (Liu et al. 2019), "
        "https://github.com/zhmiao/OpenLongTailRecognition-OLTR (its README links the ImageNet_LT split files)",
    ),
    "places_lt": Benchmark(
        {"train": ("Places_LT_train.txt",), "val": ("Places_LT_val.txt",), "test": ("Places_LT_test.txt",)},
        _places_names,
        365,
        "Places365-Standard, small (256 x 256) images, train and val, http://places2.csail.mit.edu/download.html; "
        "arranged as the split files' paths say (train/<class>/..., val/<class>/...)",
        "none needed: vlmcache ships Places-LT's train, val and test split files (from the OLTR project)",
    ),
    "inat18": Benchmark(
        # The iNat 2018 validation set is the benchmark's test set.
        {"train": ("iNaturalist18_train.txt", "train2018.json"), "val": ("iNaturalist18_val.txt", "val2018.json")},
        _inat_names,
        8142,
        "iNaturalist 2018 competition images (train_val2018.tar.gz) and train2018.json / val2018.json, "
        "https://github.com/visipedia/inat_comp/tree/master/2018",
        "train2018.json from the competition (above), or iNaturalist18_train.txt (the list of the long-tailed "
        "literature, e.g. https://github.com/facebookresearch/classifier-balancing); val ships with vlmcache",
    ),
}


def where_data(name: str, cache_dir: str = "cache") -> str:
    """Where a benchmark's images and split files come from, the layout expected under --root (the first line of
    each split file vlmcache ships), and the command that extracts it; '' for other datasets."""
    if name not in BENCHMARKS:
        return ""
    bench = BENCHMARKS[name]
    examples = []
    for split, candidates in bench.files.items():
        for c in candidates:
            shipped = _package_file(f"{name}/{c}.gz")
            if shipped.is_file():
                with gzip.open(shipped, "rt") as f:
                    examples.append(f"ROOT/{f.readline().split()[0]} ({split}, from {c})")
                break
    train = bench.files["train"][0]
    shipped_train = _package_file(f"{name}/{train}.gz").is_file()
    command = (
        f"vlmcache extract --dataset {name} --root ROOT"
        + ("" if shipped_train else f" --split-file train=PATH/{train}")
        + f" --cache-dir {cache_dir}"
    )
    return (
        f"{name}: images: {bench.images}. Split files: {bench.splits_from}. Layout under --root, as the split "
        f"files' paths say: {'; '.join(examples)}. Then: {command}"
    )


def benchmark(name: str, root, split_files: Mapping[str, str], **_) -> Dataset:
    bench = BENCHMARKS[name]
    root = check_root(root, name)
    for split in split_files:
        if split not in bench.files:
            raise unknown_choice(f"split of {name}", split, bench.files)
    splits, notes = {}, []
    for split, candidates in bench.files.items():
        if split in split_files:
            path = Path(split_files[split])
        else:
            found = [Path(root, c) for c in candidates if root and Path(root, c).is_file()]
            shipped = [_package_file(f"{name}/{c}.gz") for c in candidates if _package_file(f"{name}/{c}.gz").is_file()]
            path = (found or shipped or [None])[0]
            if path is None:
                where = f"under --root '{root}'" if root else "(no --root given)"
                notes.append(
                    f"The {split} split needs {' or '.join(candidates)} {where}, or --split-file {split}=PATH."
                )
                continue
        splits[split] = file_split(split, path, root, bench.num_classes)
    return Dataset(name, bench.classnames(), splits, root, notes)
