"""Tables and plots from a folder of runs: mean and std over seeds, the seed paper's table layout, and PNGs.

`write_report(runs_dir)` reads `results.csv` (written by `vlmcache ablate`) or, without one, every run folder's
config.json and metrics.json, and writes `summary.csv`, `report.md` and the plots next to them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel, ConfigDict, ValidationError  # noqa: E402

from vlmcache import guard, runs  # noqa: E402
from vlmcache.errors import VlmcacheError  # noqa: E402
from vlmcache.schemas import describe  # noqa: E402

METRICS = ("overall", "many", "medium", "few", "top5", "mean_per_class")
COSTS = ("train_seconds", "total_seconds", "total_with_first_stage_seconds", "samples_per_s", "peak_rss_mb")
GROUPS = ["dataset", "model", "pretrained", "method"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def _palette() -> list:
    """Qualitative colours that stay apart: tab10's ten, then Dark2's eight (tab20 pairs light and dark of one
    hue, which read as one method)."""
    return [plt.cm.tab10(i) for i in range(10)] + [plt.cm.Dark2(i) for i in range(8)]


def _style(i: int) -> dict:
    """A distinct colour and marker for the i-th method (18 colours x 10 markers)."""
    colours = _palette()
    return {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)]}


def _plain_log_x(ax) -> None:
    """A log x axis labelled 0.5, 1, 2, 5, 10, ... at major ticks only (minor labels like 3x10^1 overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


class _RunLabel(BaseModel):
    """What the report needs of a run's config.json (train-head's and finetune's alike)."""

    model_config = ConfigDict(extra="allow")

    dataset: str
    model: str
    pretrained: str | None
    head: str
    loss: str
    sampler: str
    stage2: str | None = None
    tune: str | None = None
    seed: int


def _read_run(run: Path) -> dict:
    """One report row from a run folder, both files checked against their schemas."""
    path = run / "config.json"
    saved = runs.read_json(path, "run")
    try:
        cfg = _RunLabel.model_validate(saved.get("config") if isinstance(saved, dict) else None)
    except ValidationError as e:
        raise VlmcacheError(f"'{path}' is not a vlmcache run config: config.{describe(e)}.") from None
    result = runs.read_metrics(run)
    config = saved["config"]
    row = {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "method": runs.method_label(config, saved.get("kind", "head")),
        "group_key": runs.identity_key(config),
        "seed": cfg.seed,
        "status": "done",
        "run": str(run),
        "_settings": runs.identity_settings(config),
    }
    row.update({m: result["metrics"].get(m) for m in METRICS})
    row.update({c: result["cost"].get(c) for c in COSTS})
    return row


def collect_runs(runs_dir: Path, log=print) -> pd.DataFrame:
    """One row per finished run folder under `runs_dir`, for runs made by `train-head` rather than `ablate`.
    A folder whose files do not pass their schemas is left out with a warning naming it and why."""
    rows = []
    for metrics_file in sorted(runs_dir.rglob("metrics.json")):
        run = metrics_file.parent
        if not (run / "config.json").is_file():
            continue
        try:
            rows.append(_read_run(run))
        except VlmcacheError as e:
            log(f"warning: left out of the report: {e}")
    _name_apart(rows)
    return pd.DataFrame(rows)


def _name_apart(rows: list[dict]) -> None:
    """Runs of one method label that differ in any setting but the seed get the differing settings in their
    label (`linear + focal + instance [loss_params.gamma=5]`), so they become separate rows, never fake seeds."""
    by_label: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_label.setdefault((r["dataset"], r["model"], r["pretrained"], r["method"]), {})[r["group_key"]] = r[
            "_settings"
        ]
    suffix = {}
    for label, groups in by_label.items():
        if len(groups) < 2:
            continue
        names = sorted({k for settings in groups.values() for k in settings})
        differ = [k for k in names if len({repr(s.get(k)) for s in groups.values()}) > 1]
        for key, settings in groups.items():
            suffix[(*label, key)] = " [" + ", ".join(f"{k}={settings.get(k)}" for k in differ) + "]"
    for r in rows:
        r["method"] += suffix.get((r["dataset"], r["model"], r["pretrained"], r["method"], r["group_key"]), "")
        del r["_settings"]


RESULT_COLUMNS = ("dataset", "model", "pretrained", "method", "seed", "status", "run", *METRICS)


def _read_results_csv(csv: Path) -> pd.DataFrame:
    """results.csv as `vlmcache ablate` writes it; a foreign or damaged table is one clear error."""
    try:
        table = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise VlmcacheError(f"'{csv}' cannot be read as a CSV table: {e}") from None
    missing = [c for c in RESULT_COLUMNS if c not in table.columns]
    if missing:
        raise VlmcacheError(f"'{csv}' is not a vlmcache results table: it has no column(s) {', '.join(missing)}.")
    bad_status = sorted(set(table["status"].astype(str)) - {"done", "resumed", "failed"})
    if bad_status:
        raise VlmcacheError(f"'{csv}': status must be done, resumed or failed, found {bad_status[:3]}.")
    for c in (*METRICS, *(c for c in COSTS if c in table.columns)):
        values = pd.to_numeric(table[c], errors="coerce")
        wrong = table[c].notna() & (values.isna() | ~np.isfinite(values.astype(float)))
        if c in METRICS:
            wrong |= (values < 0) | (values > 1)
        if wrong.any():
            row = int(np.argmax(wrong.to_numpy()))
            raise VlmcacheError(f"'{csv}', row {row + 2}: {c} = {table[c].iloc[row]!r} is not a valid value.")
        table[c] = values
    return table


def load_results(runs_dir: Path, log=print) -> pd.DataFrame:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise VlmcacheError(f"The runs folder '{runs_dir}' does not exist.")
    csv = runs_dir / "results.csv"
    table = _read_results_csv(csv) if csv.is_file() else collect_runs(runs_dir, log)
    if table.empty:
        raise VlmcacheError(f"No finished runs under '{runs_dir}' (no results.csv and no run folders).")
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every metric and cost, per dataset, model and method."""
    ok = table[table["status"] != "failed"]
    if ok.empty:
        return pd.DataFrame(columns=GROUPS)
    cols = [c for c in (*METRICS, *COSTS) if c in ok.columns]
    keys = GROUPS + (["group_key"] if "group_key" in ok.columns else [])
    if "group_key" in ok.columns:  # one label, several configurations (a results.csv put together by hand)
        clash = ok.groupby(GROUPS, dropna=False)["group_key"].transform("nunique") > 1
        ok = ok.assign(method=np.where(clash, ok["method"] + " #" + ok["group_key"].astype(str), ok["method"]))
    grouped = ok.groupby(keys, sort=False, dropna=False)
    summary = grouped[cols].agg(["mean", "std"])
    summary.columns = [f"{c}_{s}" for c, s in summary.columns]
    summary["seeds"] = grouped.size()
    return summary.reset_index()


def _cell(mean, std) -> str:
    """A metric in % with its std over seeds; the std is there whenever there are two seeds or more, 0.0 too
    (no ± means one seed)."""
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if not pd.isna(std) else "")


def paper_table(summary: pd.DataFrame) -> str:
    """Markdown laid out as the seed paper's tables: a row per method, many / medium / few / overall per dataset.

    Written out, not through DataFrame.to_markdown: tabulate pads every cell to its column's width, and this
    table is read as text (printed by `ablate`, diffed between runs), where one fixed layout per row is kinder."""
    if summary.empty:
        return "(no finished runs)\n"
    # a row per (method, model, weights): the model and weights are named when a method has several
    backbone = summary["model"].astype(str) + np.where(
        summary["pretrained"].isna(), "", " " + summary["pretrained"].astype(str)
    )
    several = summary.assign(b=backbone).groupby("method")["b"].transform("nunique") > 1
    summary = summary.assign(row=summary["method"] + np.where(several, " (" + backbone + ")", ""))
    datasets = list(dict.fromkeys(summary["dataset"]))
    header = (
        "| method | " + " | ".join(f"{d} {c}" for d in datasets for c in ("many", "medium", "few", "overall")) + " |"
    )
    lines = [header, "|" + " --- |" * (1 + 4 * len(datasets))]
    for row_name in dict.fromkeys(summary["row"]):
        cells = []
        for d in datasets:
            hit = summary[(summary["row"] == row_name) & (summary["dataset"] == d)]
            for c in ("many", "medium", "few", "overall"):
                cells.append(_cell(hit[f"{c}_mean"].iloc[0], hit[f"{c}_std"].iloc[0]) if len(hit) else "-")
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COST_HEADERS = {
    "train_seconds": ("training loop (s)", "{:,.2f}"),
    "total_seconds": ("whole run (s)", "{:,.2f}"),
    "total_with_first_stage_seconds": ("with its first stage (s)", "{:,.2f}"),
    "samples_per_s": ("samples/s", "{:,.0f}"),
    "peak_rss_mb": ("peak RSS of the run (MB)", "{:,.0f}"),
}


def detail_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every metric (in %, mean ± std over seeds, as the main table) and every cost (mean over seeds, in its own
    unit, named in its header) per dataset, model and method: strings, so that no cell turns into 1.3e+04."""
    out = summary[[c for c in (*GROUPS, "seeds") if c in summary.columns]].copy()
    for m in METRICS:
        if f"{m}_mean" in summary.columns:
            out[f"{m.replace('_', ' ')} (%)"] = [
                _cell(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"], strict=True)
            ]
    for c, (header, fmt) in COST_HEADERS.items():
        if f"{c}_mean" in summary.columns:
            out[header] = ["-" if pd.isna(v) else fmt.format(v) for v in summary[f"{c}_mean"]]
    return out


# --------------------------------------------------------------------------- plots


def plot_per_class(table: pd.DataFrame, path: Path, bins: int = 12) -> bool:
    """Per-class accuracy against training images per class (log x): a panel per method, each class a point
    (its mean over seeds) and a line through the means of log-spaced frequency bins; the first method's line is
    drawn faintly in every panel for comparison. Readable at 10 classes and at 8,142."""
    ok = table[(table["status"] != "failed") & table["run"].notna()]
    curves = {}
    for method, group in ok.groupby("method", sort=False):
        frames = [f for f in map(_per_class, group["run"]) if f is not None]
        if not frames:
            continue
        pc = pd.concat(frames).dropna(subset=["accuracy"])
        pc = pc[pc["train_count"] > 0]
        if pc.empty:
            continue
        per_class = pc.groupby("class" if "class" in pc.columns else "train_count", as_index=False).agg(
            train_count=("train_count", "first"), accuracy=("accuracy", "mean")
        )
        curves[method] = (per_class, _binned(per_class, bins))
    if not curves:
        return False
    n = len(curves)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)  # fmt: skip
    reference_name, (_, reference) = next(iter(curves.items()))
    for i, (ax, (method, (points, line))) in enumerate(zip(axes.flat, curves.items(), strict=False)):
        style = _style(i)
        alpha = max(0.15, min(0.8, 30 / len(points)))
        ax.scatter(
            points["train_count"], 100 * points["accuracy"], s=10, alpha=alpha, color=style["color"], lw=0, zorder=3
        )
        if i:
            ax.plot(reference["x"], 100 * reference["acc"], color="0.6", lw=1, ls="--", label=reference_name)
        ax.plot(line["x"], 100 * line["acc"], color=style["color"], lw=2)
        ax.set_title(method, fontsize=8)
        _plain_log_x(ax)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.supxlabel("training images of the class (log scale)", fontsize=9)
    fig.supylabel("test accuracy of the class (%)", fontsize=9)
    fig.suptitle(f"Per-class accuracy against training frequency (dashed: {reference_name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _binned(per_class: pd.DataFrame, bins: int) -> pd.DataFrame:
    """Mean accuracy of the classes in each of `bins` log-spaced frequency bins, at the bin's median frequency."""
    counts = per_class["train_count"]
    edges = np.unique(np.geomspace(counts.min(), counts.max() + 1, bins + 1))
    binned = per_class.assign(bin=pd.cut(counts, edges, include_lowest=True, right=False))
    return binned.groupby("bin", observed=True).agg(x=("train_count", "median"), acc=("accuracy", "mean"))


def _per_class(run: str) -> pd.DataFrame | None:
    """A run's per_class.csv, or None when it is missing or not the table train-head writes."""
    try:
        pc = pd.read_csv(Path(run) / "per_class.csv")
        pc["accuracy"] = pd.to_numeric(pc["accuracy"], errors="coerce")
        pc["train_count"] = pd.to_numeric(pc["train_count"], errors="coerce")
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
        return None
    return pc


def plot_shot_bars(summary: pd.DataFrame, path: Path) -> None:
    """Many / medium / few / overall accuracy with the std over seeds, a group of horizontal bars per method
    (first dataset and model), so that long method names never overlap."""
    first = summary[(summary["dataset"] == summary["dataset"].iloc[0]) & (summary["model"] == summary["model"].iloc[0])]
    groups = ["many", "medium", "few", "overall"]
    y = np.arange(len(first))[::-1]  # the first method on top
    height = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(first) + 1.6))
    for i, g in enumerate(groups):
        ax.barh(
            y + (len(groups) - 1 - i) * height,
            100 * first[f"{g}_mean"].astype(float),
            height,
            xerr=100 * first[f"{g}_std"].fillna(0).astype(float),
            label=g,
            capsize=2,
            color=plt.cm.tab10(i),
        )
    ax.set_yticks(y + height * (len(groups) - 1) / 2, first["method"], fontsize=8)
    ax.set_xlabel("accuracy (%), mean ± std over seeds")
    ax.set_title(f"{first['dataset'].iloc[0]}, {first['model'].iloc[0]}: accuracy by shot group")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_seconds(row: dict) -> float:
    """What a method costs from scratch: a second stage with its first stage, else everything the run did (older
    runs: their training loop)."""
    for col in ("total_with_first_stage_seconds_mean", "total_seconds_mean", "train_seconds_mean"):
        if col in row and not pd.isna(row[col]):
            return row[col]
    return float("nan")


