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
COSTS = (
    "train_seconds",
    "total_seconds",
    "total_with_first_stage_seconds",
    "group_wall_seconds",
    "samples_per_s",
    "peak_rss_mb",
)
GROUPS = ["dataset", "model", "pretrained", "method"]
THRESHOLD_COLUMNS = ("many_threshold", "few_threshold")  # a run's shot thresholds (results.csv's own columns)
SELECTED = "selected_on_reported_split"  # the run's epoch was selected on the split it reports (--select-on test)
STD = "sample std over seeds (n - 1)"
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
    row["many_threshold"], row["few_threshold"] = config.get("many"), config.get("few")
    row["group_size"] = result["cost"].get("group_size", 1)
    row[SELECTED] = bool(result.get("warnings"))
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


def read_results_csv(csv: Path) -> pd.DataFrame:
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


def run_folder(runs_dir: Path, run) -> Path | None:
    """A row's run folder: as results.csv names it, else by its name inside `runs_dir` (results.csv names runs as
    the pipeline's runs_dir spelled them, which may be relative to another working folder)."""
    if not isinstance(run, str) or not run:
        return None
    for path in (Path(run), Path(runs_dir) / Path(run).name):
        if path.is_dir():
            return path
    return None


def load_results(runs_dir: Path, log=print) -> pd.DataFrame:
    """results.csv's rows (every pipeline's) and a row for each finished run folder it does not list."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise VlmcacheError(f"The runs folder '{runs_dir}' does not exist.")
    csv = runs_dir / "results.csv"
    table = collect_runs(runs_dir, log)
    if csv.is_file():
        listed = read_results_csv(csv)
        seen = {str(f.resolve()) for f in (run_folder(runs_dir, r) for r in listed["run"]) if f is not None}
        if not table.empty:
            table = table[[str(Path(r).resolve()) not in seen for r in table["run"]]]
        table = pd.concat([listed, table], ignore_index=True) if not table.empty else listed
    if table.empty:
        raise VlmcacheError(f"No finished runs under '{runs_dir}' (no results.csv and no run folders).")
    return table


def finished_runs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that finished, each label naming one configuration (a label with several gets ` #<key>`)."""
    ok = table[table["status"] != "failed"]
    for c in GROUPS:  # a hand-made table may leave out the dataset, model or weights
        if c not in ok.columns:
            ok = ok.assign(**{c: ""})
    if "group_key" in ok.columns and not ok.empty:  # one label, several configurations (put together by hand)
        clash = ok.groupby(GROUPS, dropna=False)["group_key"].transform("nunique") > 1
        ok = ok.assign(method=np.where(clash, ok["method"] + " #" + ok["group_key"].astype(str), ok["method"]))
    return ok


