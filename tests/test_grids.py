"""Grids and reports over several datasets: numbers against a recomputation from each run's own files, one config
trained once, a runs folder held by one process, results.csv shared by pipelines, --select-on test marked."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import long_tailed_features, write_feature_cache
from typer.testing import CliRunner

from vlmcache import runlock
from vlmcache.ablate import run_pipeline
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.group import make_groups
from vlmcache.pipeline import load_pipeline
from vlmcache.plots import per_class_points
from vlmcache.report import write_report
from vlmcache.train import train_head
from vlmcache.train_config import TrainConfig

KEY = "vlmcache-tiny__random__00000000"  # synthetic caches filed under the tiny model, as extract would
COUNTS = {"three": [120, 40, 8], "five": [200, 80, 30, 12, 5]}  # training images per class
MANY, FEW = 50, 15  # custom shot thresholds: class 80 of `five` is many here, medium under 100 / 20
GRID = f"""\
name: two
datasets: [three, five]
models:
  - {{model: vlmcache-tiny, pretrained: none}}
seeds: [0, 1]
defaults: {{epochs: 2, lr: 0.01, batch_size: 64, device: cpu, many: {MANY}, few: {FEW}}}
methods:
  - {{name: CE, head: linear, loss: ce}}
  - {{name: CE again, head: linear}}
  - {{name: BS, head: linear, loss: balanced_softmax}}
  - {{name: cRT, stage2: crt, from: CE, epochs: 1}}
  - {{name: cRT again, stage2: crt, from: CE again, epochs: 1}}
