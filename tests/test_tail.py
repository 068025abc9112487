"""Tail tuning from a cached prefix (issue 28): the prefix is the exact tensor the tower's block L-K receives, the
tail head with nothing trained reproduces the cached pooled embeddings, and a run on the cache equals the same run
with the prefix recomputed from the images (--stream)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vlmcache import atomic, cache, runs
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.listing import summarize
from vlmcache.tail import TUNES, TailHead, lift_bottleneck, prefix_tap, tower_blocks
from vlmcache.train import evaluate_run, train_head
from vlmcache.train_config import TrainConfig

QUIET = dict(log=lambda *a: None)


def _extract_cfg(split_dataset, cache_dir, **kw) -> ExtractConfig:
    root, files = split_dataset
    splits = {"train": str(files["train"]), "test": str(files["test"])}
    return ExtractConfig(
        dataset="split", name="split", root=str(root), split_files=splits, model="vlmcache-tiny", pretrained="none",
        device="cpu", workers=0, cache_dir=str(cache_dir), **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def prefix_cache(split_dataset, tmp_path_factory):
    """The split_dataset extracted with the tiny model's last block's prefix and 2 views per training image."""
    return run_extract(_extract_cfg(split_dataset, tmp_path_factory.mktemp("tail"), tail_blocks=1, views=2), **QUIET)


def _cfg(summary, tmp_path, **kw) -> TrainConfig:
    base = dict(
        dataset="split", model="vlmcache-tiny", pretrained="none", cache_dir=summary["config"]["cache_dir"],
        runs_dir=str(tmp_path / "runs"), device="cpu", epochs=2, lr=1e-2, batch_size=16, workers=0, head="tail",
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("k", [1, 2])
def test_the_prefix_is_the_tensor_block_l_minus_k_receives(tiny_encoder, k):
    visual = tiny_encoder.model.visual
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        x = visual._embeds(images)  # patch embedding, class token, positions, ln_pre
        for blk in visual.transformer.resblocks[: len(visual.transformer.resblocks) - k]:
            x = blk(x)
        pooled, _, prefix = tiny_encoder.encode_with_prefix(images, False, k)
    torch.testing.assert_close(prefix, x)
    assert torch.equal(pooled, tiny_encoder.encode_images(images)[0])  # the tap leaves the forward as it was


@pytest.mark.parametrize("tune", list(TUNES))
def test_an_untrained_tail_on_the_cached_prefix_gives_the_cached_pooled_embeddings(prefix_cache, tiny_encoder, tune):
    split = cache.SplitCache(f"{prefix_cache['cache']}/train")
    assert split.prefix_shape() == (17, 64) and split.fingerprint["tail_blocks"] == 1
    head = TailHead(64, 3, tune=tune, normalize="none").bind_tower(tiny_encoder.model.visual, 1)
    with torch.no_grad():
        plain = head.features(torch.from_numpy(split.read_tokens(0, len(split), "prefix"))).numpy()
        views = head.features(torch.from_numpy(split.read_tokens(0, len(split), "view_prefix")).flatten(0, 1))
    # the prefix is float16 and so is the cached embedding: equal to float16 rounding (2^-10 relative, twice)
    np.testing.assert_allclose(plain, split.load("pooled").astype(np.float32), rtol=3e-3, atol=3e-3)
    np.testing.assert_allclose(
        views.numpy(), split.load("views").reshape(-1, plain.shape[1]).astype(np.float32), rtol=3e-3, atol=3e-3
    )
    trainable = {n.split(".")[0] for n, p in head.tuner.named_parameters() if p.requires_grad}
    assert trainable == {"adapter": {"adapters"}, "lora": {"lora"}, "full": {"blocks"}, "none": set()}[tune]


def test_lifts_bottleneck_and_the_tuned_modules_start_at_zero(tiny_encoder):
    assert [lift_bottleneck(c, 12) for c in (100, 365, 1000, 8142)] == [4, 8, 32, 256]
    head = TailHead(64, 3, tune="adapter").bind_tower(tiny_encoder.model.visual, 2)
    assert head.tuner.bottleneck == 1 and len(head.tuner.adapters) == 2  # 3 classes, 2 blocks: 2^max(0, -1)
    assert all(not a.up.weight.any() and not a.up.bias.any() for a in head.tuner.adapters)
    assert TailHead(64, 3, tune="adapter", bottleneck=5).bind_tower(tiny_encoder.model.visual, 1).tuner.bottleneck == 5


@pytest.mark.parametrize(("tune", "augment", "epochs"), [("adapter", None, 2), ("lora", False, 1), ("full", True, 1)])
def test_a_run_on_the_cached_prefix_equals_the_run_that_recomputes_it_from_images(
    prefix_cache, tmp_path, tune, augment, epochs
):
    kw = dict(tune=tune, augment=augment, epochs=epochs)  # augment None: both read the cached views by default
    said = {False: [], True: []}
    cached = train_head(_cfg(prefix_cache, tmp_path / "c", **kw), log=said[False].append)
    streamed = train_head(_cfg(prefix_cache, tmp_path / "s", stream=True, **kw), log=said[True].append)
    for lines in said.values():
        assert any("one of the 2 cached views" in line for line in lines) == (augment is not False), lines
    assert [h["loss"] for h in streamed["history"]] == [h["loss"] for h in cached["history"]]
    assert streamed["metrics"] == cached["metrics"]
    a = torch.load(f"{cached['run']}/head.pt", weights_only=True)["head_state"]
    b = torch.load(f"{streamed['run']}/head.pt", weights_only=True)["head_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tail_run_evaluates_again_and_takes_a_second_stage(prefix_cache, tmp_path):
    first = train_head(_cfg(prefix_cache, tmp_path, tune="lora", text_init="openai"), **QUIET)
    assert evaluate_run(first["run"], device="cpu")["metrics"] == first["metrics"]
    second = train_head(_cfg(prefix_cache, tmp_path, dataset=None, stage2="crt", from_run=first["run"]), **QUIET)
    assert 0 <= second["metrics"]["overall"] <= 1


def test_tail_mistakes_are_one_clear_error(prefix_cache, split_dataset, tiny_encoder, tmp_path):
    with pytest.raises(VlmcacheError, match="--tune chooses what the tail head trains"):
        TrainConfig(dataset="split", head="linear", tune="lora").resolve()
    with pytest.raises(VlmcacheError, match="--tune.*'lorra'.*adapter, lora, full, none"):
        TrainConfig(dataset="split", head="tail", tune="lorra").resolve()
    with pytest.raises(VlmcacheError, match="--text-init initialises a cosine classifier"):
        TrainConfig(dataset="split", head="tail", text_init="photo", head_params={"classifier": "linear"}).resolve()
    with pytest.raises(VlmcacheError, match="features.*'pooled'.*proj, ln_post"):
        TailHead(64, 3, features="pooled")
    with pytest.raises(VlmcacheError, match="open_clip ViT image tower"):
        tower_blocks(torch.nn.Linear(2, 2), "RN50")
    with pytest.raises(VlmcacheError, match="between 1 and 2"), prefix_tap(tiny_encoder.model.visual, 3):
        pass
    # K out of range on the command line: exit 2, one line, before any file is written
    res = CliRunner().invoke(app, ["extract", "-d", "split", "--root", str(split_dataset[0]), "--split-file",
                                   f"train={split_dataset[1]['train']}", "-m", "vlmcache-tiny", "-p", "none",
                                   "--device", "cpu", "--workers", "0", "--cache-dir", str(tmp_path / "c"),
                                   "--tail-blocks", "3"])  # fmt: skip
    assert res.exit_code == 2 and "--tail-blocks must be between 1 and 2" in res.output, res.output
    assert not list((tmp_path / "c").rglob("*.h5"))
    # another K is another cache: resuming into this one is refused, naming the key
    with pytest.raises(VlmcacheError, match="tail_blocks"):
        run_extract(_extract_cfg(split_dataset, prefix_cache["config"]["cache_dir"], tail_blocks=2, views=2), **QUIET)


def test_protocol_lift_sets_lifts_recipe_and_records_it(prefix_cache, tmp_path, tiny_encoder):
    cfg = TrainConfig(dataset="inat18", head="tail", protocol="lift").resolve()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.momentum) == (
        20, 128, 0.01, 5e-4, "sgd", 0.9
    )  # fmt: skip
    assert (cfg.loss, cfg.loss_params, cfg.text_init) == ("logit_adjust", {"tau": 1.0}, "photo")
    assert cfg.head_params == {
        "tune": "adapter", "classifier": "cosine", "features": "ln_post", "scale": 25.0, "learn_scale": False
    }  # fmt: skip
    mine = TrainConfig(dataset="split", head="tail", protocol="lift", tune="lora", epochs=3, lr=0.1).resolve()
    assert (mine.epochs, mine.lr, mine.head_params["tune"]) == (3, 0.1, "lora")  # what the user says wins
    with pytest.raises(VlmcacheError, match="--protocol lift tunes the tower's last blocks: use --head tail"):
        TrainConfig(dataset="split", protocol="lift").resolve()
    # LIFT's classifier: class texts mapped back through proj^T, unit norm, at a fixed scale of 25
    head = TailHead(64, 3, **cfg.head_params).bind_tower(tiny_encoder.model.visual, 1)
    text = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    head.init_from_text(text, 100.0)
    proj = tiny_encoder.model.visual.proj.detach()
    torch.testing.assert_close(head.classifier.weight.detach(), torch.nn.functional.normalize(text @ proj.T, dim=-1))
    assert float(head.classifier.log_scale.exp()) == pytest.approx(25.0)
    assert not head.classifier.log_scale.requires_grad
    run = train_head(_cfg(prefix_cache, tmp_path, protocol="lift", epochs=1, lr=None, batch_size=None), **QUIET)
    recorded = runs.read_json(Path(run["run"]) / "config.json", "run")["config"]
    assert (recorded["protocol"], recorded["loss"], recorded["head_params"]["features"]) == (
        "lift", "logit_adjust", "ln_post"
    )  # fmt: skip


def test_cache_listings_name_the_prefix(prefix_cache):
    splits = summarize(Path(prefix_cache["cache"]))["splits"]
    assert (splits["train"]["tail_blocks"], splits["test"]["tail_blocks"]) == (1, 1)
    listing = CliRunner().invoke(
        app, ["cache", "ls", "--cache-dir", prefix_cache["config"]["cache_dir"]], env={"COLUMNS": "200"}
    )  # wide enough that the table does not wrap the splits column
    assert listing.exit_code == 0 and "+prefix K=1" in listing.output, listing.output


def test_tail_runs_trained_as_a_group_equal_each_run_alone(prefix_cache, tmp_path):
    from vlmcache.group import make_groups, train_group

    settings = [dict(tune="adapter"), dict(tune="lora", seed=1), dict(tune="full", loss="logit_adjust")]
    alone = [train_head(_cfg(prefix_cache, tmp_path / "alone", **s), **QUIET) for s in settings]
    cfgs = [_cfg(prefix_cache, tmp_path / "grouped", **s) for s in settings]
    assert len(make_groups(cfgs)) == 1  # one read of the prefix for the whole group
    outcomes = train_group(cfgs, **QUIET)
    for a, o in zip(alone, outcomes, strict=True):
        assert o.error is None, o.trace
        assert o.result["metrics"] == a["metrics"] and o.result["cost"]["group_size"] == 3
        assert [h["loss"] for h in o.result["history"]] == [h["loss"] for h in a["history"]]
        ha = torch.load(Path(a["run"]) / "head.pt", weights_only=True)["head_state"]
        hb = torch.load(Path(o.result["run"]) / "head.pt", weights_only=True)["head_state"]
        assert all(torch.equal(v, hb[k]) for k, v in ha.items())


def test_tune_names_the_method_and_leaves_other_runs_names_as_they_were():
    from dataclasses import asdict

    from vlmcache.runs import identity_key, method_label
    from vlmcache.train_config import config_hash

    linear = TrainConfig(dataset="digits_lt").resolve()
    before = {k: v for k, v in asdict(linear).items() if k != "tune"}  # a config.json written before --tune
    assert identity_key(before) == identity_key(asdict(linear))
    assert config_hash(linear) == config_hash(TrainConfig(dataset="digits_lt", head_params={}).resolve())
    tail = TrainConfig(dataset="digits_lt", head="tail", tune="lora").resolve()
    assert method_label(asdict(tail)) == "tail-lora + ce + instance"
    assert config_hash(tail) != config_hash(TrainConfig(dataset="digits_lt", head="tail", tune="full").resolve())


def test_a_prefix_larger_than_memory_is_read_in_blocks_with_each_rows_view_once(prefix_cache):
    from vlmcache.features import Tokens, view_choice

    split = cache.SplitCache(f"{prefix_cache['cache']}/train")
    on_disk = Tokens(split, torch.device("cpu"), in_memory=False, views=True, block_rows=5, name="prefix")
    on_disk.set_epoch(0, 1)
    got = sum(x.double().sum(0) for x, _ in on_disk.batches(torch.arange(len(split)), 7, torch.Generator()))
    chosen = split.read_tokens(0, len(split), "view_prefix")[np.arange(len(split)), view_choice(len(split), 2, 0, 1)]
    assert on_disk.dim == 64
    torch.testing.assert_close(got, torch.from_numpy(chosen.astype(np.float64)).sum(0))


def test_a_prefix_extraction_resumes_where_it_stopped(split_dataset, tmp_path):
    import shutil

    cfg = dict(tail_blocks=2, shard_size=16, templates=["photo"], splits=["train"])
    full = run_extract(_extract_cfg(split_dataset, tmp_path / "full", **cfg), **QUIET)["splits"][0]
    # a run stopped after its first shards: the last shard neither listed nor on disk
    split_dir = tmp_path / "resumed" / Path(full["path"]).relative_to(tmp_path / "full")
    shutil.copytree(full["path"], split_dir)
    manifest = cache.read_manifest(split_dir)
    last = manifest["shards"].pop()
    manifest["complete"] = False
    atomic.write_json_atomic(split_dir / cache.MANIFEST, manifest)
    (split_dir / last["file"]).unlink()
    resumed = run_extract(_extract_cfg(split_dataset, tmp_path / "resumed", **cfg), **QUIET)["splits"][0]
    assert (resumed["resumed_shards"], resumed["shards"], resumed["rows"]) == (2, 3, 47)
    a, b = cache.SplitCache(full["path"]), cache.SplitCache(split_dir)
    assert a.fingerprint == b.fingerprint and a.fingerprint["tail_blocks"] == 2
    np.testing.assert_array_equal(a.read_tokens(0, 47, "prefix"), b.read_tokens(0, 47, "prefix"))


def _finetune_cfg(split_dataset, tmp_path, **kw):
    from vlmcache.finetune_config import FinetuneConfig

    root, files = split_dataset
    base = dict(
        dataset="split", root=str(root), split_files={"train": str(files["train"]), "test": str(files["test"])},
        model="vlmcache-tiny", pretrained="none", device="cpu", workers=0, runs_dir=str(tmp_path / "ft"), epochs=2,
        batch_size=16, head="cosine", head_lr=1e-2, weight_decay=1e-4, tail_blocks=1, tune="adapter", views=2,
    )  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.parametrize("tune", ["adapter"])
def test_finetune_with_a_frozen_prefix_equals_the_cached_run_and_its_stream_twin(
    prefix_cache, split_dataset, tmp_path, tune
):
    from vlmcache.finetune import finetune

    kw = dict(tune=tune, min_steps=0, weight_decay=1e-4)  # finetune's epochs are its epochs: no min_steps floor
    cached = train_head(_cfg(prefix_cache, tmp_path / "c", **kw), **QUIET)
    streamed = train_head(_cfg(prefix_cache, tmp_path / "s", stream=True, **kw), **QUIET)
    tuned = finetune(_finetune_cfg(split_dataset, tmp_path, tune=tune), **QUIET)
    assert len(tuned["history"]) == len(cached["history"]) == 2
    heads = [torch.load(Path(r["run"]) / "head.pt", weights_only=True) for r in (cached, streamed, tuned)]
    assert heads[2]["head_params"] == heads[0]["head_params"]
    # one code path for the prefix and the training loop: equal bit for bit on the CPU, not only to a tolerance
    for other, run in ((heads[1], streamed), (heads[2], tuned)):
        assert run["metrics"] == cached["metrics"]
        assert [h["loss"] for h in run["history"]] == [h["loss"] for h in cached["history"]]
        a, b = heads[0]["head_state"], other["head_state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_tail_mistakes_are_one_clear_error_and_other_finetune_runs_keep_their_names(split_dataset, tmp_path):
    import hashlib
    import json
    from dataclasses import fields

    from vlmcache.finetune_config import FinetuneConfig

    with pytest.raises(VlmcacheError, match="--tune must be one of adapter, lora, full, none; got 'all'"):
        FinetuneConfig(dataset="split", tail_blocks=1).resolve()
    with pytest.raises(VlmcacheError, match="--tune lora tunes a module.*add --tail-blocks K"):
        FinetuneConfig(dataset="split", tune="lora").resolve()
    with pytest.raises(VlmcacheError, match="--views, --view-seed apply to a run with --tail-blocks"):
        FinetuneConfig(dataset="split", views=2, view_seed=3).resolve()
    with pytest.raises(VlmcacheError, match="--lr is the tower's learning rate.*--head-lr"):
        FinetuneConfig(dataset="split", tail_blocks=1, tune="lora", lr=1e-3).resolve()
    with pytest.raises(VlmcacheError, match="tail head has no parameter 'gamma'"):
        FinetuneConfig(dataset="split", tail_blocks=1, tune="lora", head_params={"gamma": 1}).resolve()
    tail = FinetuneConfig(dataset="split", tail_blocks=1, tune="lora", head="cosine").resolve()
    assert tail.lr is None and tail.resolve().head_params["tune"] == "lora"  # resolving again changes nothing
    assert "__ft-tail1-lora-cosine-" in tail.run_name()
    # a run without --tail-blocks hashes the settings it had before the tail settings existed
    plain = FinetuneConfig(dataset="split").resolve()
    skip = {"runs_dir", "out", "overwrite", "device", "workers", "reextract", "reextract_tokens", "cache_dir"}
    skip |= {"tail_blocks", "views", "view_seed", "round_prefix"}
    before = {f.name: getattr(plain, f.name) for f in fields(plain) if f.name not in skip}
    assert plain.hash() == hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:8]
    # and report groups it with runs made before them; a tail run's label says what it tunes
    from dataclasses import asdict

    from vlmcache.runs import identity_key, method_label

    assert identity_key(asdict(plain)) == identity_key({k: v for k, v in asdict(plain).items() if k in before})
    assert method_label(asdict(tail), "finetune") == "finetune-tail1-lora + cosine + ce + instance"
    assert method_label(asdict(plain), "finetune") == "finetune-all + linear + ce + instance"
    # on the command line: exit 2 and one line naming the flag, before anything is read
    res = CliRunner().invoke(app, ["finetune", "-d", "split", "--root", str(split_dataset[0]), "--split-file",
                                   f"train={split_dataset[1]['train']}", "-m", "vlmcache-tiny", "-p", "none",
                                   "--device", "cpu", "--runs-dir", str(tmp_path), "--tail-blocks", "1"])  # fmt: skip
    assert res.exit_code == 2 and "--tune must be one of adapter, lora, full, none" in res.output, res.output
    assert "Traceback" not in res.output and not list(tmp_path.iterdir())
