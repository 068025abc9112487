"""The CLI answers at once and speaks briefly (issue 29): mistakes are answered before torch is imported, output is
one line per thing, Ctrl-C says what is kept, a cache is found by the flags that made it, and the small mistakes a
new user meets each get one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vlmcache.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "torchvision", "h5py", "pandas", "faiss", "matplotlib")

# Each command below is a user mistake that needs no torch to see; the script runs them in one process (one
# interpreter start for all) and reports, after each, its exit code and which heavy libraries were imported.
_NO_TORCH_SCRIPT = """
import json, sys
from vlmcache.cli import app
heavy = {heavy!r}
found = []
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="vlmcache")
        code = 0
    except SystemExit as e:
        code = e.code
    found.append([args, code, sorted(m for m in heavy if m in sys.modules)])
print("RESULT " + json.dumps(found))
"""


def test_argument_errors_are_answered_before_torch_is_imported(tmp_path):
    (tmp_path / "a_file").write_text("x")
    cases = [
        ["extract", "--dataset", "inat18"],  # no --root: issue 29's example
        ["extract", "--dataset", "places_lt", "--root", str(tmp_path / "missing")],
        ["extract", "--dataset", "split"],  # no --split-file
        ["extract", "--dataset", "digits_lt", "--model", "ViT-B-61"],
        ["extract", "--dataset", "digits_lt", "--templates", "opnai"],
        ["extract", "--dataset", "digits_lt", "--decode", "fast"],
        ["extract", "--dataset", "digits_lt", "--batch-size", "0"],
        ["extract", "--dataset", "digits_lt", "--cache-dir", str(tmp_path / "a_file")],
        ["extract", "--dataset", "imagefolder", "--root", str(tmp_path), "--name", "../up"],
        ["train-head", "--threads", "-1"],
        ["knn", "-d", "imagefolder", "--name", "../up"],
        ["export", "--splits", "train", "--splits", "test", "--splits", "train", "--out", str(tmp_path / "x")],
    ]
    script = _NO_TORCH_SCRIPT.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    for args, code, imported in json.loads(line[len("RESULT ") :]):
        assert code == 2, (args, proc.stderr[-2000:])
        assert imported == [], f"{' '.join(args)} imported {imported} before answering"
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == len(cases)


def test_torch_free_model_names_are_open_clips():
    """extract checks --model against the model-config files before open_clip is imported; open_clip's own list
    must be the same, or a valid model would be refused (or a typo pass to the slow path)."""
    from vlmcache.encoders import list_models
    from vlmcache.extract_config import SEED_MAX, model_names
    from vlmcache.schemas import SEED_MAX as SCHEMA_SEED_MAX

    assert set(model_names()) == set(list_models())
    assert SEED_MAX == SCHEMA_SEED_MAX


# --------------------------------------------------------------------------- finding caches by the flags that made them


def _user_cache(cache_dir: Path, folder: str, num_classes: int = 3):
    """A cache filed as `extract --dataset imagefolder --root .../<folder>` files it: under the root's name."""
    from conftest import long_tailed_features, write_feature_cache

    rng = np.random.default_rng(0)
    train = long_tailed_features(rng, [20, 8, 4][:num_classes] if num_classes > 1 else [12], dim=8)
    test = long_tailed_features(rng, [4] * num_classes, dim=8)
    splits = {"train": (*train, None), "test": (*test, None)}
    return write_feature_cache(cache_dir, folder, splits, num_classes)


