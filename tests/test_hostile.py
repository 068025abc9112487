"""The hostile harness: every command that writes, each of its output flags pointed at every artifact of an existing
cache and run tree, must refuse with exit 2 and one line, and leave the whole tree (and what its links point to)
byte-identical. A new writer is covered by adding its flag to WRITERS; a new artifact by adding it to TARGETS.

The tree is built once per module (a synthetic cache, one trained run, one export), so each case costs one
in-process CLI call and two hashes of a small tree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import long_tailed_features, write_feature_cache
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vlmcache import guard, runlock
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError

runner = CliRunner()
DATASET = "hostile"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/cache (a synthetic cache: train and test), root/runs/<run> (one finished train-head run with logs and
    predictions), root/export (an export vlmcache wrote), a user's file and folder, and links to outside/."""
    from vlmcache.train import train_head
    from vlmcache.train_config import TrainConfig

    root = tmp_path_factory.mktemp("hostile")
    outside = tmp_path_factory.mktemp("outside")
    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [40, 12, 5], dim=8)
    xt, yt = long_tailed_features(rng, [6, 6, 6], dim=8)
    model_dir = write_feature_cache(root / "cache", DATASET, {"train": (x, y, None), "test": (xt, yt, None)}, 3, 32)
    cfg = TrainConfig(
        dataset=DATASET, cache_dir=str(root / "cache"), runs_dir=str(root / "runs"), epochs=1, device="cpu",
        save_predictions=True, log="csv",
    )  # fmt: skip
    run = Path(train_head(cfg, log=lambda *a: None)["run"])
    res = runner.invoke(app, ["export", str(model_dir), "--out", str(root / "export"), "--cache-dir", str(root)])
    assert res.exit_code == 0, res.output
    (root / "notes.txt").write_text("someone's notes")
    (root / "notes.md").write_text("# my notes\n")
    (root / "userdir").mkdir()
    (root / "userdir" / "data.bin").write_bytes(b"\x00\x01")
    (outside / "secret.parquet").write_bytes(b"not yours")
    (outside / "secret.md").write_text("# vlmcache benchmarks\nnot yours either")
    (root / "link.parquet").symlink_to(outside / "secret.parquet")
    (root / "link.md").symlink_to(outside / "secret.md")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "runlink").symlink_to(run, target_is_directory=True)  # a link into the tree's own run
    return {"root": root, "outside": outside, "cache": root / "cache", "model": model_dir, "run": run}


def snapshot(*folders: Path) -> dict:
    """Every entry under `folders` (links not followed): its kind and, for a file, its sha256; for a link, its
    target. Two equal snapshots: nothing was created, removed, replaced or changed."""
    out = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = ("link", os.readlink(p))
                elif p.is_dir():
                    out[str(p)] = ("dir",)
                else:
                    out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def shard(t) -> Path:
    return next((t["model"] / "train").glob("shard-*.h5"))


# Every artifact a hostile user may point an output flag at: name -> its path in the tree.
TARGETS = {
    "a shard": shard,
    "a split's manifest.json": lambda t: t["model"] / "train" / "manifest.json",
    "text.h5": lambda t: t["model"] / "text.h5",
    "a run's head.pt": lambda t: t["run"] / "head.pt",
    "a run's metrics.json": lambda t: t["run"] / "metrics.json",
    "a run's predictions": lambda t: t["run"] / "predictions.parquet",
    "a run folder": lambda t: t["run"],
    "a run's logs folder": lambda t: t["run"] / "logs",
    "a split folder": lambda t: t["model"] / "train",
    "a cache folder": lambda t: t["model"],
    "a cache's dataset folder": lambda t: t["cache"] / DATASET,
    "a new file in a run": lambda t: t["run"] / "new.parquet",
    "a new folder in a run": lambda t: t["run"] / "new",
    "a new file in a split": lambda t: t["model"] / "train" / "new.parquet",
    "a new folder in a cache": lambda t: t["model"] / "new",
    "a user's file": lambda t: t["root"] / "notes.txt",
    "a user's Markdown file": lambda t: t["root"] / "notes.md",
    "a file under a file": lambda t: t["root"] / "notes.txt" / "x.parquet",
    "a link out of the tree": lambda t: t["root"] / "link.parquet",
    "a Markdown link out of the tree": lambda t: t["root"] / "link.md",
    "a folder link out of the tree": lambda t: t["root"] / "dirlink",
    "a new file in a run through a link": lambda t: t["root"] / "runlink" / "x.parquet",
    "a new folder in a run through a link": lambda t: t["root"] / "runlink" / "new",
}
TARGETS["an export folder"] = lambda t: t["root"] / "export"
TARGETS["an export's file"] = lambda t: t["root"] / "export" / "train.parquet"
# (writer, target) pairs that are the writer's own kind of output: --overwrite replaces them (tested on their own)
OWN = {("train-head --out --overwrite", "a run folder"), ("export --out --overwrite", "an export folder")}
# a container flag (a folder of many outputs) follows a link to a folder: a cache or runs folder on a bigger disk
OWN |= {(w, "a folder link out of the tree") for w in ("train-head --runs-dir", "import --cache-dir",
        "extract --cache-dir", "finetune --runs-dir", "ablate --runs-dir")}  # fmt: skip


