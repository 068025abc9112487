"""The one output guard and the one name rule: where vlmcache may write, and which names may become folders.

Every command that writes calls `check_output` on each path the user named for output, before any work, so a
mistake costs nothing and nothing outside the output changes. The rules (docs/outputs.md lists every file):

- the path must be creatable: no part longer than the system allows, not under a file or a broken link, in a
  writable folder;
- it must not lie inside a cache (a split folder, a model folder with text.h5, a dataset folder of caches) or a
  run folder, unless that folder is the one the caller writes for this very output (`within`: `eval
  --save-predictions` into the run it evaluates);
- it must not be a symbolic link, and not an existing file or a non-empty folder, unless `overwrite`, and then
  only a file or folder of the same kind that vlmcache wrote (each kind's marker says so);
- a container (`--runs-dir`, `--cache-dir`: folders that hold many outputs) may exist, hold things and be a link
  to a folder (a cache on a bigger disk); it must only not be, or lie inside, a cache or run.

Every name that becomes a folder (dataset, split, run, cache key, `--name`) passes `check_name`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from vlmcache.errors import VlmcacheError

MANIFEST, TEXT_FILE, CONFIG, METRICS = "manifest.json", "text.h5", "config.json", "metrics.json"
RUN_FILES = ("metrics.json", "head.pt", "checkpoint.pt")  # a config.json beside one of these: a run folder
# a run folder is also one that holds a fine-tuning checkpoint (a run under way) or only ablate's error.txt
EXPORT_MARKER = "export.json"  # written last into an export folder: vlmcache wrote it
PREDICTIONS_MARKER = (b"vlmcache", b"predictions")  # parquet schema metadata of --save-predictions files
PREDICTION_COLUMNS = ("row", "path", "label", "class_name", "pred", "pred_name", "correct", "topk", "topk_scores")
TMP_MARK = ".tmp-"  # temporary files and staging folders are `<final name>.tmp-<pid>...` (atomic.TMP_MARK is this one)
SCAN_LIMIT = 2000  # entries of one folder looked at to tell a cache's dataset folder: bounded on huge folders


# --------------------------------------------------------------------------- the name rule


def check_name(value: object, what: str) -> str:
    """`value` if it may become one folder's name, else a VlmcacheError naming `what` and the rule.

    Refused: empty, `.` and `..`, a path separator, a leading dot (hidden, and the staging folders' mark), control
    characters, more than 255 bytes, and the temporary mark (`.tmp-`: a name holding it would be taken for an
    unfinished write and swept away). Applied to every name that becomes a folder: dataset, split, run, cache key,
    `--name`, wherever it is read (options, pipelines, manifests, import)."""
    if not isinstance(value, str):
        raise VlmcacheError(f"{what} must be a name (a string), got {value!r}.")
    problem = None
    if value in ("", ".", ".."):
        problem = "is not a folder name"
    elif "/" in value or "\\" in value or (os.altsep and os.altsep in value):
        problem = "holds a path separator"
    elif value.startswith("."):
        problem = "starts with a dot"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        problem = "holds a control character"
    elif len(value.encode("utf-8", "surrogatepass")) > 255:
        problem = "is longer than 255 bytes"
    elif TMP_MARK in value:
        problem = f"holds '{TMP_MARK}', the mark of vlmcache's temporary files"
    if problem:
        raise VlmcacheError(
            f"{what} {value!r} {problem}; a name that becomes a folder is one plain name: no '/', '\\', leading "
            f"dot, '.', '..', '{TMP_MARK}' or control characters."
        )
    return value


def _name_validator(value: str) -> str:
    try:
        return check_name(value, "the name")
    except VlmcacheError as e:
        raise ValueError(str(e)) from None


def folder_name_type():
    """`Annotated[str, ...]` for pydantic schemas: a field that becomes a folder name follows `check_name`."""
    from pydantic import AfterValidator

    return Annotated[str, AfterValidator(_name_validator)]


# --------------------------------------------------------------------------- what vlmcache wrote


def _json_object(path: Path) -> dict | None:
    try:
        if path.is_file() and path.stat().st_size < (64 << 20):
            obj = json.loads(path.read_text(encoding="utf-8"))
            return obj if isinstance(obj, dict) else None
    except (OSError, ValueError, RecursionError):
        return None
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def is_run(folder: Path) -> bool:
    """A run folder (train-head or finetune): config.json beside metrics.json, head.pt or a checkpoint."""
    return _is_file(folder / CONFIG) and any(_is_file(folder / f) for f in RUN_FILES)


def vlmcache_folder(folder: Path) -> str | None:
    """What vlmcache folder `folder` is ('a cache split', 'a cache', 'a cache's dataset folder', 'a run', 'an
    export'), or None for any other folder."""
    try:
        if not folder.is_dir():
            return None
    except OSError:
        return None
    if _is_file(folder / MANIFEST) and "fingerprint" in (_json_object(folder / MANIFEST) or {}):
        return "a cache split"
    if _is_file(folder / TEXT_FILE):
        return "a cache"
    if is_run(folder):
        return "a run"
    if _is_file(folder / EXPORT_MARKER):
        return "an export"
    try:
        with os.scandir(folder) as entries:
            for i, entry in enumerate(entries):
                if i >= SCAN_LIMIT:
                    break
                if entry.is_dir(follow_symlinks=False) and _is_file(Path(entry.path) / TEXT_FILE):
                    return "a cache's dataset folder"
    except OSError:
        return None
    return None


def _holder(path: Path, within: Path | None) -> tuple[str, Path] | None:
    """The closest folder above `path` (as named, and as resolved) that is a cache or a run, other than `within`."""
    allowed = {within.absolute(), within.resolve()} if within is not None else set()
    for chain in (Path(os.path.abspath(path)).parents, path.resolve().parents):
        for folder in chain:
            if folder in allowed:
                break
            what = vlmcache_folder(folder)
            if what is not None and what != "an export":
                return what, folder
    return None


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: a file or a folder, how vlmcache recognises one it wrote (`marker`), and whether an
    existing one of its kind is taken as it is without --overwrite (`reuse`: containers and resumable runs)."""

    what: str  # with its article: "an export folder"
    folder: bool
    marker: Callable[[Path], bool]
    suffix: str | None = None  # a file kind's required extension


def _is_predictions(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
    except Exception:  # noqa: BLE001 - anything unreadable is not a predictions file vlmcache wrote
        return False
    meta = schema.metadata or {}
    return meta.get(PREDICTIONS_MARKER[0]) == PREDICTIONS_MARKER[1] or tuple(schema.names) == PREDICTION_COLUMNS


def _is_export(path: Path) -> bool:
    return (_json_object(path / EXPORT_MARKER) or {}).get("vlmcache") == "export"


KINDS = {
    "run": OutputKind(
        "a run folder", True, lambda p: is_run(p) or _is_file(p / RUN_FILES[2]) or _only(p, {"error.txt"})
    ),
    "predictions": OutputKind("a predictions file", False, _is_predictions, ".parquet"),
    "export": OutputKind("an export folder", True, _is_export),
    "runs": OutputKind("a runs folder", True, lambda p: vlmcache_folder(p) is None),
    "cache-root": OutputKind("a cache folder", True, lambda p: vlmcache_folder(p) is None),
    "cache-split": OutputKind("a cache split", True, lambda p: vlmcache_folder(p) == "a cache split"),
    "markdown": OutputKind("a Markdown file", False, lambda p: _first_line(p).startswith("# vlmcache"), ".md"),
}
CONTAINERS = ("runs", "cache-root")  # hold many outputs: may exist and hold things


def _only(folder: Path, names: set[str]) -> bool:
    """`folder` holds nothing but files among `names` (ablate's error.txt of a failed run)."""
    try:
        return all(entry.is_file(follow_symlinks=False) and entry.name in names for entry in os.scandir(folder))
    except OSError:
        return False


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(200)
    except OSError:
        return ""


def _special(path: Path) -> str | None:
    """What `path` is when it exists and is neither a regular file nor a folder (a FIFO, device or socket: opening
    one to read a marker would block or act on hardware), else None. Read with os.stat, which opens nothing."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file or folder"


def check_creatable(path: Path, option: str, folder: bool = True) -> Path:
    """A path that can be made: names the system accepts, not under a file or a broken link, in a writable folder;
    a `folder` path must not be a file itself."""
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise VlmcacheError(f"{option} '{str(path)[:80]}...': a folder name is longer than 255 bytes.")
    if "\x00" in str(path):
        raise VlmcacheError(f"{option} {str(path)!r}: a path cannot hold a NUL character.")
    if len(os.fsencode(str(path.absolute()))) > 4000:
        raise VlmcacheError(f"{option}: the path is longer than the system allows ({len(str(path))} characters).")
    existing = path.parent if os.path.lexists(path) and not folder else path
    while not existing.exists():
        if existing.is_symlink():
            raise VlmcacheError(f"{option} '{path}': '{existing}' is a broken symbolic link.")
        existing = existing.parent
    if not existing.is_dir():
        raise VlmcacheError(f"{option} '{path}': '{existing}' is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VlmcacheError(f"{option} '{path}': the folder '{existing}' is not writable.")
    return path


def check_output(
    path: str | os.PathLike,
    option: str,
    kind: str,
    overwrite: bool = False,
    within: str | os.PathLike | None = None,
    reuse: bool = False,
) -> Path:
    """`path` if `option` may write a `kind` output there (see the module's rules), else one VlmcacheError that
    names the path and the option. Call it before any work.

    `within`: the one vlmcache folder this output belongs in (eval's run for its predictions.parquet).
    `reuse`: an existing output of the same kind is accepted without --overwrite (the caller resumes it)."""
    spec = KINDS[kind]
    path = Path(path)
    if str(path) == "":
        raise VlmcacheError(f"{option}: the path is empty.")
    if spec.suffix and path.suffix.lower() != spec.suffix:
        raise VlmcacheError(f"{option} '{path}': {spec.what} must end in {spec.suffix}.")
    special = _special(path)
    if special is not None:
        raise VlmcacheError(f"{option} '{path}' is {special}; vlmcache writes only regular files and folders.")
    check_creatable(path, option, spec.folder)
    if kind not in CONTAINERS:  # the output's own name becomes a folder or file that vlmcache creates
        name = Path(os.path.abspath(path)).name
        check_name(name, f"{option} '{path}': the name")
    holder = _holder(path, Path(within) if within is not None else None)
    if holder is not None:
        what, folder = holder
        raise VlmcacheError(
            f"{option} '{path}' lies inside {what} ('{folder}'); vlmcache writes its outputs only outside caches "
            f"and runs. Choose another path."
        )
    if path.is_symlink() and not (kind in CONTAINERS and path.is_dir()):
        raise VlmcacheError(f"{option} '{path}' is a symbolic link; name the real path (links are not followed).")
    if not path.exists():
        return path
    if kind in CONTAINERS:  # a link to a folder is followed (a cache or runs folder on a bigger disk)
        if not path.is_dir():
            raise VlmcacheError(f"{option} '{path}' is a file, not a folder.")
        if not spec.marker(path):
            raise VlmcacheError(
                f"{option} '{path}' is {vlmcache_folder(path)}, not {spec.what}; choose another folder."
            )
        return path
    if spec.folder and not path.is_dir():
        raise VlmcacheError(f"{option} '{path}' is a file; {spec.what} goes there. Choose another path.")
    if not spec.folder and path.is_dir():
        raise VlmcacheError(f"{option} '{path}' is a folder; {spec.what} goes there. Choose another path.")
    if spec.folder and not any(path.iterdir()):
        return path
    own = spec.marker(path)
    if own and (overwrite or reuse):
        return path
    if own:
        raise VlmcacheError(f"{option} '{path}': {spec.what} exists there already; pass --overwrite to replace it.")
    found = "a non-empty folder" if path.is_dir() else "a file"
    label = vlmcache_folder(path) if path.is_dir() else None
    raise VlmcacheError(
        f"{option} '{path}' is {label or found} that is not {spec.what} vlmcache wrote; "
        f"{'only its own kind is replaced' if overwrite else 'it is kept'}. Choose another path."
    )


def check_own_files(folder: Path, names: tuple[str, ...], what: str) -> None:
    """The fixed-name files a command rewrites in a folder of its own (report's summary.csv, report.md, plots):
    each absent or a plain file, never a link (writing through it would change a file elsewhere) or a folder."""
    for name in names:
        path = Path(folder) / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symbolic link" if path.is_symlink() else "not a plain file"
            raise VlmcacheError(f"{what} writes '{path}', which is {kind}; move it away and run again.")


def _own_split_entry(entry: os.DirEntry) -> bool:
    """A plain file of a cache split's own names: its manifest, a shard, or a temporary of either."""
    name = entry.name.split(TMP_MARK, 1)[0]
    own = name == MANIFEST or (name.startswith("shard-") and name.endswith(".h5"))
    return own and entry.is_file(follow_symlinks=False)


def check_cache_folders(model_dir: Path, splits: list[str], what: str, overwrite: bool) -> None:
    """The folders extract and import write beneath `--cache-dir` (`<dataset>/<key>/<split>`, `text.h5`), checked
    before any work: none may be a link (writing through it lands outside the cache) or a file where a folder goes;
    a split folder must be a split vlmcache wrote (its manifest is written before its first shard), or empty, or
    hold only temporaries (an extraction killed while writing its first manifest); and --overwrite of a split is
    refused while anything else is inside, since someone else's file is never removed. `what` names the command
    in the message."""
    model_dir = Path(model_dir)
    from vlmcache.cache import read_manifest

    for folder, role in ((model_dir.parent, "dataset folder"), (model_dir, "cache folder")):
        if folder.is_symlink():
            raise VlmcacheError(
                f"{what}: the {role} '{folder}' is a symbolic link; vlmcache writes a cache's folders only as real "
                f"folders (links are not followed). Move it away or choose another --cache-dir."
            )
        if folder.exists() and not folder.is_dir():
            raise VlmcacheError(f"{what}: '{folder}' is a file where the {role} goes; move it away.")
    text = model_dir / TEXT_FILE
    if text.is_symlink() or (text.exists() and not text.is_file()):
        kind = "a symbolic link" if text.is_symlink() else "not a plain file"
        raise VlmcacheError(f"{what} writes '{text}', which is {kind}; move it away and run again.")
    for split in splits:
        split_dir = model_dir / split
        if split_dir.is_symlink():
            raise VlmcacheError(
                f"{what}: the split folder '{split_dir}' is a symbolic link; links are not followed. Move it away."
            )
        if not split_dir.exists():
            continue
        if not split_dir.is_dir():
            raise VlmcacheError(f"{what}: '{split_dir}' is a file where a cache split goes; move it away.")
        with os.scandir(split_dir) as entries:
            found = [(e.name, _own_split_entry(e)) for e in entries]
        foreign = sorted(name for name, own in found if not own)
        if not (split_dir / MANIFEST).exists():
            # extract writes a split's manifest before its first shard, so files here without one (even ones named
            # like shards) are someone else's; only the temporaries of a killed first write are swept
            kept = sorted(name for name, own in found if not own or TMP_MARK not in name)
            if kept:
                raise VlmcacheError(
                    f"{what}: '{split_dir}' exists and is not a cache split (no {MANIFEST}; it holds '{kept[0]}'); "
                    f"move it away or write under another split name or --cache-dir."
                )
            continue
        if not foreign:
            continue
        if read_manifest(split_dir) is None:
            raise VlmcacheError(
                f"{what}: '{split_dir}' exists and is not a cache split (no {MANIFEST}; it holds '{foreign[0]}'); "
                f"move it away or write under another split name or --cache-dir."
            )
        if overwrite:
            raise VlmcacheError(
                f"{what} --overwrite: the split '{split_dir}' holds '{foreign[0]}', which vlmcache did not write; "
                f"--overwrite removes only a split's own files and never someone else's. Move it away and run again."
            )


def remove_split_files(split_dir: Path) -> None:
    """Remove a cache split's own files (manifest, shards, their temporaries) and then the folder if it is empty:
    --overwrite of a split, after `check_cache_folders` found nothing else inside."""
    with os.scandir(split_dir) as entries:
        own = [Path(e.path) for e in entries if _own_split_entry(e)]
    for path in sorted(own, key=lambda p: p.name == MANIFEST, reverse=True):  # the manifest first: no half split
        path.unlink(missing_ok=True)
    try:
        split_dir.rmdir()
    except OSError:
        pass


# --------------------------------------------------------------------------- building an output aside


def _host() -> str:
    """This machine, as 8 hex digits: a staging folder's pid means something only on the host that made it (a
    runs folder on a shared disk is written from several machines)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_folder(final: Path) -> Path:
    """A new, empty folder beside `final` (same file system, so a rename publishes it) that no other process
    and no earlier attempt owns: made with mkdtemp, never by removing what is there.

    Named `<final name>.tmp-<pid>.<host>.<random>`; the staging folders of `final` left by a killed process of
    this host (its pid no longer runs) are removed first, so a SIGKILL costs one rerun, not a folder forever."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(final)
    return Path(tempfile.mkdtemp(prefix=f"{final.name}{TMP_MARK}{os.getpid()}.{_host()}.", dir=final.parent))


def remove_dead_staging(final: Path) -> list[Path]:
    """Remove the staging folders of `final` whose process, on this host, has died; return them. Only names of
    the exact shape `staging_folder` makes are touched (mkdtemp's suffix: 8 of [a-z0-9_]), only folders, never
    one of a live process, of another host or of this process."""
    shape = re.compile(rf"{re.escape(final.name)}{re.escape(TMP_MARK)}(\d+)\.([0-9a-f]{{8}})\.[a-z0-9_]{{8}}")
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        m = shape.fullmatch(entry.name)
        if not m or m.group(2) != _host() or int(m.group(1)) == os.getpid():
            continue
        if pid_alive(int(m.group(1))) or entry.is_symlink() or not entry.is_dir():
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under `pid` (one that is not ours counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid beyond the system's range: keep
        return True
    return True


def write_export_marker(folder: Path, info: dict) -> None:
    """export.json, the export folder's marker: vlmcache wrote this folder, so --overwrite may replace it whole."""
    from vlmcache import atomic

    atomic.write_json_atomic(Path(folder) / EXPORT_MARKER, {"vlmcache": "export", **info})


def publish_folder(staging: Path, final: Path) -> None:
    """Move a complete folder into place; what was there (checked by `check_output`) is removed only after the
    new one is in, so `final` is the old folder or the new one, whole, never a mixture."""
    from vlmcache import atomic

    old = None
    if os.path.lexists(final):
        old = Path(tempfile.mkdtemp(prefix=f"{final.name}.old{TMP_MARK}{os.getpid()}.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(staging, final)
    atomic.fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def built_aside(final: str | os.PathLike) -> Iterator[Path]:
    """`with built_aside(out) as staging:` write the whole output into `staging`; on success it replaces `out`
    whole (an export never keeps an older export's files beside the new ones), on failure it is removed."""
    final = Path(final)
    staging = staging_folder(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_folder(staging, final)
