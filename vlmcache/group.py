"""Grouped training: the runs of a grid that read the same cache train together in one process.

Each split is loaded once for the group, and the runs advance in lock-step, one optimiser step at a time,
the run furthest behind first (`loop.fit_steps` is a generator that yields after every step). Every run
keeps all that makes its numbers: its own model, loss, optimiser, schedule, sampler and generator, and its
own state of the global random number generator (swapped in for its steps), so a run trained in a group
gives the metrics, losses and weights it gives alone, bit for bit. What the group shares is the reading:
pooled features and token arrays are in memory once, and streamed token blocks are read from disk once for
all the runs (the block order of an epoch is the same for every run; `features.BlockReader`).

A run that fails drops out of its group with its error; the others go on.
"""

from __future__ import annotations

import heapq
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlmcache.encoders import pick_device
from vlmcache.heads import HEADS
from vlmcache.loop import fit_steps
from vlmcache.memory import start_peak_memory
from vlmcache.train import finish_run, prepare_run
from vlmcache.train_config import TrainConfig

GROUP_SIZE = 32  # most runs per group: their models, optimiser states and second-stage features share memory


@dataclass
class Outcome:
    """What became of one run of a group: its summary, or its error (and, for a crash, the traceback)."""

    result: dict | None = None
    error: BaseException | None = None
    trace: str | None = None


def group_key(cfg: TrainConfig) -> tuple:
    """Runs with the same key read the same inputs and may train together. Streamed images (--stream) are
    decoded and encoded for each run: such a run is a group of its own. A cache is a folder per dataset and
    model (`<cache_dir>/<dataset>/<cache_key>`), so the dataset is part of the key: one encoder's caches of two
    datasets share a cache_key and nothing else."""
    if cfg.stream:
        return ("stream", id(cfg))
    return (
        cfg.cache_dir, cfg.dataset, cfg.cache_key, cfg.train_split, HEADS[cfg.head].input, cfg.device, bool(cfg.stage2)
    )  # fmt: skip


def make_groups(cfgs: list[TrainConfig], size: int = GROUP_SIZE) -> list[list[int]]:
    """Indices of `cfgs` by group, in first-seen order, each group at most `size` runs."""
    by_key: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_key.setdefault(group_key(cfg), []).append(i)
    return [members[j : j + size] for members in by_key.values() for j in range(0, len(members), size)]


class _RngState:
    """One run's state of the global generators (CPU, and the device's), swapped in around its steps."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.save()

    def save(self) -> None:
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(self.device) if self.cuda else None

    def load(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state(self.gpu, self.device)


def train_group(
    cfgs: list[TrainConfig], log: Callable[[str], None] = print, on_done: Callable[[int, Outcome], None] | None = None
) -> list[Outcome]:
    """Train `cfgs` together (each with its `out` or run name, as `train_head` would) and save each run as it
    finishes; `on_done(i, outcome)` is called then. Returns one Outcome per config, in order."""
    outcomes = [Outcome() for _ in cfgs]
    shared: dict = {}  # inputs loaded once for the group
    jobs, steps, rngs, active = {}, {}, {}, {}
    scope = None

    def fail(i: int, e: BaseException) -> None:
        outcomes[i] = Outcome(error=e, trace=traceback.format_exc())
        if i in jobs:
            jobs[i].discard()  # its log closed, its staging folder (made for it) removed
        for table in (jobs, steps, rngs, active):
            table.pop(i, None)
        if on_done:
            on_done(i, outcomes[i])

    for i, cfg in enumerate(cfgs):
        try:
            if scope is None:
                scope = start_peak_memory(pick_device(cfg.device))
                scope = "group" if scope == "run" else scope
            job = prepare_run(cfg, log, shared, scope)
            job.group_size = len(cfgs)
            jobs[i] = job
            rngs[i] = _RngState(job.device)
            steps[i] = fit_steps(
                job.fit_model, job.fit_data, job.loss_fn, job.sampler, job.cfg, job.device, job.on_epoch(), job.select
            )
            active[i] = 0.0
        except Exception as e:  # noqa: BLE001 - the run fails, the group goes on
            fail(i, e)
    queue = [(0.0, i) for i in steps]  # (progress, run): the run furthest behind steps next
    heapq.heapify(queue)
    while queue:
        _, i = heapq.heappop(queue)
        if i not in steps:
            continue
        rngs[i].load()
        t0 = time.perf_counter()
        try:
            progress = next(steps[i])
        except StopIteration as done:
            active[i] += time.perf_counter() - t0
            job = jobs[i]
            job.times["train_seconds"] = active[i]
            try:
                outcomes[i] = Outcome(result=finish_run(job, *done.value))
            except Exception as e:  # noqa: BLE001
                fail(i, e)
                continue
            for table in (jobs, steps, rngs, active):
                table.pop(i, None)
            if on_done:
                on_done(i, outcomes[i])
            continue
        except Exception as e:  # noqa: BLE001
            fail(i, e)
            continue
        active[i] += time.perf_counter() - t0
        rngs[i].save()
        heapq.heappush(queue, (progress, i))
    return outcomes
