"""Fault injection for the fault suite: `VLMCACHE_FAULT=<point>:<n>` SIGKILLs the process the n-th time it
reaches <point>; `<point>:<n>:INT` sends it SIGINT instead (Ctrl-C, at a known moment). Points: `shard_written`
(a shard's temporary file is complete, not yet renamed), `shard_published` (a shard is renamed and listed in the
manifest) and `run_recorded` (a grid's run is finished and recorded); `<point>:<n>:HANG` makes it sleep there
(a process busy at a known moment, for signals from outside). Unset, `hit` costs one dict lookup."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_reached: Counter = Counter()


def hit(point: str) -> None:
    spec = os.environ.get("VLMCACHE_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, sig = rest.partition(":")
    _reached[point] += 1
    if _reached[point] == int(nth or 1):
        if sig == "HANG":
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGINT if sig == "INT" else signal.SIGKILL)