def cache_args(t) -> list[str]:
    return ["--cache-dir", str(t["cache"]), "-d", DATASET, "--device", "cpu"]


def train_args(t) -> list[str]:
    return ["train-head", *cache_args(t), "--epochs", "1"]


def split_args(t, name: str = "train") -> list[str]:
    return ["extract", "-d", "split", "--split-file", f"{name}={t['root'] / 'notes.txt'}", "-m", "vlmcache-tiny",
            "-p", "none", "--cache-dir", str(t["cache"])]  # fmt: skip


# Every command that writes, one entry per output flag: name -> (argv with the target in it, is a container flag).
WRITERS = {
    "train-head --out": lambda t, p: [*train_args(t), "--out", p],
    "train-head --out --overwrite": lambda t, p: [*train_args(t), "--overwrite", "--out", p],
    "train-head --runs-dir": lambda t, p: [*train_args(t), "--runs-dir", p],
    "train-head --log csv --out": lambda t, p: [*train_args(t), "--log", "csv", "--out", p],
    "zero-shot --save-predictions": lambda t, p: ["zero-shot", *cache_args(t), "--templates", "photo",
                                                  "--save-predictions", p],
    "zero-shot --save-predictions --overwrite": lambda t, p: ["zero-shot", *cache_args(t), "--templates", "photo",
                                                              "--overwrite", "--save-predictions", p],
    "knn --save-predictions": lambda t, p: ["knn", *cache_args(t), "--k", "3", "--save-predictions", p],
    "knn --save-predictions --overwrite": lambda t, p: ["knn", *cache_args(t), "--k", "3", "--overwrite",
                                                        "--save-predictions", p],
    "export --out": lambda t, p: ["export", str(t["model"]), "--out", p],
    "export --out --overwrite": lambda t, p: ["export", str(t["model"]), "--overwrite", "--out", p],
    "import --cache-dir": lambda t, p: ["import", str(t["root"] / "export" / "train.parquet"), "--from", "parquet",
                                        "-d", "imported", "--cache-dir", p],
    "extract --cache-dir": lambda t, p: ["extract", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none",
                                         "--device", "cpu", "--workers", "0", "--cache-dir", p],
    "finetune --out": lambda t, p: ["finetune", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none", "--device",
                                    "cpu", "--epochs", "1", "--out", p],
    "finetune --runs-dir": lambda t, p: ["finetune", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none",
                                         "--device", "cpu", "--epochs", "1", "--runs-dir", p],
    "ablate --runs-dir": lambda t, p: ["ablate", "quick", "--runs-dir", p],
    "report": lambda t, p: ["report", p],
    "bench --markdown": lambda t, p: ["bench", "--scale", "smoke", "--only", "cache_size", "--markdown", p],
}  # fmt: skip


def refuse(t, argv: list[str], target: Path) -> None:
    """The harness's one assertion: exit 2, one line that names the target, no traceback, nothing changed."""
    before = snapshot(t["root"], t["outside"])
    res = runner.invoke(app, argv)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, f"{argv}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    assert str(target) in res.output or target.name in res.output, res.output
    assert snapshot(t["root"], t["outside"]) == before, f"{argv} changed the tree"
    assert not re.search(r"\ba (export|a|an|other)\b", res.output), res.output  # "an export folder"
    unknown = set(re.findall(r"--[a-z][a-z-]*", res.output)) - flags_of(argv[0])
    assert not unknown, f"{argv}: the error names flags that {argv[0]} does not have: {unknown}\n{res.output}"


