"""Ablation pipelines run: `run_pipeline` trains every run of a pipeline (read by `pipeline.load_pipeline`,
planned in `planning.py`) that is not finished yet and gathers one table (`results.py`).

Runs are named by a hash of their config (as `train-head` names them), so a re-run skips finished runs. A run
that fails is recorded with its error and the grid goes on.
"""

from __future__ import annotations

import json
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pandas as pd

from vlmcache import distributed, faults, guard, runlock, runs
from vlmcache.errors import VlmcacheError
from vlmcache.features import find_cache
from vlmcache.group import GROUP_SIZE, Outcome, make_groups, train_group
from vlmcache.pipeline import Pipeline
from vlmcache.planning import PlannedRun, plan
from vlmcache.results import carry_group_walls, merge_results, read_previous_results, row, write_results
from vlmcache.train import inherit_first_stage, train_head
from vlmcache.train_config import TrainConfig


def run_pipeline(
    pipe: Pipeline,
    runs_dir: str | None = None,
    progress=None,
    log=print,
    group: bool = True,
    group_size: int = GROUP_SIZE,
    wait: bool = False,
) -> pd.DataFrame | None:
    """Train every unfinished run, record failures, and write results.csv (and .parquet with pyarrow).

    First stages train before the second stages that build on them. With `group` (the default), the runs of a
    phase that read the same cache train together (`group.train_group`), each run's numbers what they are
    alone; `group=False` trains them one by one. Two methods that resolve to one config (one run folder) train
    once, and both rows name that run. Under torchrun the groups are spread over the processes (largest first,
    each to the least loaded), every process trains its own, and rank 0 writes the table, which it returns
    (other ranks return None).

    The runs folder is held for the whole pipeline (`runlock`): another process writing into it makes this one
    refuse, or wait with `wait`. results.csv keeps the rows of every other pipeline that wrote there; the
    returned table is this pipeline's rows."""
    if runs_dir:
        pipe = replace(pipe, runs_dir=runs_dir)
    if group_size < 1:
        raise VlmcacheError(f"--group-size must be at least 1, got {group_size}.")
    planned = plan(pipe)
    out = guard.check_output(pipe.runs_dir, "the runs folder (--runs-dir or runs_dir)", "runs")
    guard.check_own_files(out, ("results.csv", "results.parquet"), "ablate")
    out.mkdir(parents=True, exist_ok=True)
    distributed.init_from_env()
    rank, world = distributed.rank_world()
    with _hold_runs_folder(out, rank, wait, log) as previous:
        rows = _train_phases(pipe, planned, progress, log, group, group_size, rank, world)
        if rank != 0:
            return None
        table = pd.DataFrame([rows[i] for i in range(len(planned))])
        table.insert(0, "pipeline", pipe.name)
        table = carry_group_walls(previous, table)
        write_results(out, merge_results(previous, table))
    return table


@contextmanager
def _hold_runs_folder(out: Path, rank: int, wait: bool, log):
    """The runs folder's lock, taken by rank 0 for every process of a torchrun grid (one pipeline, many
    processes), and the results.csv found there (rank 0's to merge; None elsewhere). A refusal, or a results.csv
    that cannot be merged, is raised on every rank, so that none trains."""
    with ExitStack() as stack:
        error = previous = None
        if rank == 0:
            try:
                stack.enter_context(runlock.hold(out, "vlmcache ablate", wait, log))
                previous = read_previous_results(out)
            except VlmcacheError as e:
                error = str(e)
        error = distributed.broadcast(error)
        if error is not None:
            raise VlmcacheError(error)
        yield previous


def _train_phases(pipe, planned, progress, log, group: bool, group_size: int, rank: int, world: int) -> dict:
    """Every planned run's row (index -> row): first stages, then the second stages that build on them."""
    done: dict[tuple, str | None] = {}  # (dataset, model, seed, method) -> run dir of a finished first stage
    rows: dict[int, dict] = {}
    if progress is not None:
        progress.start(len(planned))
    for second in (False, True):
        phase = [i for i, r in enumerate(planned) if (r.from_method is not None) == second]
        pending: list[tuple[int, TrainConfig, str]] = []
        same: dict[int, int] = {}  # a run whose config another run of the phase has: index -> that run's index
        claimed: dict[str, int] = {}  # run folder -> the index of the run that trains it
        for i in phase:
            run = planned[i]
            cfg = run_dir = None
            try:
                cfg = _configure(run, done)
                run_dir = str(Path(pipe.runs_dir) / cfg.run_name())
                if run_dir in claimed:
                    same[i] = claimed[run_dir]
                    continue
                claimed[run_dir] = i
                if (Path(run_dir) / "metrics.json").is_file():
                    rows[i] = row(run, cfg, "resumed", runs.read_metrics(Path(run_dir)), None, run_dir)
                else:
                    pending.append((i, cfg, run_dir))
                    continue
            except VlmcacheError as e:
                rows[i] = _failed(run, cfg, e, None, run_dir, log)
            if progress is not None:
                progress.advance(run.method, rows[i]["status"])
        for i, j in same.items():
            log(
                f"same config: {planned[i].method} is {planned[j].method} ({planned[i].dataset}, seed "
                f"{planned[i].seed}): trained once, both rows name its run"
            )
        groups = make_groups([cfg for _, cfg, _ in pending], group_size if group else 1)
        mine: dict[int, dict] = {}
        for members in _share(groups, world)[rank]:
            _train(planned, [pending[j] for j in members], mine, progress, log)
        for part in distributed.all_gather(mine):
            rows.update(part)
        for i, j in same.items():
            rows[i] = {**rows[j], "method": planned[i].method, "same_config_as": planned[j].method}
            if progress is not None:
                progress.advance(planned[i].method, rows[i]["status"])
        for i in phase:
            run = planned[i]
            key = (run.dataset, json.dumps(run.model, sort_keys=True), run.seed, run.method)
            done[key] = rows[i]["run"] if rows[i]["status"] != "failed" else None
    return rows


