"""`train-head --stream`: the frozen tower on every step gives what the cache gives, for the same seed."""

import json
import shutil

import numpy as np
import pytest
from conftest import long_tailed_features, write_feature_cache
from typer.testing import CliRunner

from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.train import evaluate_run, train_head
from vlmcache.train_config import TrainConfig


def _cfg(cache_dir, tmp_path, **kw):
    base = dict(
        dataset="digits_lt",
        model="vlmcache-tiny",
        pretrained="none",
        cache_dir=str(cache_dir),
        runs_dir=str(tmp_path / "runs"),
        device="cpu",
        epochs=3,
        lr=1e-2,
        batch_size=64,
        workers=0,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "head, loss, sampler",
    [("linear", "balanced_softmax", "instance"), ("linear", "ce", "class_balanced"), ("decoder", "ce", "instance")],
)
def test_streaming_gives_the_cached_metrics(digits_cache, tmp_path, head, loss, sampler):
    kw = dict(head=head, loss=loss, sampler=sampler)
    if head == "decoder":
        kw.update(epochs=2, head_params={"depth": 1, "heads": 2})
    cached = train_head(_cfg(digits_cache, tmp_path, **kw))
    streamed = train_head(_cfg(digits_cache, tmp_path, stream=True, **kw))
    assert streamed["run"] != cached["run"]  # a separate run folder
    assert streamed["metrics"] == cached["metrics"]
    assert [h["loss"] for h in streamed["history"]] == [h["loss"] for h in cached["history"]]
    assert evaluate_run(streamed["run"])["metrics"] == cached["metrics"]


def test_streaming_with_loader_workers_and_input_statistics(digits_cache, tmp_path):
    kw = dict(head="linear", head_params={"normalize": "standardize"}, epochs=2)
    cached = train_head(_cfg(digits_cache, tmp_path, **kw))
    streamed = train_head(_cfg(digits_cache, tmp_path, stream=True, **{**kw, "workers": 2}))
    assert streamed["metrics"] == pytest.approx(cached["metrics"], abs=1e-12)


def test_streaming_finds_moved_images_with_root(split_dataset, tmp_path):
    src, files = split_dataset
    shutil.copytree(src / "images", tmp_path / "a" / "images")
    run_extract(
        ExtractConfig(
            dataset="split",
            name="split",
            root=str(tmp_path / "a"),
            split_files={"train": str(files["train"]), "test": str(files["test"])},
            classnames_file=str(src / "classnames.txt"),
            model="vlmcache-tiny",
            pretrained="none",
            device="cpu",
            workers=0,
            cache_dir=str(tmp_path / "cache"),
        ),
        log=lambda *a: None,
    )
    (tmp_path / "a").rename(tmp_path / "b")
    kw = dict(dataset="split", epochs=2)
    with pytest.raises(VlmcacheError, match=r"image root .*/a. for split does not exist.*--root"):
        train_head(_cfg(tmp_path / "cache", tmp_path, stream=True, **kw))
    streamed = train_head(_cfg(tmp_path / "cache", tmp_path, stream=True, root=str(tmp_path / "b"), **kw))
    assert streamed["metrics"] == train_head(_cfg(tmp_path / "cache", tmp_path, **kw))["metrics"]


def test_streaming_refuses_a_cache_whose_encoder_cannot_be_rebuilt(digits_cache, tmp_path):
    x, y = long_tailed_features(np.random.default_rng(0), [20, 10], noise=1.0)
    write_feature_cache(tmp_path / "c", "synth", {"train": (x, y, None), "test": (x, y, None)}, 2)
    cfg = TrainConfig(
        dataset="synth",
        model="synthetic",
        pretrained="random",
        cache_dir=str(tmp_path / "c"),
        stream=True,
        runs_dir=str(tmp_path / "runs"),
        device="cpu",
        epochs=1,
    )
    with pytest.raises(VlmcacheError, match="does not record how it was extracted"):
        train_head(cfg)


def test_stream_from_the_cli(digits_cache, tmp_path):
    args = [
        "train-head",
        "-d",
        "digits_lt",
        "-m",
        "vlmcache-tiny",
        "--pretrained",
        "none",
        "--cache-dir",
        str(digits_cache),
        "--runs-dir",
        str(tmp_path),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    res = CliRunner().invoke(app, [*args, "--stream", "--json"])
    assert res.exit_code == 0, res.output
    streamed = json.loads(res.stdout)
    cached = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert streamed["metrics"] == cached["metrics"]
    assert json.loads((tmp_path / streamed["run"].split("/")[-1] / "config.json").read_text())["config"]["stream"]