@functools.cache
def flags_of(command: str) -> set[str]:
    """The flags `vlmcache COMMAND --help` lists (an error may point the user only to these)."""
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    return set(re.findall(r"--[a-z][a-z-]*", res.output))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_refuses_every_artifact(tree, writer):
    for name, where in TARGETS.items():
        target = where(tree)
        if (writer, name) in OWN:  # the writer's own kind of output: replaced with --overwrite, tested below
            continue
        refuse(tree, WRITERS[writer](tree, str(target)), target)


# Every option that names a folder: name -> argv with the name in it. Each refuses what the name rule refuses.
NAMED = {
    "import --dataset": lambda t, n: ["import", str(t["root"] / "export" / "train.parquet"), "--from", "parquet",
                                      "-d", n, "--cache-dir", str(t["cache"])],
    "import --split": lambda t, n: ["import", str(t["root"] / "export" / "train.parquet"), "--from", "parquet",
                                    "-d", "imported", "--split", n, "--cache-dir", str(t["cache"])],
    "import --model": lambda t, n: ["import", str(t["root"] / "export" / "train.parquet"), "--from", "parquet",
                                    "-d", "imported", "--model", n, "--cache-dir", str(t["cache"])],
    "train-head --dataset": lambda t, n: ["train-head", "--cache-dir", str(t["cache"]), "-d", n, "--device", "cpu",
                                          "--runs-dir", str(t["root"] / "runs")],
    "train-head --cache-key": lambda t, n: ["train-head", *cache_args(t), "--cache-key", n,
                                            "--runs-dir", str(t["root"] / "runs")],
    "train-head --split": lambda t, n: [*train_args(t), "--split", n, "--runs-dir", str(t["root"] / "runs")],
    "zero-shot --split": lambda t, n: ["zero-shot", *cache_args(t), "--templates", "photo", "--split", n],
    "knn --split": lambda t, n: ["knn", *cache_args(t), "--k", "3", "--split", n],
    "extract --name": lambda t, n: [*split_args(t), "--name", n],
    "extract --split-file NAME": lambda t, n: split_args(t, n),
    "extract --shards NAME": lambda t, n: ["extract", "-d", "wds", "--root", str(t["root"]), "--shards",
                                           f"{n}=notes.txt", "-m", "vlmcache-tiny", "-p", "none",
                                           "--cache-dir", str(t["cache"])],
}  # fmt: skip
BAD_NAMES = ["..", ".", "a/b", "../../escape", ".hidden", "tab\there", "nul\x01", "back\\slash"]


@pytest.mark.parametrize("option", list(NAMED))
def test_every_name_option_refuses_what_the_name_rule_refuses(tree, option):
    for name in BAD_NAMES:
        before = snapshot(tree["root"], tree["outside"])
        res = runner.invoke(app, NAMED[option](tree, name))
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1, f"{option} {name!r}: {res.exit_code}\n{res.output}"
        assert "Traceback" not in res.output
        assert option.split()[1] in res.output, f"{option} {name!r}: the error does not name the option\n{res.output}"
        assert snapshot(tree["root"], tree["outside"]) == before


@pytest.mark.parametrize("name", [*BAD_NAMES, "", "x" * 256])
def test_the_name_rule_refuses_names_that_are_not_one_folder(name):
    with pytest.raises(VlmcacheError, match="--split"):
        guard.check_name(name, "--split")


@pytest.mark.parametrize("name", ["train", "places_lt", "ViT-B-16__openai__3f9a2c1e", "mes données", "a.b"])
def test_the_name_rule_keeps_plain_names(name):
    assert guard.check_name(name, "--split") == name