def distinct_seeds(ok: pd.DataFrame, runs_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per label and seed, the rows left out). A configuration trained twice with one seed is one seed:
    the run kept is the one whose metrics.json was written last (the latest result of that configuration); a run
    listed twice (two pipelines naming one folder) is the same run, kept once."""
    if ok.empty or "seed" not in ok.columns:
        return ok, ok.iloc[:0]
    keys = GROUPS + [k for k in ("group_key", "seed") if k in ok.columns]
    finished = [_finished_at(runs_dir, r) for r in (ok["run"] if "run" in ok.columns else [None] * len(ok))]
    ranked = ok.assign(_finished=finished, _order=np.arange(len(ok)))
    ranked = ranked.sort_values(["_finished", "_order"], na_position="first", kind="stable")
    last = ~ranked.duplicated(keys, keep="last")
    kept = ranked[last].sort_values("_order").drop(columns=["_finished", "_order"])
    dropped = ranked[~last].sort_values("_order").drop(columns=["_finished", "_order"])
    if "run" in dropped.columns and len(dropped):  # the same folder listed twice is not a run left out

        def ids(frame: pd.DataFrame) -> list[tuple]:
            return [(*k, r) for k, r in zip(map(tuple, frame[keys].astype(str).to_numpy()), frame["run"], strict=True)]

        kept_ids = set(ids(kept))
        dropped = dropped[[i not in kept_ids for i in ids(dropped)]]
    return kept, dropped


def _finished_at(runs_dir: Path | None, run) -> float:
    folder = run_folder(runs_dir or Path("."), run)
    try:
        return (folder / "metrics.json").stat().st_mtime if folder is not None else float("nan")
    except OSError:
        return float("nan")


def summarize(table: pd.DataFrame, runs_dir: Path | None = None) -> pd.DataFrame:
    """Mean and sample standard deviation (n - 1) over distinct seeds of every metric and cost, per dataset,
    model, method and shot thresholds; `seeds` counts the distinct seeds, and a row any of whose runs selected
    its epoch on the split it reports is marked (`selected_on_reported_split`)."""
    ok, _ = distinct_seeds(finished_runs(table), runs_dir)
    if ok.empty:
        return pd.DataFrame(columns=GROUPS)
    cols = [c for c in (*METRICS, *COSTS) if c in ok.columns]
    keys = GROUPS + [k for k in ("group_key", *THRESHOLD_COLUMNS) if k in ok.columns]
    ok = ok.assign(**{c: pd.to_numeric(ok[c], errors="coerce") for c in cols})
    grouped = ok.groupby(keys, sort=False, dropna=False)
    summary = grouped[cols].agg(["mean", "std"])  # pandas' std: the sample std, ddof=1
    summary.columns = [f"{c}_{s}" for c, s in summary.columns]
    summary["seeds"] = grouped.size()
    if SELECTED in ok.columns:
        summary[SELECTED] = grouped[SELECTED].agg(lambda v: bool((v.astype(str).str.lower() == "true").any()))
    return summary.reset_index()


def _cell(mean, std) -> str:
    """A metric in % with its std over seeds; the std is there whenever there are two seeds or more, 0.0 too
    (no ± means one seed)."""
    if pd.isna(mean):
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if not pd.isna(std) else "")


def _row_labels(summary: pd.DataFrame) -> pd.Series:
    """A table row's name: the method, its backbone when the method has several, its shot thresholds when it has
    several, and a dagger when its epoch was selected on the split it reports."""
    backbone = summary["model"].astype(str) + np.where(
        summary["pretrained"].isna(), "", " " + summary["pretrained"].astype(str)
    )
    several = summary.assign(b=backbone).groupby("method")["b"].transform("nunique") > 1
    label = summary["method"] + np.where(several, " (" + backbone + ")", "")
    if all(c in summary.columns for c in THRESHOLD_COLUMNS):
        pair = "many > " + summary["many_threshold"].astype(str) + ", few < " + summary["few_threshold"].astype(str)
        several = summary.assign(t=pair).groupby(["method", "dataset"])["t"].transform("nunique") > 1
        label = label + np.where(several, " [" + pair + "]", "")
    if SELECTED in summary.columns:
        label = label + np.where(summary[SELECTED].astype(str).str.lower() == "true", " †", "")
    return label


def paper_table(summary: pd.DataFrame) -> str:
    """Markdown laid out as the seed paper's tables: a row per method, many / medium / few / overall per dataset.

    Written out, not through DataFrame.to_markdown: tabulate pads every cell to its column's width, and this
    table is read as text (printed by `ablate`, diffed between runs), where one fixed layout per row is kinder."""
    if summary.empty:
        return "(no finished runs)\n"
    # a row per (method, model, weights): the model and weights are named when a method has several
    summary = summary.assign(row=_row_labels(summary))
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
    "total_seconds": ("whole run (s; grouped: its share)", "{:,.2f}"),
    "total_with_first_stage_seconds": ("with its first stage (s)", "{:,.2f}"),
    "group_wall_seconds": ("its group's wall time (s)", "{:,.2f}"),
    "samples_per_s": ("samples/s", "{:,.0f}"),
    "peak_rss_mb": ("peak RSS of the run (MB)", "{:,.0f}"),
}


def detail_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every metric (in %, mean ± sample std over seeds, as the main table) and every cost (mean over seeds, in
    its own unit, named in its header) per dataset, model and method, with the shot thresholds each row used:
    strings, so that no cell turns into 1.3e+04."""
    out = summary[[c for c in (*GROUPS, "seeds") if c in summary.columns]].copy()
    out["method"] = _row_labels(summary) if "method" in out.columns and "model" in out.columns else out.get("method")
    for c in THRESHOLD_COLUMNS:
        if c in summary.columns:
            out[c.replace("_", " ")] = ["-" if pd.isna(v) else f"{int(v)}" for v in summary[c]]
    for m in METRICS:
        if f"{m}_mean" in summary.columns:
            out[f"{m.replace('_', ' ')} (%)"] = [
                _cell(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"], strict=True)
            ]
    for c, (header, fmt) in COST_HEADERS.items():
        if f"{c}_mean" in summary.columns and summary[f"{c}_mean"].notna().any():
            out[header] = ["-" if pd.isna(v) else fmt.format(v) for v in summary[f"{c}_mean"]]
    return out


# --------------------------------------------------------------------------- plots


def _panel_title(key: tuple) -> str:
    """`dataset, model (weights)` for a plot's panel: what it shows."""
    dataset, model, pretrained = key
    return f"{dataset}, {model}" + ("" if pd.isna(pretrained) or pretrained == "" else f" ({pretrained})")


def per_class_points(table: pd.DataFrame, runs_dir: Path | None = None) -> pd.DataFrame:
    """Per-class accuracy of every (dataset, model, weights, method), each class its mean over distinct seeds:
    columns dataset, model, pretrained, method, class, train_count, accuracy. Classes are keyed by their dataset
    (class 2 of one dataset is not class 2 of another)."""
    ok, _ = distinct_seeds(finished_runs(table), runs_dir)
    ok = ok[ok["run"].notna()] if "run" in ok.columns else ok.iloc[:0]
    parts = []
    for key, group in ok.groupby([*GROUPS], sort=False, dropna=False):
        frames = [f for f in (_per_class(runs_dir, r) for r in group["run"]) if f is not None]
        if not frames:
            continue
        pc = pd.concat(frames).dropna(subset=["accuracy"])
        pc = pc[pc["train_count"] > 0]
        if pc.empty:
            continue
        by = "class" if "class" in pc.columns else "train_count"
        agg = pc.groupby(by, as_index=False).agg(train_count=("train_count", "first"), accuracy=("accuracy", "mean"))
        if by != "class":
            agg["class"] = np.nan
        parts.append(agg.assign(**dict(zip(GROUPS, key, strict=True))))
    if not parts:
        return pd.DataFrame(columns=[*GROUPS, "class", "train_count", "accuracy"])
    return pd.concat(parts, ignore_index=True)[[*GROUPS, "class", "train_count", "accuracy"]]


def plot_per_class(table: pd.DataFrame, path: Path, bins: int = 12, runs_dir: Path | None = None) -> bool:
    """Per-class accuracy against training images per class (log x): a panel per (dataset, model) and method,
    each class a point (its mean over seeds) and a line through the means of log-spaced frequency bins; the first
    method's line of the same dataset and model is drawn faintly in its other panels for comparison. Readable at
    10 classes and at 8,142."""
    points = per_class_points(table, runs_dir)
    if points.empty:
        return False
    blocks = [
        (key, list(g.groupby("method", sort=False))) for key, g in points.groupby(GROUPS[:3], sort=False, dropna=False)
    ]
    cols = min(4, max(len(methods) for _, methods in blocks))
    layout = []  # (block index, method index) per panel, each block starting on a new row of panels
    for b, (_, methods) in enumerate(blocks):
        layout += [(b, m) for m in range(len(methods))]
        layout += [None] * (-len(methods) % cols)
    rows = len(layout) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), sharey=True, squeeze=False)
    for ax, spot in zip(axes.flat, layout, strict=True):
        if spot is None:
            ax.set_visible(False)
            continue
        b, m = spot
        key, methods = blocks[b]
        method, pc = methods[m]
        reference_name, reference = methods[0][0], _binned(methods[0][1], bins)
        style = _style(m)
        alpha = max(0.15, min(0.8, 30 / len(pc)))
        ax.scatter(pc["train_count"], 100 * pc["accuracy"], s=10, alpha=alpha, color=style["color"], lw=0, zorder=3)
        if m:
            ax.plot(reference["x"], 100 * reference["acc"], color="0.6", lw=1, ls="--", label=reference_name)
        line = _binned(pc, bins)
        ax.plot(line["x"], 100 * line["acc"], color=style["color"], lw=2)
        ax.set_title(f"{_panel_title(key)}\n{method}", fontsize=8)
        _plain_log_x(ax)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.supxlabel("training images of the class (log scale)", fontsize=9)
    fig.supylabel("test accuracy of the class (%)", fontsize=9)
    fig.suptitle("Per-class accuracy against training frequency, per dataset and model (dashed: its first method)",
                 fontsize=10)  # fmt: skip
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