def plot_cost(summary: pd.DataFrame, path: Path) -> None:
    """Overall accuracy against training time, a point per method."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    several = summary["dataset"].nunique() > 1 or summary["model"].nunique() > 1
    for i, row in enumerate(summary.to_dict("records")):
        label = f"{row['method']} ({row['dataset']}, {row['model']})" if several else row["method"]
        ax.scatter(method_seconds(row), 100 * row["overall_mean"], label=label, s=40, **_style(i))
    _legend_outside(ax)
    _plain_log_x(ax)
    ax.set_xlabel("time of the whole method, a second stage with its first (s, log scale)")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title("Accuracy against training cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


REPORT_FILES = ("summary.csv", "report.md", "per_class_vs_frequency.png", "shot_groups.png", "accuracy_vs_cost.png")


def write_report(runs_dir: str | Path, log=print) -> dict:
    """summary.csv, report.md and three PNGs in `runs_dir`; returns their paths and the Markdown table."""
    runs_dir = guard.check_output(runs_dir, "The runs folder", "runs")  # not a cache or run, nor inside one
    guard.check_own_files(runs_dir, REPORT_FILES, "report")
    table = load_results(runs_dir, log)
    summary = summarize(table)
    summary.to_csv(runs_dir / "summary.csv", index=False)
    markdown = paper_table(summary)
    plots = {}
    if not summary.empty:
        plots = {
            "per_class": runs_dir / "per_class_vs_frequency.png",
            "shots": runs_dir / "shot_groups.png",
            "cost": runs_dir / "accuracy_vs_cost.png",
        }
        if not plot_per_class(table, plots["per_class"]):
            plots.pop("per_class")
        plot_shot_bars(summary, plots["shots"])
        plot_cost(summary, plots["cost"])
    failed = table[table["status"] == "failed"]
    lines = [
        f"# Results: {runs_dir.name}",
        "",
        f"{len(table) - len(failed)} runs finished, {len(failed)} failed. Accuracy in %, mean ± std over "
        f"seeds (no ± for a single seed); many / medium / few: more than 100, 20 to 100, fewer than 20 "
        f"training images.",
        "",
        markdown,
    ]
    lines += ["## Every metric and cost", "", detail_table(summary).to_markdown(index=False), ""]
    for name, title in (
        ("shots", "Accuracy by shot group"),
        ("per_class", "Per-class accuracy against training frequency"),
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
    report = runs_dir / "report.md"
    report.write_text("\n".join(lines))
    return {
        "report": str(report),
        "summary": str(runs_dir / "summary.csv"),
        "table": markdown,
        "plots": {k: str(v) for k, v in plots.items()},
        "runs": len(table),
        "failed": len(failed),
    }
