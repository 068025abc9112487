"""Long-tailed datasets chosen by name: split definitions, class names and class-frequency statistics."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np

from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.images import ArraySource, FileSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Split:
    """One split: where its images come from, their labels, and a hash of its definition."""

    name: str
    source: FileSource | ArraySource
    labels: np.ndarray  # (N,) int64
    origin: str  # the split file, or how the split was made
    sha256: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    classnames: list[str]
    splits: dict[str, Split]
    root: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise unknown_choice(f"split of {self.name}", name, self.splits)
        return self.splits[name]


# --------------------------------------------------------------------------- split files


BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a text file (gzipped when it ends in .gz): UTF-8, or UTF-16/32 with a byte-order mark.

    Anything else is refused naming the line, rather than read into paths or names that are silently wrong."""
    try:
        data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise VlmcacheError(f"The {what} '{path}' cannot be read: {e}") from None
    encoding = next((enc for bom, enc in BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise VlmcacheError(f"{path}, line {line}: a NUL character; is the {what} UTF-16 without a byte-order mark?")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VlmcacheError(
            f"{path}, line {line}: not {encoding.upper()} text ({e.reason}); save the {what} as UTF-8."
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise VlmcacheError(f"{path}, line {line}: a NUL character; is the {what} UTF-16 without a byte-order mark?")
    return text.splitlines()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_relpath(rel: str, where: str) -> None:
    """Refuse paths that would leave the image root: absolute paths and `..` parts."""
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise VlmcacheError(f"{where}: the path '{rel}' is absolute; split paths must be relative to --root.")
    if ".." in p.parts:
        raise VlmcacheError(f"{where}: the path '{rel}' contains '..' and would escape --root.")


MAX_CLASSES = 1_000_000  # no benchmark comes near; a label above it is a typo, not a class


def read_split_file(path: str | os.PathLike, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """Parse `relative/path label` lines (blank lines allowed; the path may contain spaces)."""
    path = Path(path)
    if not path.is_file():
        raise VlmcacheError(f"The split file '{path}' does not exist.")
    relpaths: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(read_text_lines(path, "split file"), start=1):
        line = line.strip()
        if not line:
            continue
        where = f"{path}, line {lineno}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise VlmcacheError(f"{where}: expected 'relative/path label', got '{line[:200]}'.")
        rel, label_text = parts
        if not (label_text.isascii() and label_text.isdigit()):
            raise VlmcacheError(f"{where}: the label '{label_text[:40]}' is not a non-negative integer (0, 1, 2, ...).")
        label = int(label_text)
        bound = num_classes if num_classes is not None else MAX_CLASSES
        if label >= bound:
            raise VlmcacheError(f"{where}: the label {label} is out of range (valid: 0..{bound - 1}).")
        _check_relpath(rel, where)
        relpaths.append(rel)
        labels.append(label)
    if not relpaths:
        raise VlmcacheError(f"The split file '{path}' holds no images.")
    return relpaths, np.asarray(labels, dtype=np.int64)


def read_coco_json(path: Path, num_classes: int | None = None) -> tuple[list[str], np.ndarray]:
    """The official iNaturalist `train2018.json` / `val2018.json` (COCO style: images + annotations)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        files = {im["id"]: im["file_name"] for im in data["images"]}
        pairs = [(files[a["image_id"]], a["category_id"]) for a in data["annotations"]]
        if not all(isinstance(rel, str) for rel, _ in pairs):
            raise TypeError("a file_name is not a string")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise VlmcacheError(f"'{path}' is not an iNaturalist-style JSON file (images + annotations): {e}") from None
    for rel, label in pairs:
        _check_relpath(rel, str(path))
        if type(label) is not int or label < 0 or label >= (num_classes or MAX_CLASSES):
            raise VlmcacheError(f"{path}: the category_id {label} of '{rel}' is out of range.")
    return [p for p, _ in pairs], np.asarray([lbl for _, lbl in pairs], dtype=np.int64)


def _line_of(path: Path, index: int) -> int:
    """The line number of the index-th entry (non-blank line) of a split file, for an error message."""
    seen = -1
    for lineno, line in enumerate(read_text_lines(path, "split file"), start=1):
        seen += bool(line.strip())
        if seen == index:
            return lineno
    return 0


def _package_file(relpath: str) -> Path:
    return Path(str(resources.files("vlmcache") / "data" / relpath))


def read_classnames(path: str | os.PathLike) -> list[str]:
    """One class name per line, line i naming class i."""
    path = Path(path)
    if not path.is_file():
        raise VlmcacheError(f"The class-name file '{path}' does not exist.")
    lines = [line.strip() for line in read_text_lines(path, "class-name file")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise VlmcacheError(f"The class-name file '{path}' is empty.")
    if "" in lines:  # line i names class i: a blank line would shift every name after it
        raise VlmcacheError(f"{path}, line {lines.index('') + 1}: a blank line; line i must name class i.")
    return lines


# --------------------------------------------------------------------------- statistics


def split_stats(labels: np.ndarray, many: int = 100, few: int = 20, train_counts: np.ndarray | None = None) -> dict:
    """Images, classes present, largest and smallest class, and how many of the classes present are many-shot
    (> many), medium or few-shot (< few). Shot groups are defined by training counts (Liu et al. 2019): with
    `train_counts` (images per class in the training split) a test split's classes are grouped by those, as
    every evaluation groups them; without, by this split's own counts (right for a training split only)."""
    own = np.bincount(labels)
    present = np.flatnonzero(own)
    counts = own[present]
    group_counts = counts
    if train_counts is not None:  # a class that has no training image is few-shot (0 < few)
        train = np.zeros(len(own), dtype=np.int64)
        n = min(len(own), len(train_counts))
        train[:n] = np.asarray(train_counts)[:n]
        group_counts = train[present]
    return {
        "images": int(len(labels)),
        "classes": int(len(counts)),
        "max_per_class": int(counts.max()),
        "min_per_class": int(counts.min()),
        "imbalance_ratio": round(float(counts.max() / counts.min()), 2),
        "many": int((group_counts > many).sum()),
        "medium": int(((group_counts >= few) & (group_counts <= many)).sum()),
        "few": int((group_counts < few).sum()),
        "groups_by": "train counts" if train_counts is not None else "own counts",
    }


# --------------------------------------------------------------------------- builders


def _check_root(root: str | os.PathLike | None, name: str) -> Path | None:
    if root is None:
        return None
    root = Path(root)
    if not root.is_dir():
        raise VlmcacheError(
            f"The image root '{root}' for {name} does not exist or is not a folder (--root). {where_data(name)}"
        )
    return root


def _file_split(name: str, path: Path, root: Path | None, num_classes: int) -> Split:
    if path.suffix == ".json":
        relpaths, labels = read_coco_json(path, num_classes)
    else:
        relpaths, labels = read_split_file(path, num_classes)
    return Split(name, FileSource(root or "", relpaths), labels, str(path), _sha256_file(path))


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


def _benchmark(name: str, root, split_files: Mapping[str, str], **_) -> Dataset:
    bench = BENCHMARKS[name]
    root = _check_root(root, name)
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
        splits[split] = _file_split(split, path, root, bench.num_classes)
    return Dataset(name, bench.classnames(), splits, root, notes)


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


def _imagefolder(name: str, root, split_files: Mapping[str, str], holdout: float = 0.2, seed: int = 0, **_):
    if root is None:
        raise VlmcacheError("The imagefolder dataset needs --root: a folder with one sub-folder per class.")
    if split_files:
        raise VlmcacheError("The imagefolder dataset takes its splits from folders; --split-file is not used.")
    root = _check_root(root, name)
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


def _split(name: str, root, split_files: Mapping[str, str], classnames_file: str | None = None, **_):
    if not split_files:
        raise VlmcacheError(
            "The split dataset needs at least one --split-file NAME=PATH (for example train=train.txt)."
        )
    root = _check_root(root, name)
    classnames = read_classnames(classnames_file) if classnames_file else None
    num = len(classnames) if classnames else None
    splits = {s: _file_split(s, Path(p), root, num) for s, p in split_files.items()}
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


def _webdataset(
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
        "ImageNet-LT (Liu et al. 2019): 1,000 classes, 1,280 to 5 train images per class", _benchmark, True
    ),
    "places_lt": DatasetInfo(
        "Places-LT (Liu et al. 2019): 365 classes, 4,980 to 5 train images per class", _benchmark, True
    ),
    "inat18": DatasetInfo(
        "iNaturalist 2018: 8,142 species, 1,000 to 2 train images per class; val is the test set", _benchmark, True
    ),
    "imagefolder": DatasetInfo(
        "your images, one folder per class under --root (train/ and val/ or test/ if present)", _imagefolder, True
    ),
    "split": DatasetInfo(
        "your split files (--split-file NAME=PATH, lines 'relative/path label') under --root", _split, True
    ),
    "wds": DatasetInfo(
        "your webdataset tar shards (--shards SPLIT=PATTERN, the label in each sample's .cls)", _webdataset, False
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