def _per_class(runs_dir: Path | None, run: str) -> pd.DataFrame | None:
    """A run's per_class.csv, or None when it is missing or not the table train-head writes."""
    folder = run_folder(runs_dir or Path("."), run)
    if folder is None:
        return None
    try:
        pc = pd.read_csv(folder / "per_class.csv")
        pc["accuracy"] = pd.to_numeric(pc["accuracy"], errors="coerce")
        pc["train_count"] = pd.to_numeric(pc["train_count"], errors="coerce")
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
        return None
    return pc


def plot_shot_bars(summary: pd.DataFrame, path: Path) -> None:
    """Many / medium / few / overall accuracy with the sample std over seeds, a group of horizontal bars per
    method, a panel per (dataset, model) titled with both, so that long method names never overlap."""
    groups = ["many", "medium", "few", "overall"]
    summary = summary.assign(label=_row_labels(summary))
    panels = list(summary.groupby(GROUPS[:3], sort=False, dropna=False))
    heights = [0.55 * len(rows) + 0.9 for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.7), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    height = 0.8 / len(groups)
    for ax, (key, rows) in zip(axes[:, 0], panels, strict=True):
        y = np.arange(len(rows))[::-1]  # the first method on top
        for i, g in enumerate(groups):
            ax.barh(
                y + (len(groups) - 1 - i) * height,
                100 * rows[f"{g}_mean"].astype(float),
                height,
                xerr=100 * rows[f"{g}_std"].fillna(0).astype(float),
                label=g,
                capsize=2,
                color=plt.cm.tab10(i),
            )
        ax.set_yticks(y + height * (len(groups) - 1) / 2, rows["label"], fontsize=8)
        ax.set_title(f"{_panel_title(key)}: accuracy by shot group", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1, 0].set_xlabel(f"accuracy (%), mean ± {STD}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_seconds(row: dict) -> float:
    """What a method costs from scratch: a second stage with its first stage, else everything the run did (older
    runs: their training loop). A run trained in a group counts its share of the group (its own set-up, steps and
    evaluation), not the group's wall time."""
    for col in ("total_with_first_stage_seconds_mean", "total_seconds_mean", "train_seconds_mean"):
        if col in row and not pd.isna(row[col]):
            return row[col]
    return float("nan")


def plot_cost(summary: pd.DataFrame, path: Path) -> None:
    """Overall accuracy against training time, a point per method, labelled with its dataset and model when the
    report has several."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    several = summary["dataset"].nunique() > 1 or summary["model"].nunique() > 1
    only = "" if several else f" ({_panel_title(tuple(summary[GROUPS[:3]].iloc[0]))})"
    labels = _row_labels(summary)
    for i, row in enumerate(summary.to_dict("records")):
        label = f"{labels.iloc[i]} ({row['dataset']}, {row['model']})" if several else labels.iloc[i]
        ax.scatter(method_seconds(row), 100 * row["overall_mean"], label=label, s=40, **_style(i))
    _legend_outside(ax)
    _plain_log_x(ax)
    ax.set_xlabel("time of the whole method, a second stage with its first; a grouped run: its share (s, log)")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title(f"Accuracy against training cost{only}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    """summary.csv and report.md (the plots are written as they are drawn)."""
    summary.to_csv(runs_dir / "summary.csv", index=False)
    report = runs_dir / "report.md"
    report.write_text(text)
    return {
        "report": str(report),
        "summary": str(runs_dir / "summary.csv"),
        "table": markdown,
        "plots": {k: str(v) for k, v in plots.items()},
        "runs": len(table),
        "failed": len(failed),
    }
