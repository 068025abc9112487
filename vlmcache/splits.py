"""What a split is (`Split`, `Dataset`), the files that define one (split files, iNaturalist JSON, class-name
files) read strictly, and class-frequency statistics."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from vlmcache.errors import VlmcacheError, unknown_choice
from vlmcache.images import ArraySource, FileSource


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


def file_split(name: str, path: Path, root: Path | None, num_classes: int) -> Split:
    if path.suffix == ".json":
        relpaths, labels = read_coco_json(path, num_classes)
    else:
        relpaths, labels = read_split_file(path, num_classes)
    return Split(name, FileSource(root or "", relpaths), labels, str(path), _sha256_file(path))


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