def test_eval_save_predictions_refuses_a_link_in_the_run(tree, tmp_path):
    """eval writes predictions.parquet into the run it evaluates; a link there would write elsewhere."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tree["run"], run)
    (run / "predictions.parquet").unlink()
    (run / "predictions.parquet").symlink_to(tree["outside"] / "secret.parquet")
    before = snapshot(run, tree["outside"])
    res = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--save-predictions"])
    assert res.exit_code == 2 and "symbolic link" in res.output, res.output
    assert snapshot(run, tree["outside"]) == before


# --------------------------------------------------------------------------- what --overwrite may replace


@pytest.fixture
def small_cache(tmp_path):
    rng = np.random.default_rng(1)
    x, y = long_tailed_features(rng, [20, 8, 4], dim=8)
    write_feature_cache(tmp_path / "cache", DATASET, {"train": (x, y, None), "test": (x[::2], y[::2], None)}, 3, 8)
    return tmp_path


def test_export_replaces_an_older_export_whole(small_cache):
    """An npy export into an older one keeps no stale img_emb_N.npy (import would read it as data)."""
    out, model_dir = small_cache / "exported", small_cache / "cache" / DATASET / "synthetic__random__00000000"
    args = ["export", str(model_dir), "--format", "npy-raw", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    stale = out / "train" / "img_emb" / "img_emb_99.npy"
    stale.write_bytes((out / "train" / "img_emb" / "img_emb_0.npy").read_bytes())
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.output and stale.exists()  # refused, kept as it was
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not stale.exists() and (out / guard.EXPORT_MARKER).is_file()
    assert len(list((out / "train" / "img_emb").iterdir())) == 4  # 32 rows in shards of 8
    assert [p.name for p in small_cache.iterdir()] == ["cache", "exported"]  # no staging folder left


def test_overwrite_replaces_only_its_own_kind(small_cache):
    user = small_cache / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    common = ["--cache-dir", str(small_cache / "cache"), "--device", "cpu", "--overwrite"]
    for argv in (
        ["train-head", *common, "--epochs", "1", "--out", str(user)],
        [
            "export",
            str(small_cache / "cache" / DATASET / "synthetic__random__00000000"),
            "--out",
            str(user),
            "--overwrite",
        ],
    ):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and "not a" in res.output and str(user) in res.output, res.output
        assert (user / "thesis.tex").read_text() == "years of work"
    plain = small_cache / "plain.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), plain)
    preds = small_cache / "preds.parquet"
    zs = ["zero-shot", *common[:4], "--templates", "photo", "--save-predictions"]
    assert runner.invoke(app, [*zs, str(preds)]).exit_code == 0
    res = runner.invoke(app, [*zs, str(preds)])
    assert res.exit_code == 2 and "--overwrite" in res.output  # exists: refused without --overwrite
    assert runner.invoke(app, [*zs, str(preds), "--overwrite"]).exit_code == 0  # its own kind: replaced
    res = runner.invoke(app, [*zs, str(plain), "--overwrite"])
    assert res.exit_code == 2 and pq.read_table(plain).column_names == ["a"]  # someone else's parquet: kept


def test_live_logs_stay_inside_the_run(small_cache):
    """--log writes inside the run's own staging folder: a `.logs/<run>` of someone else's is never touched."""
    runs_dir = small_cache / "runs"
    argv = ["train-head", "--cache-dir", str(small_cache / "cache"), "--device", "cpu", "--epochs", "2", "--json"]
    res = runner.invoke(app, [*argv, "--runs-dir", str(runs_dir), "--log", "csv"])
    assert res.exit_code == 0, res.output
    run = Path(res.stdout.splitlines()[-1].split('"run": "')[1].split('"')[0])
    theirs = runs_dir / ".logs" / run.name / "events.out"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("someone's curves")
    res = runner.invoke(app, [*argv, "--runs-dir", str(runs_dir), "--log", "csv", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert theirs.read_text() == "someone's curves"
    assert (run / "logs" / "epochs.csv").is_file()
    left = sorted(p.name for p in runs_dir.iterdir() if p.name != runlock.LOCK_FILE)  # the runs folder's lock stays
    assert left == [".logs", run.name]  # no staging folder left


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=40))
def test_a_name_the_rule_keeps_is_one_visible_folder_in_its_parent(name):
    """Whatever the text, a name check_name keeps is exactly one path part, a direct, visible child of its parent."""
    try:
        guard.check_name(name, "--name")
    except VlmcacheError:
        return
    root = Path("/cache")
    child = root / name
    assert child.parent == root and len(Path(name).parts) == 1 and child.name == name
    assert os.path.normpath(child) == str(child) and not name.startswith(".")


@pytest.mark.parametrize("argv,name", [(["report"], "report.md"), (["ablate", "quick", "--runs-dir"], "results.csv")])
def test_a_link_among_a_runs_folders_own_files_is_refused(tree, tmp_path, argv, name):
    """report and ablate rewrite fixed names in the runs folder; one that is a link would write outside it."""
    import shutil

    runs_dir = tmp_path / "runs"
    shutil.copytree(tree["run"], runs_dir / tree["run"].name)
    (runs_dir / name).symlink_to(tree["outside"] / "secret.md")
    before = snapshot(runs_dir, tree["outside"])
    res = runner.invoke(app, [*argv, str(runs_dir)])
    assert res.exit_code == 2 and "symbolic link" in res.output and name in res.output, res.output
    assert snapshot(runs_dir, tree["outside"]) == before


def test_a_container_may_be_a_link_to_a_folder(small_cache, tmp_path_factory):
    """--cache-dir and --runs-dir follow a link to a folder (a bigger disk); the run lands in the link's target."""
    disk = tmp_path_factory.mktemp("disk")
    (small_cache / "runs").symlink_to(disk, target_is_directory=True)
    argv = ["train-head", "--cache-dir", str(small_cache / "cache"), "--device", "cpu", "--epochs", "1"]
    res = runner.invoke(app, [*argv, "--runs-dir", str(small_cache / "runs")])
    assert res.exit_code == 0, res.output
    made = [p.name for p in disk.iterdir() if p.name != runlock.LOCK_FILE]
    assert len(made) == 1 and made[0].startswith(DATASET)


