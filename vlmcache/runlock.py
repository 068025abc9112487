"""One writer per runs folder: an exclusive `fcntl.flock` on `<runs folder>/.vlmcache.lock`.

Two `ablate` (or `train-head`) processes writing into one runs folder would both train every run, overwrite each
other's staging folders and results.csv. The lock makes the second one refuse (naming the first one's pid) or,
with `--wait`, wait for it. The kernel releases a flock when its process ends, however it ends, so a killed run
never leaves a stale lock behind; the file itself stays (it holds the last holder's pid, for the message only).

The lock is re-entrant within a process (an `ablate` holds it while its runs train through the same functions
that `train-head` uses), and a torchrun grid takes it on rank 0 only (`ablate.run_pipeline`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmcache.errors import VlmcacheError

LOCK_FILE = ".vlmcache.lock"

_held: dict[str, list] = {}  # resolved folder -> [open file descriptor, depth]: this process's locks


def _holder(fd: int) -> str:
    """The pid (and command) the holder wrote into the lock file, as text for a message."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "unknown (it is starting)"


@contextmanager
def hold(folder: str | os.PathLike, what: str, wait: bool = False, log: Callable[[str], None] = print) -> Iterator:
    """Hold the runs folder `folder` (made if missing) for this process while the block runs.

    `what` names this process's command in the lock file (`vlmcache ablate`), so another one can say who holds
    it. Without `wait`, a folder held by another process is a VlmcacheError naming that process and --wait."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VlmcacheError(f"The runs folder '{folder}' cannot be made ({e.strerror}).") from None
    key = str(folder.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise VlmcacheError(f"The runs folder '{folder}': cannot open its lock file '{path}' ({e.strerror}).") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise VlmcacheError(
                    f"The runs folder '{folder}' is in use by another vlmcache process (pid {holder}); wait for it "
                    f"to finish, pass --wait to wait for it, or choose another --runs-dir."
                ) from None
            log(f"waiting for the runs folder '{folder}': in use by pid {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} ({what})\n".encode(), 0)
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # closing the descriptor releases the flock
