"""`vlmcache ablate` and `vlmcache report`: grids of runs and the tables and plots made from them."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vlmcache.cli.common import (
    JSON,
    NPROC,
    THREADS,
    WAIT,
    RichProgress,
    RunProgress,
    app,
    check_nproc,
    log,
    out,
    print_json,
    switch,
    use_threads,
    user_errors,
)
from vlmcache.errors import VlmcacheError


@app.command(rich_help_panel="Grids and reports")
@user_errors
def ablate(
    pipeline: str = typer.Argument(..., help="A pipeline YAML file, or the name of a shipped one (demo, quick, ...)."),
    runs_dir: Path = typer.Option(None, "--runs-dir", help="Where run folders go (default: the pipeline's runs_dir)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache root (default: the pipeline's cache_dir)."),
    dry_run: bool = switch("dry-run", "Validate the pipeline and list its runs by name; train nothing."),
    extract: bool = switch(
        "extract", "Make the caches the grid needs first, for datasets that need no images of yours (digits_lt)."
    ),
    max_runs: int = typer.Option(5000, "--max-runs", help="Refuse a grid of more runs than this (counted first)."),
    group: bool = switch(
        "group",
        "Train the runs that read the same cache together, each as it trains alone (--no-group: one by one).",
        True,
    ),
    group_size: int = typer.Option(32, "--group-size", help="Most runs trained together in one group."),
    wait: bool = WAIT,
    threads: int = THREADS,
    nproc: int = NPROC,
    as_json: bool = JSON,
):
    """Run a grid of heads x losses x samplers x second stages x seeds (x models) and write one table.

    Example: [bold]vlmcache ablate pipelines/paper_stage1.yaml --runs-dir runs/stage1[/]

    Every cache the grid reads is checked before the first run (missing ones are named with their extract
    commands). A re-run skips finished runs; a failed run is recorded with its error and the grid goes on.
    The runs that read the same cache train together in one pass over it, with the results they have alone.
    Many GPUs: [bold]--nproc 4[/] or [bold]torchrun --nproc_per_node 4 -m vlmcache ablate ...[/] spreads the
    groups over the processes.
    """
    import dataclasses

    from vlmcache import guard
    from vlmcache.ablate import run_pipeline
    from vlmcache.pipeline import load_pipeline
    from vlmcache.planning import extract_missing, missing_caches, plan

    check_nproc("ablate", nproc)
    use_threads(threads)
    pipe = load_pipeline(pipeline, max_runs)
    if cache_dir:
        pipe = dataclasses.replace(pipe, cache_dir=str(cache_dir))
    if runs_dir:
        pipe = dataclasses.replace(pipe, runs_dir=str(runs_dir))
    if not dry_run:  # the output guard, before --extract or any run
        guard.check_output(pipe.runs_dir, "--runs-dir", "runs")
        guard.check_own_files(Path(pipe.runs_dir), ("results.csv", "results.parquet"), "ablate")
    runs = plan(pipe)
    missing = missing_caches(pipe)
    if dry_run:
        _print_dry_run(pipe, runs, missing, as_json)
        return
    if missing and extract:
        try:
            with RichProgress() as progress:
                extract_missing(pipe, missing, progress, log)
        except KeyboardInterrupt:
            log(
                f"interrupted: the shards extracted so far are kept in {pipe.cache_dir}; the same command again "
                "resumes from them, then trains the grid.",
                markup=False,
            )
            raise typer.Exit(130) from None
    elif missing:
        raise VlmcacheError(
            f"{pipe.source}: {len(missing)} cache(s) the grid needs are missing, so no run was started. "
            + " ".join(
                f"{m.reason.split('. Make it with')[0]}. Make it with: {m.command(pipe.cache_dir)}" for m in missing
            )
            + " (or pass --extract for built-in data)."
        )
    from vlmcache.tables import paper_table, summarize

    try:
        with RunProgress() as progress:
            table = run_pipeline(pipe, None, progress, log=log, group=group, group_size=group_size, wait=wait)
    except KeyboardInterrupt:
        log(
            f"interrupted: the {progress.done} of {progress.total} runs finished so far are kept in {pipe.runs_dir}; "
            "the same command again skips them and trains the rest.",
            markup=False,
        )
        raise typer.Exit(130) from None
    if table is None:  # a torchrun process other than rank 0: its runs are in rank 0's table
        return
    runs_dir = Path(pipe.runs_dir)
    summary = summarize(table)
    counts = table["status"].value_counts().to_dict()
    if as_json:
        print_json(
            {
                "runs_dir": str(runs_dir),
                "results": str(runs_dir / "results.csv"),
                "status": counts,
                "summary": json.loads(summary.to_json(orient="records")),
            }
        )
    else:
        out.print(paper_table(summary), markup=False, highlight=False, soft_wrap=True)
        said = ", ".join(f"{n} {status}" for status, n in counts.items())
        out.print(
            f"runs: {said}. Table: {runs_dir / 'results.csv'}. Report: vlmcache report {runs_dir}", highlight=False
        )
    if counts.get("failed"):  # the grid went on and wrote its table; the exit code still says a run failed
        raise typer.Exit(1)


def _print_dry_run(pipe, runs: list, missing: list, as_json: bool) -> None:
    """The grid's runs by their real names, and the caches it lacks with their extract commands."""
    from vlmcache.planning import same_configs

    same = same_configs(runs)
    listing = [
        {"dataset": r.dataset, "model": r.model, "seed": r.seed, "method": r.method}
        | ({"same_config_as": runs[same[i]].method} if i in same else {})
        for i, r in enumerate(runs)
    ]
    commands = [m.command(pipe.cache_dir) for m in missing]
    if as_json:
        print_json({"pipeline": pipe.source, "runs": listing, "missing_caches": commands})
        return
    out.print(f"{pipe.source}: valid, {len(runs)} runs.", highlight=False)
    for r in listing:
        out.print(
            f"{r['dataset']}  {r['model']['model']} ({r['model'].get('pretrained')})  seed {r['seed']}  {r['method']}"
            + (f"  (the same config as {r['same_config_as']}: trained once)" if "same_config_as" in r else ""),
            highlight=False,
            markup=False,  # grid labels are in brackets, which rich would take for markup
        )
    for c in commands:
        out.print(f"cache missing; make it with: {c}", highlight=False)


@app.command(rich_help_panel="Grids and reports")
@user_errors
def report(
    runs_dir: Path = typer.Argument(..., help="A folder of runs (from `vlmcache ablate` or `train-head`)."),
    as_json: bool = JSON,
):
    """Write report.md with the results tables and PNG plots (per-class accuracy against frequency, shot
    groups per method, accuracy against training cost).

    Example: [bold]vlmcache report runs/demo[/]
    """
    from vlmcache.report import write_report

    result = write_report(runs_dir, log=log)
    if as_json:
        print_json(result)
        return
    out.print(result["table"], markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {result['report']}  plots: {', '.join(result['plots'].values())}", highlight=False)