def test_a_failed_run_leaves_nothing_behind(small_cache, monkeypatch):
    """A run that fails mid-training removes its own staging folder (its live logs with it) and nothing else."""
    from vlmcache import train
    from vlmcache.train_config import TrainConfig

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(train, "fit", broken)
    runs_dir = small_cache / "runs"
    runs_dir.mkdir()
    (runs_dir / "keep.txt").write_text("x")
    cfg = TrainConfig(
        dataset=DATASET, cache_dir=str(small_cache / "cache"), runs_dir=str(runs_dir), epochs=1, device="cpu", log="csv"
    )
    with pytest.raises(RuntimeError, match="went away"):
        train.train_head(cfg, log=lambda *a: None)
    assert [p.name for p in runs_dir.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- the folders beneath --cache-dir


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, split_dataset):
    """One real extraction of split_dataset's train split (the tiny model): its argv without --cache-dir, and the
    `<dataset>/<key>` path beneath a cache folder, so that each test builds the same folders by hand elsewhere."""
    root, files = split_dataset
    argv = ["extract", "-d", "split", "--name", "split", "--root", str(root), "--split-file", f"train={files['train']}",
            "-m", "vlmcache-tiny", "-p", "none", "--device", "cpu", "--workers", "0"]  # fmt: skip
    cache_dir = tmp_path_factory.mktemp("extracted")
    res = runner.invoke(app, [*argv, "--cache-dir", str(cache_dir)])
    assert res.exit_code == 0, res.output
    (model_dir,) = (cache_dir / "split").iterdir()
    return {"argv": argv, "cache": cache_dir, "model": model_dir, "key": Path("split") / model_dir.name}


def refuse_extract(ex, cache_dir: Path, *watched: Path, says: str, extra: tuple = ()) -> None:
    """extract into `cache_dir` exits 2 with one line saying `says`, and leaves `watched` folders as they were."""
    before = snapshot(*watched)
    res = runner.invoke(app, [*ex["argv"], "--cache-dir", str(cache_dir), *extra])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], res.output
    assert snapshot(*watched) == before


