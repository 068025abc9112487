"""The CLI in-process: exit codes, JSON output, clear errors without tracebacks, and --help examples."""

import json

import pytest
from typer.testing import CliRunner

from vlmcache.cli import app

runner = CliRunner()
TINY = ["--model", "vlmcache-tiny", "--pretrained", "none", "--device", "cpu", "--workers", "0"]


def _extract_args(split_dataset, cache_dir):
    root, files = split_dataset
    return [
        "extract",
        "--dataset",
        "split",
        "--name",
        "split",
        "--root",
        str(root),
        "--split-file",
        f"train={files['train']}",
        "--split-file",
        f"test={files['test']}",
        "--classnames",
        str(root / "classnames.txt"),
        "--cache-dir",
        str(cache_dir),
        "--shard-size",
        "16",
        *TINY,
    ]


def test_extract_json_then_cache_ls_info_verify(tmp_path, split_dataset):
    result = runner.invoke(app, [*_extract_args(split_dataset, tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [s["rows"] for s in summary["splits"]] == [47, 18] and summary["pretrained"] == "random"
    ref = f"split/{summary['key']}"

    ls = json.loads(runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path), "--json"]).stdout)
    assert [c["key"] for c in ls["caches"]] == [summary["key"]]
    assert ls["caches"][0]["splits"]["train"]["complete"]

    info = runner.invoke(app, ["cache", "info", ref, "--cache-dir", str(tmp_path), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["encoder"]["model"] == "vlmcache-tiny"
    assert runner.invoke(app, ["cache", "info", ref, "--cache-dir", str(tmp_path)]).exit_code == 0

    ok = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert ok.exit_code == 0 and "all shards match" in ok.stdout

    shard = tmp_path / ref / "train" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    bad = runner.invoke(app, ["cache", "verify", ref, "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "shard-00001.h5" in bad.stdout and "sha256 differs" in bad.stdout
    assert "shard-00000.h5" not in bad.stdout


def test_extract_prints_a_summary_table(tmp_path, split_dataset):
    result = runner.invoke(app, _extract_args(split_dataset, tmp_path))
    assert result.exit_code == 0, result.output
    assert "train" in result.stdout and "47" in result.stdout and "random weights" in result.stdout
    again = runner.invoke(app, [*_extract_args(split_dataset, tmp_path), "--json"])
    assert [s["resumed_shards"] for s in json.loads(again.stdout)["splits"]] == [3, 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "--dataset", "places-lt"], "'places-lt' is not one of"),
        (["extract", "--dataset", "digits_lt", "--model", "ViT-B-61"], "Did you mean 'ViT-B-16'"),
        (["extract", "--dataset", "digits_lt", *TINY, "--templates", "openai,fancy"], "template set 'fancy'"),
        (["extract", "--dataset", "places_lt", *TINY], "pass --root"),
        (["extract", "--dataset", "places_lt", "--root", "/no/such/dir", *TINY], "does not exist"),
        (["extract", "--dataset", "split", "--split-file", "train=/no/such.txt", *TINY], "does not exist"),
        (["extract", "--dataset", "split", "--split-file", "train.txt", *TINY], "NAME=PATH"),
        (["extract", "--dataset", "imagenet_lt", "--splits", "train", "--root", ".", *TINY], "ImageNet_LT_train.txt"),
        (["extract", "--dataset", "digits_lt", *TINY, "--shard-size", "0"], "--shard-size must be between 1 and"),
        (["extract", "--dataset", "digits_lt", *TINY, "--precision", "fp16"], "needs a GPU"),
        (["cache", "info", "nothing", "--cache-dir", "."], "No cache matches 'nothing'"),
    ],
)
def test_user_mistakes_get_one_clear_line(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_malformed_split_line_names_file_and_line(tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text("a.jpg 0\nb.jpg zero\n")
    result = runner.invoke(
        app, ["extract", "--dataset", "split", "--root", str(tmp_path), "--split-file", f"train={bad}", *TINY]
    )
    assert result.exit_code == 2 and f"{bad}, line 2: the label 'zero' is not a non-negative integer" in result.output


@pytest.mark.parametrize(
    "command",
    [
        ["extract"],
        ["datasets", "info"],
        ["cache", "ls"],
        ["cache", "info"],
        ["cache", "verify"],
        ["demo"],
        ["datasets"],
    ],
)
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Example" in result.stdout


def test_datasets_listing_and_info():
    listing = runner.invoke(app, ["datasets"])
    assert listing.exit_code == 0 and all(n in listing.stdout for n in ("imagenet_lt", "inat18", "digits_lt"))
    info = json.loads(runner.invoke(app, ["datasets", "info", "digits_lt", "--json"]).stdout)
    assert info["splits"]["train"]["classes"] == 10 and info["splits"]["test"]["images"] == 300


def test_demo_runs_the_whole_loop_and_says_the_weights_are_random(tmp_path):
    result = runner.invoke(app, ["demo", "--cache-dir", str(tmp_path / "c"), "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.stdout and "balanced softmax" in result.stdout and "cRT" in result.stdout
    ls = json.loads(runner.invoke(app, ["cache", "ls", "--cache-dir", str(tmp_path / "c"), "--json"]).stdout)
    assert ls["caches"][0]["splits"]["train"]["rows"] == 568 and ls["caches"][0]["splits"]["train"]["tokens"]
    runs = sorted(p.name for p in (tmp_path / "r").iterdir() if p.is_dir())
    assert len(runs) == 33 and any("decoder" in r for r in runs) and any("crt" in r for r in runs)  # 11 x 3 seeds
    assert (tmp_path / "r" / "report.md").is_file() and f"report: {tmp_path / 'r' / 'report.md'}" in result.stdout