"""
QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> Path:
    """Two datasets of 3 and 5 classes (pooled features only) in one cache folder, one encoder key."""
    root = tmp_path_factory.mktemp("grids")
    for seed, (name, counts) in enumerate(COUNTS.items()):
        x, y = long_tailed_features(np.random.default_rng(seed), counts, dim=8)
        xt, yt = long_tailed_features(np.random.default_rng(seed), [12] * len(counts), dim=8)
        write_feature_cache(root / "cache", name, {"train": (x, y, None), "test": (xt, yt, None)}, len(counts), key=KEY)
    return root / "cache"


def _pipeline(tmp_path: Path, caches: Path, text: str = GRID, runs: str = "runs") -> Path:
    path = tmp_path / f"{abs(hash(text))}.yaml"
    path.write_text(text + f"cache_dir: {caches}\nruns_dir: {tmp_path / runs}\n")
    return path


@pytest.fixture(scope="module")
def grid(caches, tmp_path_factory):
    """The two-dataset grid trained once, grouped: (its table, the runs folder, the report with its plots' panel
    titles, the pipeline file)."""
    import matplotlib.pyplot as plt

    tmp = tmp_path_factory.mktemp("grid")
    path = _pipeline(tmp, caches)
    table = run_pipeline(load_pipeline(path), **QUIET)
    titles = []
    with pytest.MonkeyPatch.context() as mp:
        close = plt.close
        mp.setattr(plt, "close", lambda fig: (titles.append([ax.get_title() for ax in fig.axes]), close(fig)))
        result = write_report(tmp / "runs", **QUIET)
    return table, tmp / "runs", {**result, "titles": titles}, path


def _metrics(run: str) -> dict:
    return json.loads((Path(run) / "metrics.json").read_text())


def test_a_grid_over_two_datasets_reports_what_its_runs_recompute_to(grid):
    table, runs_dir, _, _ = grid
    assert (table["status"] == "done").all(), table[["method", "error"]]
    summary = pd.read_csv(runs_dir / "summary.csv")
    for (dataset, method), rows in table.groupby(["dataset", "method"]):
        metrics = [_metrics(r)["metrics"] for r in rows["run"]]
        # many / medium / few recomputed from each run's per_class.csv with the custom thresholds
        for r, m in zip(rows["run"], metrics, strict=True):
            pc = pd.read_csv(Path(r) / "per_class.csv")
            assert pc["train_count"].tolist() == COUNTS[dataset]
            groups = {
                "many": pc["train_count"] > MANY,
                "few": pc["train_count"] < FEW,
                "medium": (pc["train_count"] >= FEW) & (pc["train_count"] <= MANY),
            }
            for g, sel in groups.items():
                assert m[g] == pytest.approx(pc.loc[sel, "accuracy"].mean())
        row = summary[(summary["dataset"] == dataset) & (summary["method"] == method)]
        assert len(row) == 1 and row["seeds"].iloc[0] == 2
        assert (row["many_threshold"].iloc[0], row["few_threshold"].iloc[0]) == (MANY, FEW)
        for g in ("overall", "many", "medium", "few"):
            values = np.array([m[g] for m in metrics])
            assert row[f"{g}_mean"].iloc[0] == pytest.approx(values.mean())
            assert row[f"{g}_std"].iloc[0] == pytest.approx(values.std(ddof=1))  # the sample std, as it says
    results = pd.read_csv(runs_dir / "results.csv")
    assert (results["many_threshold"] == MANY).all() and (results["few_threshold"] == FEW).all()
    for r, many in zip(results["run"], results["many"], strict=True):  # accuracy, not a threshold
        assert many == pytest.approx(_metrics(r)["metrics"]["many"])


def test_per_class_points_are_keyed_by_dataset(grid):
    table, runs_dir, _, _ = grid
    points = per_class_points(table, runs_dir)
    for dataset, counts in COUNTS.items():
        for method in ("CE", "BS", "cRT"):
            mine = points[(points["dataset"] == dataset) & (points["method"] == method)].sort_values("class")
            assert mine["train_count"].tolist() == counts
            runs = table[(table["dataset"] == dataset) & (table["method"] == method)]["run"]
            seeds = [pd.read_csv(Path(r) / "per_class.csv")["accuracy"].to_numpy() for r in runs]
            np.testing.assert_allclose(mine["accuracy"].to_numpy(), np.mean(seeds, axis=0))


def test_the_report_names_thresholds_std_and_shows_each_dataset(grid):
    _, _, result, _ = grid
    report = Path(result["report"]).read_text()
    assert f"more than {MANY}, {FEW} to {MANY}, fewer than {FEW} training images" in report
    assert "more than 100" not in report and "sample std over seeds (n - 1)" in report
    assert "CE again is the same configuration as CE (three): trained once per seed" in report
    per_class, shots = result["titles"][:2]  # drawn in this order by write_report
    assert sorted(shots) == [
        "five, vlmcache-tiny (random): accuracy by shot group",
        "three, vlmcache-tiny (random): accuracy by shot group",
    ]
    assert sum(t.startswith("three, ") for t in per_class) == sum(t.startswith("five, ") for t in per_class) == 5


def test_one_config_under_two_method_names_trains_once(grid, caches, tmp_path):
    table, runs_dir, _, path = grid
    again = table[table["method"] == "CE again"]
    ce = table[table["method"] == "CE"]
    assert again["run"].tolist() == ce["run"].tolist() and (again["same_config_as"] == "CE").all()
    assert len([p for p in runs_dir.iterdir() if (p / "metrics.json").is_file()]) == 2 * 2 * 3
    assert table[table["method"] == "cRT"]["status"].eq("done").all()
    crt, crt_again = (table[table["method"] == m] for m in ("cRT", "cRT again"))
    assert crt_again["run"].tolist() == crt["run"].tolist() and (crt_again["same_config_as"] == "cRT").all()
    # found at planning, before any cache is read: --dry-run lists them
    dry = CliRunner().invoke(app, ["ablate", str(path), "--dry-run", "--json"])
    same = {(r["dataset"], r["seed"], r["method"]): r.get("same_config_as") for r in json.loads(dry.stdout)["runs"]}
    assert {k: v for k, v in same.items() if v} == {
        (d, seed, m + " again"): m for d in COUNTS for seed in (0, 1) for m in ("CE", "cRT")
    }
    # alone (no groups): the second name no longer finds "exists already", and no second stage fails
    one = GRID.replace("datasets: [three, five]", "datasets: [three]")
    alone = run_pipeline(load_pipeline(_pipeline(tmp_path, caches, one)), group=False, **QUIET)
    assert (alone["status"] == "done").all(), alone[["method", "error"]]
    assert alone[alone["method"] == "CE again"]["run"].tolist() == alone[alone["method"] == "CE"]["run"].tolist()


def test_grouped_runs_record_their_own_share_and_the_groups_wall_time(grid):
    table, _, _, path = grid
    first = table[~table["method"].str.startswith("cRT")].drop_duplicates("run")
    assert first["group_wall_seconds"].nunique() == 2
    for wall, group in first.groupby("group_wall_seconds"):  # a group per dataset: CE and BS, two seeds each
        assert len(group) == 4 and group["dataset"].nunique() == 1
        costs = [_metrics(r)["cost"] for r in group["run"]]
        assert all(c["group_size"] == 4 and c["total_seconds_scope"] == "share of group" for c in costs)
        assert sum(c["total_seconds"] for c in costs) <= wall + 0.05  # shares of one wall time, not four of it
    again = run_pipeline(load_pipeline(path), **QUIET)  # resumed: each run keeps its group's wall time
    assert (again["status"] == "resumed").all()
    pd.testing.assert_series_equal(again["group_wall_seconds"], table["group_wall_seconds"])


def test_the_group_key_includes_the_dataset(tmp_path):
    cfgs = [
        TrainConfig(dataset=d, cache_dir=str(tmp_path), cache_key=KEY, head="linear", device="cpu")
        for d in ("three", "five", "three")
    ]
    assert make_groups(cfgs) == [[0, 2], [1]]


# --------------------------------------------------------------------------- one runs folder, several writers

SMALL = """\
name: {name}
datasets: [three]
models:
  - {{model: vlmcache-tiny, pretrained: none}}
