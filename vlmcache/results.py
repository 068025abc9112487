"""A pipeline's results.csv: a row per run, the rows merged with those of the other pipelines that wrote into the
runs folder, and the table written atomically (the report reads it back with `tables.read_results_csv`).
"""

from __future__ import annotations

import io
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd

from vlmcache import runs
from vlmcache.errors import VlmcacheError
from vlmcache.pipeline import GRID_DICTS
from vlmcache.planning import PlannedRun
from vlmcache.train_config import TrainConfig

METRICS = ("overall", "many", "medium", "few", "top5", "mean_per_class")
COSTS = ("train_seconds", "total_seconds", "total_with_first_stage_seconds", "samples_per_s", "peak_rss_mb")


def row(
    run: PlannedRun, cfg: TrainConfig | None, status: str, result: dict | None, error: str | None, run_dir: str | None
) -> dict:
    row = {
        "dataset": run.dataset,
        "model": run.model["model"],
        "pretrained": cfg.pretrained if cfg is not None else run.model.get("pretrained"),
        "method": run.method,
        "seed": run.seed,
        "status": status,
        "error": error,
        "run": run_dir,
    }
    if cfg is not None:
        row["group_key"] = runs.identity_key(asdict(cfg))
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if f.name in GRID_DICTS:
                for k, v in value.items():
                    row[f"{f.name}.{k}"] = v
            elif f.name in THRESHOLDS:  # `many` and `few` are accuracy columns: the thresholds get their own
                row[THRESHOLDS[f.name]] = value
            elif f.name not in ("dataset", "model", "pretrained", "seed", "runs_dir", "out", "overwrite"):
                row[f.name] = value
    for m in METRICS:
        row[m] = (result or {}).get("metrics", {}).get(m)
    for c in COSTS:
        row[c] = (result or {}).get("cost", {}).get(c)
    if result is not None:
        row["group_size"] = result.get("cost", {}).get("group_size", 1)
        row["selected_on_reported_split"] = bool(result.get("warnings"))
    return row


THRESHOLDS = {"many": "many_threshold", "few": "few_threshold"}  # TrainConfig field -> results.csv column


RESULTS = "results.csv"


def read_previous_results(out: Path) -> pd.DataFrame | None:
    """The runs folder's results.csv as another pipeline (or an earlier run of this one) left it, read before any
    run trains, so that a table this pipeline could not keep stops it before it costs anything."""
    from vlmcache.tables import read_results_csv

    path = out / RESULTS
    if not path.is_file():
        return None
    try:
        return read_results_csv(path)
    except VlmcacheError as e:
        raise VlmcacheError(
            f"{e} It would be merged with this pipeline's results; move it away (or fix it) and run again."
        ) from None


def carry_group_walls(previous: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """A resumed run keeps the wall time of the group it trained in, as the previous results.csv recorded it
    (metrics.json cannot hold it: a run is saved before its group ends)."""
    if previous is None or "group_wall_seconds" not in previous.columns:
        return table
    walls = previous.dropna(subset=["run", "group_wall_seconds"]).drop_duplicates("run", keep="last")
    known = dict(zip(walls["run"].astype(str), walls["group_wall_seconds"], strict=True))
    carried = table["run"].astype(str).map(known)
    if "group_wall_seconds" in table.columns:
        carried = table["group_wall_seconds"].where(table["group_wall_seconds"].notna(), carried)
    return table.assign(group_wall_seconds=carried)


def merge_results(previous: pd.DataFrame | None, table: pd.DataFrame) -> pd.DataFrame:
    """This pipeline's rows, after the previous table's rows of every other pipeline: a pipeline's rows are
    replaced only by the same pipeline (its `name`). Rows from before the `pipeline` column were written by an
    unknown pipeline: such a row goes only when this pipeline has a row of its dataset, model, seed and method
    (a re-run of that pipeline, as before the column existed)."""
    if previous is None or previous.empty:
        return table
    name = table["pipeline"].iloc[0]
    theirs = previous["pipeline"] if "pipeline" in previous.columns else pd.Series(np.nan, index=previous.index)
    keys = ["dataset", "model", "seed", "method"]
    mine = set(map(tuple, table[keys].astype(str).to_numpy()))
    same_row = np.array([tuple(r) in mine for r in previous[keys].astype(str).to_numpy()], dtype=bool)
    keep = (theirs.notna() & (theirs.astype(str) != str(name))) | (theirs.isna() & ~same_row)
    return pd.concat([previous[keep.to_numpy()], table], ignore_index=True)


def write_results(out: Path, table: pd.DataFrame) -> None:
    """results.csv (and results.parquet with pyarrow) in the runs folder, each replaced atomically."""
    from vlmcache.cache import write_bytes_atomic

    write_bytes_atomic(out / RESULTS, table.to_csv(index=False).encode())
    try:
        buffer = io.BytesIO()
        table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(buffer)
    except ImportError:
        return  # Parquet needs pyarrow (or fastparquet); the CSV has everything
    write_bytes_atomic(out / "results.parquet", buffer.getvalue())
