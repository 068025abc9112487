"""The report's tables: results.csv and finished run folders read back (each checked), one row per distinct seed,
mean and sample standard deviation over seeds, the seed paper's table and the table of every metric and cost.

Seeds are distinct seeds: a configuration trained twice with one seed (two run folders, or one run listed by two
pipelines) counts once, and the run kept is the one that finished last (its metrics.json written last). The spread
over seeds is the sample standard deviation (n - 1 in the denominator), and says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from vlmcache import runs
from vlmcache.errors import VlmcacheError
from vlmcache.schemas import describe

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


def row_labels(summary: pd.DataFrame) -> pd.Series:
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
    summary = summary.assign(row=row_labels(summary))
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
    out["method"] = row_labels(summary) if "method" in out.columns and "model" in out.columns else out.get("method")
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