def test_the_flags_that_made_a_cache_find_it(tmp_path):
    model_dir = _user_cache(tmp_path / "cache", "imgs")
    made_by = ["-d", "imagefolder", "--root", str(tmp_path / "imgs"), "--cache-dir", str(tmp_path / "cache")]
    res = runner.invoke(app, ["zero-shot", *made_by, "--templates", "photo", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dataset"] == "imgs"
    res = runner.invoke(app, ["knn", *made_by, "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", *made_by, "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert [line.startswith("train: ") for line in res.output.splitlines()].count(True) == 1  # once, not twice
    assert (tmp_path / "out" / "train.parquet").is_file()
    # --name as extract took it, and the folder's own name, find the same cache
    named = ["-d", "split", "--name", "imgs", "--cache-dir", str(tmp_path / "cache")]
    assert runner.invoke(app, ["zero-shot", *named, "--templates", "photo"]).exit_code == 0
    assert (
        runner.invoke(
            app, ["zero-shot", "-d", "imgs", "--templates", "photo", "--cache-dir", str(tmp_path / "cache")]
        ).exit_code
        == 0
    )
    assert model_dir.is_dir()


def test_a_cache_not_found_names_the_flags_that_would_find_it(tmp_path):
    _user_cache(tmp_path / "cache", "imgs")
    res = runner.invoke(app, ["zero-shot", "-d", "imagefolder", "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2
    assert "-d imgs" in res.output and "--root DIR" in res.output
    assert "vlmcache extract --dataset imagefolder" not in res.output  # not the command that was already run
    # --root beside a cache's own name, or with no --dataset, would be ignored: refused
    res = runner.invoke(app, ["knn", "-d", "imgs", "--root", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2 and "--root" in res.output and "imagefolder, split or wds" in res.output
    res = runner.invoke(app, ["export", "--name", "imgs", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no --dataset was given" in res.output


# --------------------------------------------------------------------------- small items


def test_cache_ls_says_an_imported_cache_has_no_class_texts(tmp_path):
    from vlmcache import text_cache

    model_dir = _user_cache(tmp_path, "mine")
    names = [f"class {i}" for i in range(3)]  # as `vlmcache import` writes it: class names, no embeddings
    text_cache.write_text(
        model_dir / text_cache.TEXT_FILE, text_cache.TextCache({"imported_from": "x"}, names, {}, 100.0)
    )
    _user_cache(tmp_path, "other")
    res = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path), "--json"])
    found = {c["dataset"]: c for c in json.loads(res.stdout)["caches"]}
    assert found["mine"]["text"] is False and found["mine"]["text_sets"] == []
    assert found["other"]["text"] is True and found["other"]["text_sets"] == ["photo"]
    res = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path)])
    row = next(line for line in res.output.splitlines() if "mine" in line and "│" in line)
    assert " no " in row


def test_train_head_refuses_a_one_class_cache_in_one_line(tmp_path):
    _user_cache(tmp_path, "one", num_classes=1)
    res = runner.invoke(app, ["train-head", "--cache-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert "1 class" in res.output and "at least 2" in res.output and "torch.Size" not in res.output


def test_brackets_in_user_text_print_as_they_are(tmp_path):
    """Rich markup is off for what vlmcache prints: a path or dataset named `[red]x[/red]` is shown, not styled away."""
    res = runner.invoke(app, ["extract", "-d", "split", "--split-file", "train=[red]x[/red].txt"])
    assert res.exit_code == 2 and "'[red]x[/red].txt'" in res.output, res.output
    _user_cache(tmp_path, "[b]mine")  # a folder name: no closing tag (it holds a slash)
    res = runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "[b]mine" in res.output, res.output


def test_demo_over_a_cache_of_other_settings_names_only_its_own_flags(tmp_path):
    """A digits_lt cache made by `extract` with another shard size: extract's advice (--overwrite) is not the
    demo's to give; it says what the demo can do, and keeps the cache."""
    made = runner.invoke(app, ["extract", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none", "--shard-size",
                               "100", "--workers", "0", "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert made.exit_code == 0, made.output
    manifest = next((tmp_path / "cache").rglob("train/manifest.json")).read_bytes()
    res = runner.invoke(app, ["demo", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "shard_size: 100 -> 256" in res.output, res.output
    assert "--overwrite" not in res.output and "--cache-dir" in res.output
    assert next((tmp_path / "cache").rglob("train/manifest.json")).read_bytes() == manifest


@pytest.mark.parametrize("command", ["verify", "ls"])
@pytest.mark.parametrize("kind", ["file", "missing", "empty"])
def test_cache_verify_or_ls_of_nothing_is_an_error(tmp_path, kind, command):
    target = tmp_path / "c"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    res = runner.invoke(app, ["cache", command, "--cache-dir", str(target)])
    empty_listing = command == "ls" and kind == "empty"  # `ls` of an empty folder lists nothing; nothing else is ok
    assert res.exit_code == (0 if empty_listing else 2), res.output
    assert "all shards match" not in res.output and str(target) in res.output and "Traceback" not in res.output


def test_two_class_folders_of_one_name_are_refused(tmp_path):
    from conftest import make_image

    rng = np.random.default_rng(0)
    for c in ("a_b", "a b", "c"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            make_image(rng, i).save(tmp_path / "imgs" / c / f"{i}.png")
    res = runner.invoke(app, ["extract", "-d", "imagefolder", "--root", str(tmp_path / "imgs"), "--cache-dir", "c"])
    assert res.exit_code == 2
    assert "'a b'" in res.output and "'a_b'" in res.output and "rename one" in res.output


# --------------------------------------------------------------------------- output

GRID = """\
name: two
datasets: [synth]
models:
  - {model: vlmcache-tiny, pretrained: none}
seeds: [0]
defaults: {epochs: 2, lr: 0.01, batch_size: 64}
methods:
  - {name: linear, head: linear, loss: [ce, balanced_softmax]}
"""


@pytest.fixture
def grid(tmp_path):
    _user_cache(tmp_path / "cache", "synth").rename(tmp_path / "cache" / "synth" / "vlmcache-tiny__random__00000000")
    path = tmp_path / "two.yaml"
    path.write_text(GRID + f"cache_dir: {tmp_path / 'cache'}\nruns_dir: {tmp_path / 'runs'}\n")
    return path


def test_train_head_off_a_terminal_says_one_line_every_few_epochs(tmp_path):
    from vlmcache.cli.common import epoch_every

    assert [epoch_every(n) for n in (10, 30, 100, 2000, 8192)] == [1, 2, 10, 200, 1000]
    _user_cache(tmp_path, "imgs")
    args = ["train-head", "--cache-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--epochs", "40"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    epochs = [line.split()[1] for line in res.output.splitlines() if line.startswith("epoch ")]
    assert epochs == ["1/40", "5/40", "10/40", "15/40", "20/40", "25/40", "30/40", "35/40", "40/40"]
    assert " lr " in next(line for line in res.output.splitlines() if line.startswith("epoch "))


def test_train_head_on_a_terminal_draws_a_bar_instead_of_lines(tmp_path, monkeypatch):
    from vlmcache.cli import common

    monkeypatch.setattr(common, "on_terminal", lambda: True)
    _user_cache(tmp_path, "imgs")
    args = ["train-head", "--cache-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--epochs", "40"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert not any(line.startswith("epoch ") for line in res.output.splitlines())
    assert "40/40" in res.output and "loss " in res.output  # the bar's last state, with the last loss


def test_ablate_off_a_terminal_says_each_finished_run(grid):
    res = runner.invoke(app, ["ablate", str(grid)])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("run ")]
    assert [line.split(" done: ")[0] for line in lines] == ["run 1/2", "run 2/2"]
    assert "linear[loss=ce]" in lines[0]
    res = runner.invoke(app, ["ablate", str(grid)])  # each line says what became of its run
    assert [line.split(":")[0] for line in res.output.splitlines() if line.startswith("run ")] == [
        "run 1/2 resumed",
        "run 2/2 resumed",
    ]


def test_ablate_says_a_failed_run_failed(grid, monkeypatch):
    from vlmcache import ablate

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ablate, "train_head", crash)  # a crash inside a run: the grid goes on, the run is failed
    res = runner.invoke(app, ["ablate", str(grid), "--no-group"])
    said = [line.split(":")[0] for line in res.output.splitlines() if line.startswith("run ")]
    assert said == ["run failed", "run 1/2 failed", "run failed", "run 2/2 failed"], res.output
    assert not [line for line in said if line.endswith(" done")], res.output


def test_extract_rate_is_the_summarys_rate():
    """The bar's images/s is images done in this run over the time since the split started, as the summary's."""
    from rich.progress import Progress

    from vlmcache.cli.common import _RateColumn

    now = [0.0]
    bar = Progress(get_time=lambda: now[0])
    task = bar.add_task("extract", total=100, completed=20, resumed=20)  # 20 rows resumed from an earlier run
    now[0] = 5.0
    bar.advance(task, 10)  # a slow start (the loader's workers), then fast batches
    now[0] = 10.0
    bar.advance(task, 40)
    # (70 - 20) / 10 s; rich's own rate, over its recent samples, says 40 / 5 s = 8.0
    assert _RateColumn().render(bar.tasks[0]).plain == "5.0 img/s"
    bar.advance(task, 30)  # the last batch at 10 s: done; the bar is redrawn while the next split extracts
    now[0] = 30.0
    assert _RateColumn().render(bar.tasks[0]).plain == "8.0 img/s"  # (100 - 20) / 10 s, not / 30 s


def _interrupted(args: list[str], fault: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "VLMCACHE_FAULT": fault, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vlmcache", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_ctrl_c_on_extract_says_what_is_kept_and_exits_130(tmp_path):
    args = ["extract", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "random", "--device", "cpu", "--workers", "0"]
    proc = _interrupted([*args, "--shard-size", "64", "--cache-dir", "c"], "shard_published:1:INT", tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "kept in c/digits_lt" in last and "resumes" in last


def test_ctrl_c_on_ablate_says_what_is_kept_and_exits_130(grid, tmp_path):
    proc = _interrupted(["ablate", str(grid), "--no-group"], "run_recorded:1:INT", tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "interrupted: the 1 of 2 runs" in last and "skips them" in last


# --------------------------------------------------------------------------- threads


def test_threads_sets_torchs_cpu_threads(tmp_path, monkeypatch):
    import torch

    from vlmcache.errors import VlmcacheError

    seen = []

    def find_cache(*args, **kw):  # record the threads while the command runs, then stop it there
        seen.append(torch.get_num_threads())
        raise VlmcacheError("stopped here")

    monkeypatch.setattr("vlmcache.train.find_cache", find_cache)
    monkeypatch.setattr("vlmcache.knn.find_cache", find_cache)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for given in (["--threads", "3"], []):
            runner.invoke(app, ["train-head", *given, "--cache-dir", str(tmp_path)])
            assert torch.get_num_threads() == 2  # given back when the command ends (in-process)
        runner.invoke(app, ["knn", "--threads", "0", "--cache-dir", str(tmp_path)])
        runner.invoke(app, ["knn", "--cache-dir", str(tmp_path)])
        # while the cache is looked for: 3 as asked, train-head's default 1, and knn's 0 (torch's own, here 2)
        assert seen == [3, 1, 2, 2]
    finally:
        torch.set_num_threads(before)


def test_cache_info_of_a_cache_without_splits_says_so(tmp_path):
    model_dir = _user_cache(tmp_path, "mine")
    for manifest in model_dir.glob("*/manifest.json"):
        manifest.unlink()
    res = runner.invoke(app, ["cache", "info", str(model_dir), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "no split of this cache has a manifest.json (folders: test, train)" in res.output


@pytest.mark.parametrize("rank", ["0", "1"])
def test_ctrl_c_under_torchrun_is_said_once_by_rank_0(tmp_path, monkeypatch, rank):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlmcache.extract.run_extract", interrupted)
    monkeypatch.setenv("RANK", rank)
    res = runner.invoke(app, ["extract", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none", "--cache-dir",
                              str(tmp_path)])  # fmt: skip
    assert res.exit_code == 130 and ("interrupted:" in res.output) == (rank == "0"), res.output