@pytest.mark.parametrize("linked", ["dataset", "key", "split", "text.h5"])
def test_extract_refuses_a_link_beneath_the_cache_dir(extracted, tmp_path, linked):
    """A link in place of the dataset, cache-key or split folder (or text.h5) would land the output elsewhere:
    refused, with and without --overwrite, and what it points to is left as it was."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    cache_dir = tmp_path / "cache"
    link = {"dataset": cache_dir / "split", "key": cache_dir / extracted["key"]}.get(
        linked, cache_dir / extracted["key"] / ("train" if linked == "split" else "text.h5")
    )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / "keep.txt" if linked == "text.h5" else outside, target_is_directory=linked != "text.h5")
    for extra in ((), ("--overwrite",)):
        refuse_extract(extracted, cache_dir, outside, tmp_path, says="symbolic link", extra=extra)
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("name", ["data.bin", "shard-00000.h5"])
def test_extract_refuses_a_split_folder_it_did_not_write(extracted, tmp_path, name):
    """Files named like shards without a manifest are someone else's too: extract writes the manifest first."""
    split_dir = tmp_path / "cache" / extracted["key"] / "train"
    split_dir.mkdir(parents=True)
    (split_dir / name).write_bytes(b"precious")
    for extra in ((), ("--overwrite",)):
        refuse_extract(extracted, tmp_path / "cache", tmp_path, says="is not a cache split", extra=extra)
    assert [p.name for p in split_dir.iterdir()] == [name]
    (split_dir / name).unlink()
    (split_dir / f"manifest.json{guard.TMP_MARK}999999999.x").write_text("{")  # a killed first manifest write
    res = runner.invoke(app, [*extracted["argv"], "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output  # its temporary is swept and the split extracted


def test_a_damaged_manifest_is_refused_and_replaced_with_overwrite(extracted, tmp_path):
    """The error's advice (--overwrite) works: the split's own files go, the manifest is never read."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(extracted["cache"], cache_dir)
    manifest = cache_dir / extracted["key"] / "train" / "manifest.json"
    manifest.write_text("{bad")
    refuse_extract(extracted, cache_dir, cache_dir, says="not valid JSON")
    res = runner.invoke(app, [*extracted["argv"], "--cache-dir", str(cache_dir), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads(manifest.read_text())["complete"] is True


def test_extract_writes_its_manifest_before_its_first_shard(extracted, tmp_path, monkeypatch):
    from vlmcache import cache

    seen = []
    real = cache.shard_image

    def spy(final, *args, **kwargs):
        seen.append((final.name, (final.parent / cache.MANIFEST).is_file()))
        return real(final, *args, **kwargs)

    monkeypatch.setattr(cache, "shard_image", spy)  # what extraction builds each shard with
    res = runner.invoke(app, [*extracted["argv"], "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert seen and all(has_manifest for _, has_manifest in seen), seen


def test_extract_overwrite_never_removes_someone_elses_file_in_a_split(extracted):
    split_dir = extracted["model"] / "train"
    notes = split_dir / "notes.txt"
    notes.write_text("mine")
    try:
        refuse_extract(extracted, extracted["cache"], extracted["cache"], says="notes.txt", extra=("--overwrite",))
    finally:
        notes.unlink()
    files = sorted(p.name for p in split_dir.iterdir())
    assert files[0] == "manifest.json" and all(f.startswith("shard-") for f in files[1:])


def test_extract_keeps_an_unreadable_text_file_without_overwrite(extracted, tmp_path):
    model_dir = tmp_path / "cache" / extracted["key"]
    model_dir.mkdir(parents=True)
    (model_dir / "text.h5").write_text("precious")
    refuse_extract(extracted, tmp_path / "cache", tmp_path, says="--overwrite")
    assert (model_dir / "text.h5").read_text() == "precious" and sorted(os.listdir(model_dir)) == ["text.h5"]
    res = runner.invoke(app, [*extracted["argv"], "--cache-dir", str(tmp_path / "cache"), "--overwrite"])
    assert res.exit_code == 0, res.output  # a damaged text.h5 is replaced with --overwrite
    from vlmcache import text_cache

    assert (
        text_cache.read_text(model_dir / "text.h5").classnames
        == text_cache.read_text(extracted["model"] / "text.h5").classnames
    )


# --------------------------------------------------------------------------- the guard's edges

# The writers whose output is one file or folder vlmcache creates under the name given, and that name's extension.
NAMED_OUTPUTS = {
    "train-head --out": "",
    "zero-shot --save-predictions": ".parquet",
    "knn --save-predictions --overwrite": ".parquet",
    "export --out --overwrite": "",
    "finetune --out": "",
    "bench --markdown": ".md",
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_refuses_a_fifo_without_opening_it(tree, tmp_path, writer):
    """A FIFO where an output goes: refused from os.stat, before any marker is read (reading it would block). A
    writer thread stands by so that a command that does open it gets end-of-file instead of hanging the suite."""
    import threading

    fifo = tmp_path / f"f{NAMED_OUTPUTS.get(writer) or '.parquet'}"
    os.mkfifo(fifo)
    writer_end = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)), daemon=True)
    writer_end.start()
    res = runner.invoke(app, WRITERS[writer](tree, str(fifo)))
    os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer thread go when the command never read
    writer_end.join(5)
    assert "FIFO" in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and str(fifo) in res.output, f"{res.output}\n{res.exception!r}"
    assert fifo.exists() and not fifo.is_file()


@pytest.mark.parametrize("writer", list(NAMED_OUTPUTS))
@pytest.mark.parametrize("name", [".hidden", "a\x01b", "foo.tmp-1.x"])
def test_an_output_name_follows_the_name_rule(tree, tmp_path, writer, name):
    """The last part of --out, --save-predictions and --markdown becomes a folder or file: the name rule holds
    there too (no hidden outputs, no control characters, no name a sweep of temporary files would remove)."""
    target = tmp_path / f"{name}{NAMED_OUTPUTS[writer]}"
    res = runner.invoke(app, WRITERS[writer](tree, str(target)))
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, f"{res.output}\n{res.exception!r}"
    assert "the name" in res.output and "Traceback" not in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_the_name_rule_refuses_the_temporary_mark():
    with pytest.raises(VlmcacheError, match=r"\.tmp-"):
        guard.check_name("run.tmp-12", "--out")


@pytest.mark.parametrize(
    "argv",
    [
        ["--threads", "100000"],  # torch crashed (exit 139)
        ["--protocol", "seed", "--iters", str(2**70), "--select-on", "none"],  # a TypeError deep in the sampler
        ["--epochs", str(2**31)],
        ["--batch-size", str(2**40)],
        ["--warmup-iters", str(2**63)],
    ],
)
def test_out_of_range_counts_are_one_error_line(tree, argv):
    res = runner.invoke(app, [*train_args(tree), *argv, "--runs-dir", str(tree["root"] / "runs")])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "between" in res.output, f"{res.output}\n{res.exception!r}"
    assert any(a in res.output for a in argv if a.isdigit()), res.output


@pytest.mark.parametrize("option", ["--workers", "--views", "--tail-blocks", "--batch-size", "--shard-size"])
def test_extract_counts_have_an_upper_bound(tmp_path, option):
    from vlmcache.extract_config import ExtractConfig

    cfg = ExtractConfig(dataset="digits_lt", model="vlmcache-tiny", cache_dir=str(tmp_path))
    setattr(cfg, option[2:].replace("-", "_"), 2**40)
    with pytest.raises(VlmcacheError, match=f"{option} must be between"):
        cfg.check()


def test_demo_checks_its_runs_folder_before_extracting(tree, tmp_path):
    """A --runs-dir the guard refuses (here: a run folder) stops demo before its cache is written."""
    res = runner.invoke(app, ["demo", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tree["run"])])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "--runs-dir" in res.output, res.output
    assert not (tmp_path / "cache").exists()


def test_control_characters_in_an_error_are_escaped(tree):
    """A name echoed in an error line cannot colour or move the terminal: escape codes print as \\x1b."""
    res = runner.invoke(app, ["cache", "info", "digits_lt/\x1b[31m", "--cache-dir", str(tree["cache"])])
    assert res.exit_code == 2, res.output
    assert "\x1b" not in res.output and "\\x1b" in res.output, repr(res.output)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run_and_nothing_else(small_cache):
    """A SIGKILLed train-head leaves `<run>.tmp-<pid>.<host>.<random>`; the next run of that name removes it. Kept:
    a live process's, another host's, another output's, this process's own, and anything not of the exact shape."""
    runs, host, dead = small_cache / "runs", guard._host(), _dead_pid()
    runs.mkdir()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    names = {
        f"x.tmp-{dead}.{host}.abcd_123": False,  # a killed run's: removed
        f"x.tmp-{os.getppid()}.{host}.abcd_123": True,  # a live process's
        f"x.tmp-{os.getpid()}.{host}.abcd_123": True,  # this process's own
        f"x.tmp-{dead}.{other_host}.abcd_123": True,  # another machine's pid means nothing here
        f"y.tmp-{dead}.{host}.abcd_123": True,  # another output's
        f"x.tmp-{dead}.{host}.notes": True,  # not the shape staging_folder makes
        f"x.tmp-{dead}.{host}.abcd_1234": True,
    }
    for name in names:
        (runs / name).mkdir()
        (runs / name / "metrics.json").write_text("{}")
    (runs / f"x.tmp-{dead}.{host}.file_123").write_text("a file of the shape is not a staging folder")
    res = runner.invoke(app, ["train-head", "--cache-dir", str(small_cache / "cache"), "-d", DATASET, "--device", "cpu",
                              "--epochs", "1", "--out", str(runs / "x")])  # fmt: skip
    assert res.exit_code == 0, res.output
    left = {p.name for p in runs.iterdir()}
    assert left == {n for n, kept in names.items() if kept} | {"x", f"x.tmp-{dead}.{host}.file_123", ".vlmcache.lock"}
