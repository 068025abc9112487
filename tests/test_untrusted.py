"""Every file vlmcache reads back is untrusted: manifests, text.h5, run folders, results tables, split and class-name
files, pipelines. Each hostile or damaged case gives one clear error (exit 2 from the CLI) or the right result, and
nothing outside the folder the user pointed at is read as data, written or deleted."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import long_tailed_features, make_image, write_feature_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vlmcache import atomic, cache, runs, text_cache
from vlmcache.cli import app
from vlmcache.datasets import load_dataset
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, repair_split, run_extract
from vlmcache.heads import build_head
from vlmcache.pipeline import load_pipeline
from vlmcache.splits import read_classnames, read_split_file
from vlmcache.train import evaluate_run, load_run, train_head
from vlmcache.train_config import TrainConfig

runner = CliRunner()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    d = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [60, 30, 10])
    xt, yt = long_tailed_features(np.random.default_rng(0), [10, 10, 10])
    write_feature_cache(d, "digits_lt", {"train": (x, y, None), "test": (xt, yt, None)}, 3, shard_size=25)
    return d


def _copy_cache(features: Path, tmp_path: Path) -> Path:
    shutil.copytree(features, tmp_path / "cache")
    return tmp_path / "cache" / "digits_lt" / "synthetic__random__00000000"


def _cfg(cache_dir: Path, tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="digits_lt",
        model="synthetic",
        pretrained="random",
        cache_dir=str(cache_dir),
        runs_dir=str(tmp_path / "runs"),
        device="cpu",
        epochs=3,
        lr=1e-2,
        batch_size=32,
    )
    return TrainConfig(**{**base, **kw})


def _train_head_cli(cache_dir: Path, *extra: str):
    args = ["train-head", "-d", "digits_lt", "-m", "synthetic", "-p", "random", "--cache-dir", str(cache_dir)]
    return runner.invoke(app, [*args, *extra])


def _edit_manifest(split_dir: Path, edit) -> None:
    path = split_dir / cache.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("name", ["../test/shard-00000.h5", "/etc/passwd", "shard-00000.h5/../../x", "x.h5"])
def test_shard_entries_are_bare_names_for_readers_verify_and_repair(features, tmp_path, name):
    model_dir = _copy_cache(features, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    _edit_manifest(model_dir / "train", lambda m: m["shards"][0].update(file=name))
    before = _tree(tmp_path)
    with pytest.raises(VlmcacheError, match="manifest .* is not valid: shards.0.file"):
        cache.SplitCache(model_dir / "train")
    with pytest.raises(VlmcacheError, match="shards.0.file"):
        repair_split(model_dir / "train")
    result = runner.invoke(app, ["cache", "verify", str(model_dir), "--repair", "--cache-dir", str(tmp_path)])
    assert result.exit_code in (1, 2) and "shards.0.file" in result.output and "Traceback" not in result.output
    assert _tree(tmp_path) == before  # nothing deleted or rewritten anywhere


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
        (lambda m: m["shards"][1].update(rows=m["shards"][1]["rows"] - 1), "do not fill the range"),
        (lambda m: m["shards"][0].update(stop=m["shards"][0]["stop"] + 1), "rows plus"),
        (lambda m: m.update(n_rows=m["n_rows"] + 5), "n_shards"),
        (lambda m: m.update(shards={"a": 1}), "shards: Input should be a valid list"),
        (lambda m: m["shards"][0].update(bytes="100"), "bytes: Input should be a valid integer"),
        (lambda m: m["fingerprint"].update(num_classes=-1), "num_classes"),
        (lambda m: m.update(complete="yes"), "complete"),
        (lambda m: m["shards"].pop(), "marked complete"),
    ],
)
def test_a_manifest_that_disagrees_with_itself_is_refused(features, tmp_path, edit, message):
    model_dir = _copy_cache(features, tmp_path)
    _edit_manifest(model_dir / "train", edit)
    with pytest.raises(VlmcacheError, match=message):
        cache.SplitCache(model_dir / "train")
    problems = cache.verify_split(model_dir / "train")
    assert problems and message.split(":")[0] in problems[0]


def test_a_wrong_row_count_that_adds_up_is_caught_against_the_file(features, tmp_path):
    """rows + skipped still fill the range, so only the shard file itself can tell."""
    model_dir = _copy_cache(features, tmp_path)

    def edit(m):
        e = m["shards"][0]
        e["rows"] -= 1
        e["skipped"].append({"row": e["start"], "path": "x", "reason": "made up"})

    _edit_manifest(model_dir / "train", edit)
    problems = cache.verify_split(model_dir / "train")
    assert problems and "the manifest lists 24 rows" in problems[0]
    split = cache.SplitCache(model_dir / "train")
    with pytest.raises(VlmcacheError, match="does not match its manifest"):
        split.labels()


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "{", "null", '{"format": 1}', "[" * 100000])
def test_manifests_of_the_wrong_json_shape_are_one_line(features, tmp_path, content):
    model_dir = _copy_cache(features, tmp_path)
    (model_dir / "train" / cache.MANIFEST).write_text(content)
    with pytest.raises(VlmcacheError, match="manifest"):
        cache.SplitCache(model_dir / "train")
    result = _train_head_cli(tmp_path / "cache", "--epochs", "1", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "manifest" in result.output and "Traceback" not in result.output


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(
        [
            ("n_rows",),
            ("n_shards",),
            ("complete",),
            ("dims", "pooled"),
            ("fingerprint", "num_classes"),
            ("shards", 0, "file"),
            ("shards", 0, "rows"),
            ("shards", 0, "start"),
            ("shards", 1, "stop"),
            ("shards", 1, "index"),
            ("shards", 0, "skipped"),
            ("shards", 2, "sha256"),
            ("shards",),
            ("format",),
        ]
    ),
    value=st.one_of(
        st.integers(-3, 200),
        st.booleans(),
        st.none(),
        st.text(max_size=12),
        st.floats(allow_nan=True),
        st.lists(st.integers(0, 5), max_size=3),
        st.sampled_from(["../x.h5", "/tmp/x.h5", "shard-00000.h5"]),
    ),
)
def test_fuzzed_manifests_read_right_or_fail_clearly(features, tmp_path_factory, path, value):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    model_dir = _copy_cache(features, tmp_path)
    reference = cache.SplitCache(features / "digits_lt" / model_dir.name / "train")
    _edit_manifest(model_dir / "train", lambda m: _set(m, path, value))
    before = _tree(tmp_path)
    try:
        split = cache.SplitCache(model_dir / "train")
        pooled, labels = split.pooled(), split.labels()
    except VlmcacheError:
        pass
    else:  # a mutation that passed every check left the data as it was
        np.testing.assert_array_equal(pooled, reference.pooled())
        np.testing.assert_array_equal(labels, reference.labels())
    cache.verify_split(model_dir / "train")  # never raises, never writes
    assert _tree(tmp_path) == before


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


# --------------------------------------------------------------------------- repair where pointed


@pytest.fixture(scope="module")
def extracted(split_dataset, tmp_path_factory):
    root, files = split_dataset
    d = tmp_path_factory.mktemp("extracted")
    cfg = ExtractConfig(
        dataset="split",
        root=str(root),
        split_files={"train": str(files["train"])},
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
        shard_size=16,
        cache_dir=str(d / "cache"),
    )
    summary = run_extract(cfg, log=lambda *a: None)
    return Path(summary["cache"])


def test_repair_of_a_copied_cache_repairs_the_copy_not_the_original(extracted, tmp_path):
    copy = tmp_path / "elsewhere" / extracted.parent.name / extracted.name
    shutil.copytree(extracted, copy)
    original = _tree(extracted.parent.parent)
    (copy / "train" / "shard-00001.h5").write_bytes(b"damaged")
    result = runner.invoke(app, ["cache", "verify", str(copy), "--repair", "--cache-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    assert "repaired" in result.output
    assert cache.verify_split(copy / "train") == []
    np.testing.assert_array_equal(cache.SplitCache(copy / "train").rows(), cache.SplitCache(extracted / "train").rows())
    assert _tree(extracted.parent.parent) == original  # the original was never touched


def test_repair_with_moved_images_needs_root_and_deletes_nothing_until_found(extracted, split_dataset, tmp_path):
    root, _ = split_dataset
    copy = tmp_path / "c" / extracted.parent.name / extracted.name
    shutil.copytree(extracted, copy)
    manifest = json.loads((copy / "train" / cache.MANIFEST).read_text())
    manifest["extract_config"]["root"] = str(tmp_path / "gone")  # the images moved since extraction
    (copy / "train" / cache.MANIFEST).write_text(json.dumps(manifest))
    (copy / "train" / "shard-00000.h5").write_bytes(b"damaged")
    before = _tree(copy)
    with pytest.raises(VlmcacheError, match="--root"):
        repair_split(copy / "train")
    assert _tree(copy) == before
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert repair_split(copy / "train", root=str(moved), log=lambda *a: None) == ["shard-00000.h5"]
    assert cache.verify_split(copy / "train") == []


# --------------------------------------------------------------------------- divergence and run folders


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(lr=float("inf")), "--lr must be a positive finite number"),
        (dict(lr=float("nan")), "--lr must be a positive finite number"),
        (dict(tau_norm=float("nan")), "--tau-norm must be a finite number"),
        (dict(logit_adjust=float("inf")), "--logit-adjust must be a finite number"),
        (dict(weight_decay=-1.0), "--weight-decay"),
        (dict(seed=2**40), "--seed must be between"),
    ],
)
def test_settings_that_cannot_give_a_result_are_refused_before_training(features, tmp_path, kw, message):
    with pytest.raises(VlmcacheError, match=message):
        train_head(_cfg(features, tmp_path, **kw))
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


@pytest.mark.parametrize("params", [{"depth": 0}, {"heads": 0}, {"mlp_ratio": 0.0}])
def test_decoder_settings_of_zero_are_refused(params):
    with pytest.raises(VlmcacheError, match="depth >= 1, heads >= 1 and mlp_ratio > 0"):
        build_head("decoder", 16, 3, **params)


def test_a_diverged_run_is_a_failure_and_publishes_nothing(features, tmp_path, monkeypatch):
    import vlmcache.train as train_mod

    real_fit = train_mod.fit

    def poisoned_fit(module, *args, **kwargs):
        history = real_fit(module, *args, **kwargs)
        with torch.no_grad():
            next(p for p in module.parameters() if p.requires_grad).fill_(float("nan"))
        train_mod.check_finite_parameters(module)
        return history

    monkeypatch.setattr(train_mod, "fit", poisoned_fit)
    with pytest.raises(VlmcacheError, match="diverged"):
        train_head(_cfg(features, tmp_path))
    assert not list((tmp_path / "runs").rglob("metrics.json"))


@pytest.fixture(scope="module")
def finished_run(features, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    return Path(train_head(_cfg(features, tmp), log=lambda *a: None)["run"])


def _tampered(finished_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda r: (r / "config.json").write_text("[]"), "not a vlmcache run config"),
        (lambda r: (r / "config.json").write_text("{"), "not valid JSON"),
        (lambda r: _edit_json(r / "config.json", lambda c: c["config"].update(epochs="many")), "config.epochs"),
        (lambda r: _edit_json(r / "config.json", lambda c: c["config"].update(bogus=1)), "unknown keys"),
        (lambda r: _edit_json(r / "config.json", lambda c: c.update(kind="other")), "kind"),
        (lambda r: _edit_json(r / "config.json", lambda c: c.update(train_counts=[1])), "train_counts"),
        (  # many and few swapped by hand: the counts no longer are the cache's
            lambda r: _edit_json(r / "config.json", lambda c: c.update(train_counts=c["train_counts"][::-1])),
            "records .* training images for class 0, but its cache's 'train' split has",
        ),
        (lambda r: _edit_json(r / "config.json", lambda c: c["config"].update(head="cosine")), "names the head cosine"),
        (lambda r: _edit_head(r, lambda s: s.update(head="cosine")), "holds cosine"),
        (lambda r: _edit_head(r, lambda s: s.update(num_classes=5)), "5 classes"),
        (lambda r: _edit_head(r, lambda s: s["head_state"]["classifier.weight"].fill_(float("nan"))), "NaN"),
        (lambda r: _edit_head(r, lambda s: s.update(head="nope")), "does not have"),
        (lambda r: _edit_head(r, lambda s: s.update(in_dim="16")), "in_dim"),
        (lambda r: torch.save([1, 2], r / "head.pt"), "not a vlmcache head"),
        (lambda r: (r / "head.pt").write_bytes(b"garbage"), "not a vlmcache head"),
    ],
)
def test_a_tampered_run_folder_is_one_clear_line_under_eval(finished_run, tmp_path, tamper, message):
    run = _tampered(finished_run, tmp_path)
    tamper(run)
    with pytest.raises(VlmcacheError, match=message):
        evaluate_run(run, device="cpu")
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["config"].update(head="coop"), "not coop prompts"),
        (lambda c: c.update(kind="finetune"), "is a fine-tuning run; a second stage re-balances"),
    ],
)
def test_a_second_stage_from_a_run_it_cannot_rebalance_is_one_line(finished_run, features, tmp_path, edit, message):
    """The head comes from --from after the config's own checks ran: a coop run (or a fine-tuning run) named
    there is refused in one line, not an AttributeError in the second stage."""
    run = _tampered(finished_run, tmp_path)
    _edit_json(run / "config.json", edit)
    with pytest.raises(VlmcacheError, match=message):
        train_head(_cfg(features, tmp_path, stage2="crt", from_run=str(run)), log=lambda *a: None)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_head(run: Path, edit) -> None:
    saved = torch.load(run / "head.pt", weights_only=True)
    edit(saved)
    torch.save(saved, run / "head.pt")


def test_eval_refuses_post_hoc_values_that_are_not_finite(finished_run):
    result = runner.invoke(app, ["eval", str(finished_run), "--tau-norm", "nan"])
    assert result.exit_code == 2 and "--tau-norm must be a finite number" in result.output


def test_overwrite_replaces_a_finished_run_only_once_the_new_one_is_complete(finished_run, features, tmp_path):
    run = _tampered(finished_run, tmp_path)
    before = _tree(run)
    with pytest.raises(VlmcacheError):
        train_head(_cfg(features, tmp_path, out=str(run), overwrite=True, loss="focal", loss_params={"gamma": "x"}))
    assert _tree(run) == before
    result = train_head(_cfg(features, tmp_path, out=str(run), overwrite=True, epochs=1), log=lambda *a: None)
    assert runs.read_metrics(run)["history"] == result["history"]
    assert not [p for p in run.parent.iterdir() if atomic.TMP_MARK in p.name]


@pytest.mark.parametrize("option", ["--out", "--runs-dir"])
def test_output_folders_that_are_files_are_refused_before_training(features, tmp_path, option):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = str(blocker / "sub") if option == "--out" else str(blocker)
    result = _train_head_cli(features, option, target, "--device", "cpu")
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    assert "epoch" not in result.output  # refused before the first epoch


def test_cache_dir_that_is_a_file_or_too_long_is_one_line(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    for cache_dir, message in ((blocker, "is a file"), (tmp_path / ("x" * 300), "longer than 255")):
        result = runner.invoke(
            app,
            [
                "extract",
                "-d",
                "digits_lt",
                "-m",
                "vlmcache-tiny",
                "-p",
                "none",
                "--cache-dir",
                str(cache_dir),
                "--device",
                "cpu",
            ],
        )
        assert result.exit_code == 2 and message in result.output, result.output


# --------------------------------------------------------------------------- report


def test_report_leaves_out_an_unreadable_run_folder_and_reports_the_rest(finished_run, tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(finished_run, runs_dir / "good")
    shutil.copytree(finished_run, runs_dir / "bad")
    (runs_dir / "bad" / "metrics.json").write_text('{"metrics": {"overall": 7}}')
    result = runner.invoke(app, ["report", str(runs_dir)])
    assert result.exit_code == 0, result.output
    assert "left out of the report" in result.output and "bad" in result.output


@pytest.mark.parametrize(
    "csv, message",
    [
        ("a,b\n1,2\n", "no column(s)"),
        ("\n", "cannot be read"),
        (None, "is not a valid value"),
    ],
)
def test_a_foreign_results_table_is_one_line(tmp_path, csv, message):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    if csv is None:
        cols = "dataset,model,pretrained,method,seed,status,run,overall,many,medium,few,top5,mean_per_class"
        csv = cols + "\nd,m,p,CE,0,done,r,abc,0.1,0.1,0.1,0.1,0.1\n"
    (runs_dir / "results.csv").write_text(csv)
    result = runner.invoke(app, ["report", str(runs_dir)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- text.h5


def test_a_damaged_text_file_is_one_line(features, tmp_path):
    model_dir = _copy_cache(features, tmp_path)
    text = text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    emb = text.sets["photo"][1].copy()
    emb[0, 0] = np.nan
    text_cache.write_text(
        model_dir / text_cache.TEXT_FILE, text_cache.TextCache({}, text.classnames, {"photo": (["{}"], emb)}, 1.0)
    )
    with pytest.raises(VlmcacheError, match="NaN"):
        text_cache.read_text(model_dir / text_cache.TEXT_FILE)
    text_cache.write_text(
        model_dir / text_cache.TEXT_FILE, text_cache.TextCache({}, text.classnames[:2], {"photo": (["{}"], emb)}, 1.0)
    )
    with pytest.raises(VlmcacheError, match="not \\(2, D\\)"):
        text_cache.read_text(model_dir / text_cache.TEXT_FILE)


def test_disk_full_while_writing_text_is_a_clear_error(tmp_path):
    script = (
        "import numpy as np, resource, signal, sys\n"
        "from pathlib import Path\n"
        "from vlmcache import text_cache\n"
        "from vlmcache.errors import VlmcacheError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "emb = np.ones((1000, 64), np.float32)\n"
        "try:\n"
        f"    text_cache.write_text(Path({str(tmp_path / 'text.h5')!r}), text_cache.TextCache({{}}, ['c'] * 1000, "
        "{'photo': (['{}'], emb)}, 1.0))\n"
        "except VlmcacheError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Is the disk full?" in out.stdout, out.stderr
    assert list(tmp_path.iterdir()) == []  # neither text.h5 nor a temporary file


# --------------------------------------------------------------------------- split files, labels, layouts


def test_split_file_encodings(tmp_path):
    lines = "a/é.jpg 0\nb.jpg 1\n"
    for encoding in ("utf-8-sig", "utf-16"):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(lines.encode(encoding))
        assert read_split_file(path)[0] == ["a/é.jpg", "b.jpg"]
    path = tmp_path / "utf16-no-bom.txt"
    path.write_bytes(lines.encode("utf-16-le"))
    with pytest.raises(VlmcacheError, match="line 1: a NUL character"):
        read_split_file(path)
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok.jpg 0\na/é.jpg 0\n".encode("latin-1"))
    with pytest.raises(VlmcacheError, match="line 2: not UTF-8"):
        read_split_file(path)


def test_class_names_keep_line_i_as_class_i(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("cat\n\ndog\n\n")
    with pytest.raises(VlmcacheError, match="line 2: a blank line"):
        read_classnames(path)
    path.write_bytes("\ufeffcat\ndog\n\n".encode())
    assert read_classnames(path) == ["cat", "dog"]


@pytest.mark.parametrize("label", ["300000", "99999999999"])
def test_a_label_far_above_the_others_is_refused_naming_its_line(tmp_path, label):
    path = tmp_path / "train.txt"
    path.write_text(f"a.jpg 0\nb.jpg 1\nc.jpg {label}\nd.jpg 1\n")
    with pytest.raises(VlmcacheError, match="line 3"):
        load_dataset("split", tmp_path, {"train": str(path)})


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(np.random.default_rng(i), i).save(folder / f"{i}.png")


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train/a": 3, "train/b": 2}, "has train/ but not the other side"),
        ({"a": 3, "b": 2, ".": 1}, "outside class folders"),
        ({"a": 3, "b": 0}, "hold no images"),
        ({"a": 1, "b": 1}, "hold-out test split"),
    ],
)
def test_imagefolder_layouts_that_would_read_as_another_dataset_are_refused(tmp_path, layout, message):
    for folder, n in layout.items():
        _images(tmp_path / folder, n) if n else (tmp_path / folder).mkdir(parents=True)
    with pytest.raises(VlmcacheError, match=message):
        load_dataset("imagefolder", tmp_path)


def test_a_split_whose_images_are_all_unreadable_fails_at_extraction(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_text("not an image")
    (tmp_path / "train.txt").write_text("img/0.jpg 0\nimg/1.jpg 1\nimg/2.jpg 0\n")
    cfg = ExtractConfig(
        dataset="split",
        root=str(tmp_path),
        split_files={"train": str(tmp_path / "train.txt")},
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(VlmcacheError, match="has no rows: all 3 images were skipped"):
        run_extract(cfg, log=lambda *a: None)


# --------------------------------------------------------------------------- pipelines


def _pipeline(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


HEAD = "datasets: [digits_lt]\nmodels: [{model: ViT-B-16, pretrained: openai}]\n"


def test_a_grid_of_a_billion_runs_is_counted_and_refused_at_once(tmp_path):
    axis = "&a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"
    text = HEAD + (
        f"seeds: {axis}\nmethods:\n  - name: m\n    epochs: *a\n    batch_size: *a\n    lr: *a\n"
        "    loss: focal\n    loss_params: {gamma: *a}\n    weight_decay: *a\n    momentum: *a\n"
        "    few: *a\n    many: *a\n"
    )
    with pytest.raises(VlmcacheError, match="expands to 1,000,000,000 runs, more than --max-runs 5,000"):
        load_pipeline(_pipeline(tmp_path, text))
    result = runner.invoke(app, ["ablate", str(tmp_path / "p.yaml"), "--dry-run"])
    assert result.exit_code == 2 and "1,000,000,000" in result.output


@pytest.mark.parametrize(
    "body, message",
    [
        ("methods:\n  - {name: a, loss: ce}\n  - name: b\n    loss: ce\n    loss: focal\n", "lines 6 and 7"),
        ("methods:\n  - {name: a, epochs: [[1, 2], 3]}\n", "a grid lists single values"),
        ("methods:\n  - {name: a, epochs: ten}\n", "epochs"),
        ("methods:\n  - {name: a, lr: [0.1, fast]}\n", "lr"),
        ("defaults: {epochs: [1, 2]}\nmethods:\n  - {name: a}\n", "grids belong in methods"),
        ("methods:\n  - {name: [a, b]}\n", "'name' in a method takes one value"),
        ("methods:\n  - {name: a, loss_params: [1]}\n", "must be a mapping"),
        ("seeds: [[0]]\nmethods:\n  - {name: a}\n", "'seeds' must be a list of single values"),
        ("seeds: [99999999999999]\nmethods:\n  - {name: a}\n", "'seeds' must be a list of integers"),
        ("methods:\n  - {name: a, epochs: []}\n", "empty list"),
        ("methods:\n  - {name: a, epochs: true}\n", "line 4: 'epochs' in a method must be an integer.*got 'true'"),
        ("defaults: {batch_size: 2.0}\nmethods:\n  - {name: a}\n", "'batch_size' in defaults must be an integer"),
        ("methods:\n  - {name: a, lr: [0.1, yes]}\n", "'lr' in a method must be a number"),
        ("methods:\n  - {name: a, loss: 1}\n", "'loss' in a method must be a name .* quote it"),
        ("methods:\n  - {name: a, drop_last: 1}\n", "'drop_last' in a method must be true or false"),
        ("methods:\n  - {name: a, lr: [1e-3, 1e-3x]}\n", "got '1e-3x'"),  # 1e-3 is a number, 1e-3x is not
    ],
)
def test_wrongly_typed_pipelines_are_one_line(tmp_path, body, message):
    with pytest.raises(VlmcacheError, match=message):
        load_pipeline(_pipeline(tmp_path, HEAD + body))
    result = runner.invoke(app, ["ablate", str(tmp_path / "p.yaml"), "--dry-run"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_load_run_checks_the_head_against_its_cache(finished_run, features, tmp_path):
    """A run copied next to another cache of the same name but other widths is refused, not evaluated."""
    run = _tampered(finished_run, tmp_path)
    other = tmp_path / "cache"
    x, y = long_tailed_features(np.random.default_rng(1), [20, 20, 20], dim=8)
    write_feature_cache(other, "digits_lt", {"train": (x, y, None), "test": (x, y, None)}, 3, shard_size=25)
    _edit_json(run / "config.json", lambda c: c["config"].update(cache_dir=str(other)))
    with pytest.raises(VlmcacheError, match="inputs of width 16, but its cache"):
        load_run(run, torch.device("cpu"))