def _configure(run: PlannedRun, done: dict) -> TrainConfig:
    """The run's resolved config: a second stage's first-stage run found among the finished ones, the cache
    found and recorded by key (as train-head records it), so that the run's name is its final one."""
    stage2_from = None
    if run.from_method is not None:
        key = (run.dataset, json.dumps(run.model, sort_keys=True), run.seed)
        firsts = [
            m
            for (d, mo, s, m), r in done.items()
            if (d, mo, s) == key and (m == run.from_method or m.startswith(run.from_method + "["))
        ]
        if len(firsts) != 1:
            raise VlmcacheError(
                f"'from: {run.from_method}' needs exactly one finished first-stage run; found {len(firsts)}."
            )
        stage2_from = done[(*key, firsts[0])]
        if stage2_from is None:
            raise VlmcacheError(f"its first stage '{firsts[0]}' failed.")
    cfg = run.config(stage2_from).resolve()
    if cfg.stage2:
        inherit_first_stage(cfg)  # its head, not the default one, names and labels the run
    model_dir = find_cache(cfg.cache_dir, cfg.dataset, cfg.model, cfg.pretrained, cfg.cache_key, cfg.preprocess)
    cfg.cache_key = model_dir.name
    cfg.cache_dir = str(model_dir.parent.parent.resolve())
    return cfg


def _share(groups: list[list[int]], world: int) -> list[list[list[int]]]:
    """The groups of each process: largest first, each to the process with the fewest runs so far (the same
    answer on every rank, so none needs telling)."""
    shares: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for g in sorted(groups, key=len, reverse=True):
        r = load.index(min(load))
        shares[r].append(g)
        load[r] += len(g)
    return shares


def _train(planned: list[PlannedRun], members: list[tuple], rows: dict, progress, log) -> None:
    """Train one group of (index, config, run folder) (one run alone: `train_head`, the single-run path) and
    record each run's row."""

    def record(j: int, outcome: Outcome) -> None:
        i, cfg, run_dir = members[j]
        run = planned[i]
        if outcome.error is None:
            rows[i] = row(run, cfg, "done", outcome.result, None, run_dir)
        else:
            rows[i] = _failed(run, cfg, outcome.error, outcome.trace, run_dir, log)
        if progress is not None:
            progress.advance(run.method, rows[i]["status"])
        faults.hit("run_recorded")

    if len(members) == 1:
        try:
            outcome = Outcome(result=train_head(_placed(*members[0][1:]), log=log))
        except Exception as e:  # noqa: BLE001 - a bug or a crash in one run must not stop the grid
            outcome = Outcome(error=e, trace=traceback.format_exc())
        record(0, outcome)
        return
    t0 = time.perf_counter()
    train_group([_placed(cfg, run_dir) for _, cfg, run_dir in members], log=log, on_done=record)
    wall = round(time.perf_counter() - t0, 3)
    for i, _, _ in members:  # each run's own seconds are its share; the group's wall time is the group's
        rows[i]["group_wall_seconds"] = wall


def _placed(cfg: TrainConfig, run_dir: str) -> TrainConfig:
    """The config a run trains with: its folder, and under torchrun `auto` made this process's own GPU (the
    device is not part of a run's name)."""
    return replace(cfg, out=run_dir, device=distributed.local_device(cfg.device))


def _failed(run: PlannedRun, cfg, error: BaseException, trace: str | None, run_dir: str | None, log) -> dict:
    """A failed run's row; a crash (not a user error) keeps its traceback in the run folder's error.txt."""
    message = str(error) if isinstance(error, VlmcacheError) else f"{type(error).__name__}: {error}"
    if not isinstance(error, VlmcacheError) and run_dir and trace:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "error.txt").write_text(trace)
    log(f"run failed: {run.dataset} / {run.model['model']} / {run.method} / seed {run.seed}: {message}")
    return row(run, cfg, "failed", None, message, run_dir)
