"""Augmentation from the cache: training reads one of each row's cached views per epoch, drawn by (seed, epoch);
streaming with --augment makes the same views again from their seeds and trains on the same numbers."""

import numpy as np
import pytest
import torch

from vlmcache import cache
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.features import Pooled, view_choice
from vlmcache.train import train_head
from vlmcache.train_config import TrainConfig

QUIET = dict(log=lambda *a: None)


def _extract(split_dataset, cache_dir, log=lambda *a: None, **kw) -> dict:
    """The split_dataset's train and test splits extracted with the tiny model and `kw` (views, tokens, ...)."""
    root, files = split_dataset
    cfg = ExtractConfig(
        dataset="split",
        name="split",
        root=str(root),
        split_files={"train": str(files["train"]), "test": str(files["test"])},
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
        cache_dir=str(cache_dir),
        **kw,
    )
    return run_extract(cfg, log=log)


@pytest.fixture(scope="module")
def views_cache(split_dataset, tmp_path_factory):
    return _extract(split_dataset, tmp_path_factory.mktemp("views"), views=3)


def _cfg(summary, tmp_path, **kw) -> TrainConfig:
    base = dict(
        dataset="split",
        model="vlmcache-tiny",
        pretrained="none",
        cache_dir=summary["config"]["cache_dir"],
        runs_dir=str(tmp_path / "runs"),
        device="cpu",
        epochs=3,
        lr=1e-2,
        batch_size=16,
        workers=0,
        head_params={"normalize": "standardize"},
    )
    return TrainConfig(**{**base, **kw})


def test_training_reads_the_cached_views_by_default_and_says_so(views_cache, tmp_path):
    said = []
    augmented = train_head(_cfg(views_cache, tmp_path / "a"), log=said.append)
    plain = train_head(_cfg(views_cache, tmp_path / "p", augment=False), **QUIET)
    assert any("one of the 3 cached views" in s for s in said)
    assert [h["loss"] for h in augmented["history"]] != [h["loss"] for h in plain["history"]]


def test_each_epoch_shows_one_view_per_row_drawn_by_seed_and_epoch(views_cache):
    split = cache.SplitCache(f"{views_cache['cache']}/train")
    data = Pooled.load(split, torch.device("cpu"), views=True)
    assert data.views.shape[:2] == (len(split), 3)
    data.set_epoch(0, 1)
    x, _ = next(data.batches(torch.arange(len(split)), len(split)))
    views = split.load("views").astype(np.float32)
    chosen = view_choice(len(split), 3, 0, 1).numpy()
    np.testing.assert_array_equal(x.numpy(), views[np.arange(len(split)), chosen])
    assert not torch.equal(view_choice(len(split), 3, 0, 1), view_choice(len(split), 3, 0, 2))
    assert torch.equal(view_choice(len(split), 3, 0, 1), view_choice(len(split), 3, 0, 1))


def test_streaming_the_same_views_equals_the_cached_views_run(views_cache, tmp_path):
    cached = train_head(_cfg(views_cache, tmp_path / "c", augment=True), **QUIET)
    streamed = train_head(_cfg(views_cache, tmp_path / "s", augment=True, stream=True), **QUIET)
    assert [h["loss"] for h in streamed["history"]] == [h["loss"] for h in cached["history"]]
    assert streamed["metrics"] == cached["metrics"]


def test_augment_without_views_or_on_tokens_is_a_clear_error(digits_cache, tmp_path):
    base = dict(dataset="digits_lt", model="vlmcache-tiny", pretrained="none", cache_dir=str(digits_cache),
                runs_dir=str(tmp_path), device="cpu", epochs=1, augment=True)  # fmt: skip
    with pytest.raises(VlmcacheError, match="extract the train split with --views K"):
        train_head(TrainConfig(**base), **QUIET)
    with pytest.raises(VlmcacheError, match="extract the train split with --tokens --views K"):
        train_head(TrainConfig(**base, head="decoder"), **QUIET)


def test_streaming_without_cached_views_draws_a_fresh_view_every_epoch(digits_cache):
    from vlmcache import streaming

    split = cache.SplitCache(next((digits_cache / "digits_lt").iterdir()) / "train")
    encoder = streaming.encoder_of(split, "cpu")
    data = streaming.StreamedImages(split, encoder, tokens=False, workers=0, augment=True)
    rows = torch.arange(8)
    firsts = []
    for epoch in (1, 2):
        data.set_epoch(0, epoch)
        firsts.append(next(data.batches(rows, 8))[0])
    assert not torch.equal(firsts[0], firsts[1])
    data.set_epoch(0, 1)
    assert torch.equal(next(data.batches(rows, 8))[0], firsts[0])  # the same epoch makes the same views


@pytest.fixture(scope="module")
def token_views_cache(split_dataset, tmp_path_factory):
    said = []
    summary = _extract(
        split_dataset, tmp_path_factory.mktemp("token_views"), said.append, views=2, tokens=True, shard_size=16
    )
    assert any("caching the tokens of 2 views" in s for s in said)  # the size is said up front
    return summary


def test_the_decoder_trains_on_its_views_tokens_from_memory_from_disk_and_streamed(token_views_cache, tmp_path):
    split = cache.SplitCache(f"{token_views_cache['cache']}/train")
    view_tokens = split.read_tokens(0, len(split), "view_tokens")
    assert view_tokens.shape == (len(split), 2, *split.token_shape())
    # one view of a row is what the encoder makes of that view's image: the same as its pooled view's tokens
    assert not np.array_equal(view_tokens[:, 0], split.read_tokens(0, len(split)))
    kw = dict(head="decoder", head_params={"depth": 1}, augment=True, epochs=2)
    memory = train_head(_cfg(token_views_cache, tmp_path / "m", **kw), **QUIET)
    disk = train_head(_cfg(token_views_cache, tmp_path / "d", stream_tokens=True, **kw), **QUIET)
    streamed = train_head(_cfg(token_views_cache, tmp_path / "s", stream=True, **kw), **QUIET)
    plain = train_head(_cfg(token_views_cache, tmp_path / "p", **{**kw, "augment": False}), **QUIET)
    assert memory["metrics"] == streamed["metrics"]
    assert [h["loss"] for h in streamed["history"]] == [h["loss"] for h in memory["history"]]
    assert disk["history"][-1]["loss"] > 0  # the block-streaming path trains too; its order is its own
    # and reads exactly the chosen views: every row's view of the epoch, whatever the order
    from vlmcache.features import Tokens

    on_disk = Tokens(split, torch.device("cpu"), in_memory=False, views=True, block_rows=5)
    on_disk.set_epoch(0, 1)
    got = sum(x.double().sum(0) for x, _ in on_disk.batches(torch.arange(len(split)), 7, torch.Generator()))
    chosen = view_tokens[np.arange(len(split)), view_choice(len(split), 2, 0, 1).numpy()]
    assert torch.allclose(got, torch.from_numpy(chosen.astype(np.float64)).sum(0))
    assert [h["loss"] for h in plain["history"]] != [h["loss"] for h in memory["history"]]
