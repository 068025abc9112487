"""Your own data as a dataset: image folders (one folder per class, or a seeded hold-out), split files under
--root, and webdataset tar shards; and the one rule for a class count implied by labels alone."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vlmcache.errors import VlmcacheError
from vlmcache.images import FileSource
from vlmcache.lt_benchmarks import check_root
from vlmcache.splits import MAX_CLASSES, Dataset, Split, file_split, read_classnames, read_text_lines

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _line_of(path: Path, index: int) -> int:
    """The line number of the index-th entry (non-blank line) of a split file, for an error message."""
    seen = -1
    for lineno, line in enumerate(read_text_lines(path, "split file"), start=1):
        seen += bool(line.strip())
        if seen == index:
            return lineno
    return 0


def _scan_classes(base: Path, root: Path, train: bool) -> dict[str, list[str]]:
    """{class folder: its images, relative to root}; images outside class folders and empty training classes
    are refused, since either would silently give another dataset than the one on disk."""
    loose = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise VlmcacheError(
            f"'{base}' holds {len(loose)} images outside class folders (for example '{loose[0]}'); imagefolder "
            f"reads one sub-folder per class. Move them into class folders."
        )
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {
        c: sorted(
            str(p.relative_to(root).as_posix())
            for p in (base / c).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        for c in classes
    }
    empty = [c for c, f in files.items() if not f]
    if train and empty:
        raise VlmcacheError(
            f"The class folder(s) {empty[:5]} under '{base}' hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
            f"a class without training images cannot be learned. Remove them or add images."
        )
    return files


def _folder_split(split: str, files: dict[str, list[str]], classes: list[str], origin: str, root: Path) -> Split:
    unknown = sorted(set(files) - set(classes))
    if unknown:
        raise VlmcacheError(f"{origin}: class folders {unknown} do not exist in the train split.")
    rel = [p for c in classes for p in files.get(c, [])]
    labels = np.asarray([i for i, c in enumerate(classes) for _ in files.get(c, [])], dtype=np.int64)
    digest = hashlib.sha256("\n".join(f"{p} {lbl}" for p, lbl in zip(rel, labels, strict=True)).encode()).hexdigest()
    return Split(split, FileSource(root, rel), labels, origin, digest)


def _holdout(files: dict[str, list[str]], holdout: float, seed: int) -> tuple[dict, dict]:
    """(train, test) files per class: a seeded share `holdout` of each class, at least one image of every class
    that has two. Written out rather than sklearn's train_test_split(stratify=...), which refuses a class of one
    image and may hold out none of a small class."""
    rng = np.random.default_rng(seed)
    train_files, test_files = {}, {}
    for c in sorted(files):
        order = rng.permutation(len(files[c]))
        n_test = int(round(holdout * len(order))) if len(order) > 1 else 0
        n_test = max(n_test, 1) if len(order) > 1 else 0
        test_files[c] = sorted(files[c][i] for i in order[:n_test])
        train_files[c] = sorted(files[c][i] for i in order[n_test:])
    return train_files, test_files


def imagefolder(name: str, root, split_files: Mapping[str, str], holdout: float = 0.2, seed: int = 0, **_):
    if root is None:
        raise VlmcacheError("The imagefolder dataset needs --root: a folder with one sub-folder per class.")
    if split_files:
        raise VlmcacheError("The imagefolder dataset takes its splits from folders; --split-file is not used.")
    root = check_root(root, name)
    eval_dirs = [d for d in ("val", "test") if (root / d).is_dir()]
    if (root / "train").is_dir() != bool(eval_dirs):
        have = "train/" if (root / "train").is_dir() else " and ".join(f"{d}/" for d in eval_dirs)
        raise VlmcacheError(
            f"'{root}' has {have} but not the other side: give train/ with val/ or test/, or point --root at a "
            f"folder of class folders to hold out a test split from (for example --root {root / 'train'})."
        )
    notes = []
    if (root / "train").is_dir() and eval_dirs:
        train = _scan_classes(root / "train", root, True)
        classes = sorted(train)
        splits = {"train": _folder_split("train", train, classes, str(root / "train"), root)}
        for d in eval_dirs:
            splits[d] = _folder_split(d, _scan_classes(root / d, root, False), classes, str(root / d), root)
    else:
        if not 0 < holdout < 1:
            raise VlmcacheError(f"--holdout must be between 0 and 1 (exclusive), got {holdout}.")
        files = _scan_classes(root, root, True)
        classes = sorted(files)
        train_files, test_files = _holdout(files, holdout, seed)
        if not any(test_files.values()):
            raise VlmcacheError(
                f"The hold-out test split of '{root}' would be empty: every class has fewer than 2 images. "
                f"Add images, or give train/ and test/ folders."
            )
        origin = f"{root} (stratified hold-out {holdout:.0%}, seed {seed})"
        splits = {
            "train": _folder_split("train", train_files, classes, origin, root),
            "test": _folder_split("test", test_files, classes, origin, root),
        }
        notes.append(
            f"No train/ and val/ or test/ folders under '{root}': held out {holdout:.0%} of each class "
            f"(seed {seed}) as the test split."
        )
    if not classes:
        raise VlmcacheError(f"No class folders under '{root}'.")
    if len(splits["train"]) == 0:
        raise VlmcacheError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'.")
    names = [c.replace("_", " ") for c in classes]
    for i, n in enumerate(names):  # two classes of one name: their class texts and reports could not tell them apart
        if names.index(n) != i:
            raise VlmcacheError(
                f"The class folders '{classes[names.index(n)]}' and '{classes[i]}' under '{root}' both name the "
                f"class '{n}' ('_' reads as a space); rename one."
            )
    return Dataset(name, names, splits, root, notes)


def implied_classes_problem(top: int, distinct: int) -> str | None:
    """Without class names, the largest label sets the class count; when that count is above 2 x distinct + 10,
    most classes would have no image: a typo in a label (5,000,000 among 0..2) or sparse ids. Extract, import and
    webdataset input all use this one rule. Returns why, or None."""
    num = top + 1
    if num > 2 * distinct + 10:
        return f"the label {top} would make {num} classes for {distinct} distinct labels"
    return None


def split(name: str, root, split_files: Mapping[str, str], classnames_file: str | None = None, **_):
    if not split_files:
        raise VlmcacheError(
            "The split dataset needs at least one --split-file NAME=PATH (for example train=train.txt)."
        )
    root = check_root(root, name)
    classnames = read_classnames(classnames_file) if classnames_file else None
    num = len(classnames) if classnames else None
    splits = {s: file_split(s, Path(p), root, num) for s, p in split_files.items()}
    notes = []
    if classnames is None:
        num = int(max(int(s.labels.max()) for s in splits.values())) + 1
        distinct = len(set().union(*(np.unique(s.labels).tolist() for s in splits.values())))
        problem = implied_classes_problem(num - 1, distinct)
        if problem:
            s = max(splits.values(), key=lambda s: s.labels.max())
            raise VlmcacheError(
                f"{s.origin}, line {_line_of(Path(s.origin), int(s.labels.argmax()))}: {problem}. Fix the label, or "
                f"pass --classnames FILE naming every class (one per line)."
            )
        classnames = [f"class {i}" for i in range(num)]
        notes.append("No --classnames file: classes are named 'class 0', 'class 1', ...; zero-shot texts mean nothing.")
    return Dataset(name, classnames, splits, root, notes)


def _wds_split(name: str, pattern: str, root: Path | None, label_key: str) -> Split:
    from vlmcache import wds_index
    from vlmcache.images import TarSource

    shards = wds_index.expand(pattern, f"--shards {name}={pattern}")
    base = root or Path(".")
    for relname in shards:  # every shard there before any is read
        if not (base / relname).exists():
            raise VlmcacheError(
                f"--shards {name}={pattern}: the shard '{base / relname}' does not exist"
                + (" (paths are relative to --root)." if root else ".")
            )
        if not (base / relname).is_file():  # a FIFO would block the read, a folder is no tar
            raise VlmcacheError(f"--shards {name}={pattern}: the shard '{base / relname}' is not a regular file.")
    members, labels = [], []
    for relname in shards:
        for shard, key, offset, size, text in wds_index.index_shard(base / relname, relname, label_key):
            if not (text.isascii() and text.isdigit()) or int(text) >= MAX_CLASSES:
                raise VlmcacheError(
                    f"{base / relname}: the sample '{key}' has the label '{text[:40]}', not a class index."
                )
            members.append((shard, key, offset, size))
            labels.append(int(text))
    if not members:
        raise VlmcacheError(f"--shards {name}={pattern}: the shards hold no samples.")
    digest = hashlib.sha256(json.dumps([members, labels]).encode()).hexdigest()
    return Split(name, TarSource(base, members), np.asarray(labels, np.int64), f"webdataset {pattern}", digest)


def webdataset(
    name: str, root, split_files: Mapping[str, str], classnames_file: str | None = None, label_key: str = "cls", **_
) -> Dataset:
    """webdataset tar shards, one brace pattern per split (`--shards train=train-{000000..000099}.tar`)."""
    if not split_files:
        raise VlmcacheError(
            "The wds dataset needs at least one --shards SPLIT=PATTERN (for example train='train-{000..099}.tar')."
        )
    root = Path(root) if root else None
    if root is not None and not root.is_dir():
        raise VlmcacheError(f"--root '{root}' is not a folder.")
    splits = {s: _wds_split(s, p, root, label_key) for s, p in split_files.items()}
    classnames = read_classnames(classnames_file) if classnames_file else None
    top = max(int(s.labels.max()) for s in splits.values())
    notes = []
    if classnames is None:
        distinct = len(set().union(*(np.unique(s.labels).tolist() for s in splits.values())))
        problem = implied_classes_problem(top, distinct)
        if problem:
            raise VlmcacheError(f"{problem} (--shards). Fix the label, or pass --classnames FILE naming every class.")
        classnames = [f"class {i}" for i in range(top + 1)]
        notes.append("No --classnames file: classes are named 'class 0', 'class 1', ...; zero-shot texts mean nothing.")
    elif top >= len(classnames):
        raise VlmcacheError(f"A sample's label {top} is beyond the {len(classnames)} names of '{classnames_file}'.")
    return Dataset(name, classnames, splits, root, notes)
