"""Fault injection for the fault suite: `VLMCACHE_FAULT=<point>:<n>` SIGKILLs the process the n-th time it
reaches <point>. Points: `shard_written` (a shard's temporary file is complete, not yet renamed) and
`shard_published` (a shard is renamed and listed in the manifest). Unset, `hit` costs one dict lookup."""

from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter = Counter()


def hit(point: str) -> None:
    spec = os.environ.get("VLMCACHE_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
