"""Tables and plots from a folder of runs: mean and std over seeds, the seed paper's table layout, and PNGs.

`write_report(runs_dir)` reads `results.csv` (written by `vlmcache ablate`, one or several pipelines) and every
finished run folder it does not list (from `train-head`), and writes `summary.csv`, `report.md` and the plots next
to them. Every plot is drawn per (dataset, model), and says which it shows.

Seeds are distinct seeds: a configuration trained twice with one seed (two run folders, or one run listed by two
pipelines) counts once, and the run kept is the one that finished last (its metrics.json written last), said in
report.md. The spread over seeds is the sample standard deviation (n - 1 in the denominator), and says so.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlmcache import guard
from vlmcache.atomic import write_bytes_atomic
from vlmcache.plots import plot_cost, plot_per_class, plot_shot_bars
from vlmcache.tables import (
    SELECTED,
    STD,
    THRESHOLD_COLUMNS,
    detail_table,
    distinct_seeds,
    finished_runs,
    load_results,
    paper_table,
    summarize,
)

REPORT_FILES = ("summary.csv", "report.md", "per_class_vs_frequency.png", "shot_groups.png", "accuracy_vs_cost.png")


def shot_caption(summary: pd.DataFrame) -> str:
    """What many / medium / few mean in this report: the thresholds its runs used, named."""
    if not all(c in summary.columns for c in THRESHOLD_COLUMNS):
        return "many / medium / few: by the runs' shot thresholds (not recorded here; vlmcache's default is more " \
               "than 100, 20 to 100, fewer than 20 training images)."  # fmt: skip
    pairs = list(dict.fromkeys(zip(summary["many_threshold"], summary["few_threshold"], strict=True)))
    known = [(m, f) for m, f in pairs if not (pd.isna(m) or pd.isna(f))]
    if len(known) == 1 and len(pairs) == 1:
        many, few = (int(v) for v in known[0])
        return f"many / medium / few: more than {many}, {few} to {many}, fewer than {few} training images."
    listed = ", ".join(f"{int(m)} / {int(f)}" for m, f in known) or "not recorded"
    return (
        f"many / medium / few: the runs use different shot thresholds (many / few: {listed}); each row's are in "
        f"the columns many threshold and few threshold below (many: more than many threshold training images, "
        f"few: fewer than few threshold)."
    )


def write_report(runs_dir: str | Path, log=print) -> dict:
    """summary.csv, report.md and three PNGs in `runs_dir`; returns their paths and the Markdown table."""
    runs_dir = guard.check_output(runs_dir, "The runs folder", "runs")  # not a cache or run, nor inside one
    guard.check_own_files(runs_dir, REPORT_FILES, "report")
    table = load_results(runs_dir, log)
    _, repeated = distinct_seeds(finished_runs(table), runs_dir)
    summary = summarize(table, runs_dir)
    markdown = paper_table(summary)
    plots = {}
    if not summary.empty:
        plots = {
            "per_class": runs_dir / "per_class_vs_frequency.png",
            "shots": runs_dir / "shot_groups.png",
            "cost": runs_dir / "accuracy_vs_cost.png",
        }
        if not plot_per_class(table, plots["per_class"], runs_dir=runs_dir):
            plots.pop("per_class")
        plot_shot_bars(summary, plots["shots"])
        plot_cost(summary, plots["cost"])
    failed = table[table["status"] == "failed"]
    lines = [
        f"# Results: {runs_dir.name}",
        "",
        f"{len(table) - len(failed)} runs finished, {len(failed)} failed. Accuracy in %, mean ± {STD} (no ± for "
        f"a single seed); seeds are distinct seeds. {shot_caption(summary)}",
        "",
        markdown,
    ]
    if SELECTED in summary.columns and summary[SELECTED].astype(str).str.lower().eq("true").any():
        lines += [
            "† selected its epoch on the split it reports (--select-on with the evaluation split): its score is "
            "optimistic, not comparable with rows selected on a held-out split.",
            "",
        ]
    same = table.dropna(subset=["same_config_as"]) if "same_config_as" in table.columns else table.iloc[:0]
    for r in same.drop_duplicates(["dataset", "method"]).itertuples():
        lines += [f"{r.method} is the same configuration as {r.same_config_as} ({r.dataset}): trained once per seed, "
                  "shown under both names.", ""]  # fmt: skip
    if len(repeated):
        lines += [
            "A configuration trained more than once with one seed counts once: the run that finished last is kept. "
            "Left out:",
            "",
            *[f"- {r.method} (seed {r.seed}, {r.dataset}): {r.run}" for r in repeated.itertuples()],
            "",
        ]
    lines += [
        "## Every metric and cost",
        "",
        "Seconds are each run's own; in a grouped `ablate` the runs of a group train in turns, so a run's whole "
        "run is its share of the group (its set-up, its own steps and its evaluation), and its group's wall time "
        "is in its own column.",
        "",
        detail_table(summary).to_markdown(index=False),
        "",
    ]
    for name, title in (
        ("shots", "Accuracy by shot group, per dataset and model"),
        ("per_class", "Per-class accuracy against training frequency, per dataset and model"),
        ("cost", "Accuracy against training cost"),
    ):
        if name in plots:
            lines += [f"## {title}", "", f"![{title}]({plots[name].name})", ""]
    if len(failed):
        lines += (
            ["## Failed runs", ""]
            + [f"- {r.method} (seed {r.seed}, {r.dataset}): {r.error}" for r in failed.itertuples()]
            + [""]
        )
    return _write_report_files(runs_dir, summary, "\n".join(lines), markdown, plots, table, failed)


def _write_report_files(runs_dir: Path, summary, text: str, markdown: str, plots: dict, table, failed) -> dict:
    """summary.csv and report.md, each written whole (`atomic`; the plots are written as they are drawn), so a
    report run while a grid trains (it takes no lock: it only reads finished runs) never leaves a torn file."""
    write_bytes_atomic(runs_dir / "summary.csv", summary.to_csv(index=False).encode())
    report = runs_dir / "report.md"
    write_bytes_atomic(report, text.encode())
    return {
        "report": str(report),
        "summary": str(runs_dir / "summary.csv"),
        "table": markdown,
        "plots": {k: str(v) for k, v in plots.items()},
        "runs": len(table),
        "failed": len(failed),
    }
