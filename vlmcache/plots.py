"""The report's plots, drawn per (dataset, model) and saying which they show: per-class accuracy against training
frequency, accuracy by shot group, accuracy against training cost; a distinct colour and marker per method.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402

from vlmcache.atomic import write_bytes_atomic  # noqa: E402
from vlmcache.tables import GROUPS, STD, distinct_seeds, finished_runs, row_labels, run_folder  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]


def save_figure(fig, path: Path, dpi: int) -> None:
    """A PNG written whole or not at all (`atomic`): a report drawn while another is written never tears a plot."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes_atomic(Path(path), buffer.getvalue())


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
    save_figure(fig, path, dpi=110)
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
    summary = summary.assign(label=row_labels(summary))
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
    save_figure(fig, path, dpi=110)


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
    labels = row_labels(summary)
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
    save_figure(fig, path, dpi=120)