seeds: [0]
defaults: {{epochs: 1, lr: 0.01, batch_size: 64, device: cpu}}
methods:
  - {{name: {method}, head: linear, loss: {loss}{extra}}}
"""


def test_pipelines_share_results_csv_and_report_sees_every_finished_run(caches, tmp_path):
    a = _pipeline(tmp_path, caches, SMALL.format(name="a", method="CE", loss="ce", extra=""))
    b = _pipeline(tmp_path, caches, SMALL.format(name="b", method="LA", loss="logit_adjust", extra=""))
    logs = []
    run_pipeline(load_pipeline(a), **QUIET)
    run_pipeline(load_pipeline(b), **QUIET)
    run_pipeline(load_pipeline(a), log=logs.append)  # a again: its rows replaced, b's kept
    results = pd.read_csv(tmp_path / "runs" / "results.csv")
    assert sorted(zip(results["pipeline"], results["method"], strict=True)) == [("a", "CE"), ("b", "LA")]
    assert results.set_index("pipeline").loc["a", "status"] == "resumed"
    # a run of train-head's into the same folder, twice with one seed (two folders): one seed, the last one kept
    cfg = dict(dataset="three", cache_dir=str(caches), device="cpu", epochs=1, loss="focal")
    for name in ("x1", "x2"):
        train_head(TrainConfig(**cfg, runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "runs" / name)), **QUIET)
    os.utime(tmp_path / "runs" / "x1" / "metrics.json", (1e9, 1e9))  # x1 finished first
    result = write_report(tmp_path / "runs", **QUIET)
    summary = pd.read_csv(result["summary"])
    assert sorted(summary["method"]) == ["CE", "LA", "linear + focal + instance"]
    assert summary.set_index("method").loc["linear + focal + instance", "seeds"] == 1
    report = Path(result["report"]).read_text()
    assert "the run that finished last is kept" in report and str(tmp_path / "runs" / "x1") in report
    focal = json.loads((tmp_path / "runs" / "x2" / "metrics.json").read_text())["metrics"]["overall"]
    assert summary.set_index("method").loc["linear + focal + instance", "overall_mean"] == pytest.approx(focal)


def test_a_results_csv_that_cannot_be_merged_stops_the_pipeline_before_any_run(caches, tmp_path):
    path = _pipeline(tmp_path, caches, SMALL.format(name="a", method="CE", loss="ce", extra=""))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(VlmcacheError, match="no column.*would be merged with this pipeline's results"):
        run_pipeline(load_pipeline(path), **QUIET)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [runlock.LOCK_FILE, "results.csv"]


def test_select_on_the_reported_split_warns_and_is_marked(caches, tmp_path):
    path = _pipeline(tmp_path, caches, SMALL.format(name="s", method="CE", loss="ce", extra=", select_on: test"))
    logs = []
    table = run_pipeline(load_pipeline(path), log=logs.append)
    assert any(line.startswith("warning: --select-on test: the epoch is selected on the split") for line in logs)
    assert bool(table["selected_on_reported_split"].iloc[0])
    assert "--select-on test" in _metrics(table["run"].iloc[0])["warnings"][0]
    report = Path(write_report(tmp_path / "runs", **QUIET)["report"]).read_text()
    assert "| CE † |" in report and "† selected its epoch on the split it reports" in report


# --------------------------------------------------------------------------- the runs-folder lock

HOLD = (
    "import sys\n"
    "from vlmcache import runlock\n"
    "with runlock.hold(sys.argv[1], 'test holder'):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"
)


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding the runs folder until a line arrives on its stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_into_a_held_runs_folder_refuses_naming_the_holder(caches, tmp_path):
    path = _pipeline(tmp_path, caches, SMALL.format(name="a", method="CE", loss="ce", extra=""))
    holder = _holder(tmp_path / "runs")
    try:
        runner = CliRunner()
        refused = runner.invoke(app, ["ablate", str(path)])
        assert refused.exit_code == 2 and refused.exception is not None
        line = " ".join(refused.output.split())
        assert f"is in use by another vlmcache process (pid {holder.pid} (test holder))" in line and "--wait" in line
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [runlock.LOCK_FILE]  # nothing trained
        head = runner.invoke(
            app, ["train-head", "-d", "three", "--cache-dir", str(caches), "--runs-dir", str(tmp_path / "runs"),
                  "--device", "cpu", "--epochs", "1"],
        )  # fmt: skip
        assert head.exit_code == 2 and f"pid {holder.pid}" in head.output
        tune = runner.invoke(
            app, ["finetune", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none", "--device", "cpu", "--epochs",
                  "1", "--workers", "0", "--runs-dir", str(tmp_path / "runs")],
        )  # fmt: skip
        assert tune.exit_code == 2 and f"pid {holder.pid}" in tune.output and "--wait" in tune.output
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [runlock.LOCK_FILE]
        # a mistake is found before the folder is held: nothing is made for a run that cannot start
        bad = runner.invoke(
            app, ["train-head", "-d", "nine", "--cache-dir", str(caches), "--runs-dir", str(tmp_path / "new")]
        )
        assert bad.exit_code == 2 and not (tmp_path / "new").exists()
        # --wait: the holder lets go a moment later, and the waiter goes on
        threading.Timer(0.5, lambda: (holder.stdin.write("done\n"), holder.stdin.flush())).start()
        t0 = time.perf_counter()
        with runlock.hold(tmp_path / "runs", "waiter", wait=True, log=lambda *a: None):
            assert time.perf_counter() - t0 >= 0.4
        holder.wait(10)
    finally:
        holder.kill()
    # a holder killed outright leaves no stale lock: the kernel released it with the process
    killed = _holder(tmp_path / "runs")
    killed.kill()
    killed.wait(10)
    with runlock.hold(tmp_path / "runs", "after a kill"):
        assert (tmp_path / "runs" / runlock.LOCK_FILE).read_text().startswith(f"{os.getpid()} ")


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with runlock.hold(tmp_path / "runs", "outer"):
        with runlock.hold(tmp_path / "runs", "inner"):
            pass
        assert str((tmp_path / "runs").resolve()) in runlock._held
    assert not runlock._held
    with pytest.raises(VlmcacheError, match="cannot be made"):
        (tmp_path / "file").write_text("x")
        with runlock.hold(tmp_path / "file" / "runs", "under a file"):
            pass
