"""Fine-tuning with the tiny tower: what trains, kill and resume, re-extraction, DistributedDataParallel."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run
from typer.testing import CliRunner

from vlmcache import atomic, cache
from vlmcache.cli import app
from vlmcache.encoders import load_encoder
from vlmcache.errors import VlmcacheError
from vlmcache.finetune import finetune
from vlmcache.finetune_config import FinetuneConfig
from vlmcache.runs import evaluate_run
from vlmcache.train import load_run, train_head
from vlmcache.train_config import TrainConfig


def _cfg(tmp_path, **kw):
    base = dict(
        dataset="digits_lt",
        model="vlmcache-tiny",
        pretrained="none",
        epochs=1,
        batch_size=64,
        lr=1e-3,
        head_lr=1e-2,
        workers=0,
        device="cpu",
        runs_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
    )
    return FinetuneConfig(**{**base, **kw})


def _tuned(result) -> dict:
    return torch.load(result["weights"], weights_only=True)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k, v in after.items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("tune", ["all", "last", "norms"])
def test_only_the_chosen_parameters_change(tmp_path, tune):
    before = load_encoder("vlmcache-tiny", "none", "cpu").model.state_dict()
    result = finetune(_cfg(tmp_path, tune=tune))
    changed = _changed(before, _tuned(result))
    visual = {k for k in before if k.startswith("visual.")}
    if tune == "all":
        assert changed == visual
    elif tune == "last":  # the last of two blocks, the final norm and the projection
        assert changed == {
            k for k in visual if k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post."))
        } | {"visual.proj"}
    else:
        assert changed == {k for k in visual if k.endswith("bias") or ".ln_" in k}
        assert "visual.transformer.resblocks.0.attn.in_proj_bias" in changed
    assert changed <= visual  # the text tower never trains
    head = torch.load(f"{result['run']}/head.pt", weights_only=True)
    assert head["head"] == "linear" and head["num_classes"] == 10


def test_fine_tuning_lowers_the_loss(tmp_path):
    result = finetune(_cfg(tmp_path, epochs=4, crop_scale=(0.5, 1.0)))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.95 * losses[0], losses
    assert result["cost"]["tuned_tower_params"] > 0 and set(result["metrics"]) >= {"overall", "many", "few"}
    # a finished run is not run again by accident
    with pytest.raises(VlmcacheError, match="exists already"):
        finetune(_cfg(tmp_path, epochs=4, crop_scale=(0.5, 1.0)))


def test_gradient_checkpointing_changes_memory_not_the_result(tmp_path):
    plain = finetune(_cfg(tmp_path, out=str(tmp_path / "plain")))
    ckpt = finetune(_cfg(tmp_path, out=str(tmp_path / "ckpt"), grad_checkpointing=True))
    assert ckpt["metrics"] == plain["metrics"]
    wa, wb = _tuned(plain), _tuned(ckpt)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def _cli(tmp_path, *extra):
    return [
        sys.executable, "-m", "vlmcache", "finetune", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none",
        "--epochs", "3", "--lr", "1e-3", "--head-lr", "1e-2", "--device", "cpu", "--json",
        "--cache-dir", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


def test_a_killed_fine_tune_resumes_from_its_last_checkpoint_and_equals_an_uninterrupted_one(tmp_path):
    ref = run(_cli(tmp_path, "--out", str(tmp_path / "ref"), "--workers", "0"))
    assert ref.returncode == 0, ref.stderr
    killed = run(_cli(tmp_path, "--out", str(tmp_path / "run"), "--workers", "0"), VLMCACHE_FAULT="epoch_saved:2")
    assert killed.returncode == -9
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = run(_cli(tmp_path, "--out", str(tmp_path / "run"), "--workers", "2"))  # loader workers do not matter
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after epoch 2" in resumed.stderr
    a, b = json.loads(ref.stdout), json.loads(resumed.stdout)
    assert a["metrics"] == b["metrics"]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    wa, wb = _tuned(a), _tuned(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # spent once the run is finished


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    killed = run(_cli(tmp_path, "--out", str(tmp_path / "run"), "--workers", "0"), VLMCACHE_FAULT="epoch_saved:1")
    assert killed.returncode == -9
    other = run(_cli(tmp_path, "--out", str(tmp_path / "run"), "--workers", "0", "--loss", "focal"))
    assert other.returncode == 2 and "checkpoint of other settings" in other.stderr


def test_reextraction_writes_a_new_cache_that_stage_2_trains_on(tmp_path, digits_cache):
    result = finetune(_cfg(tmp_path, reextract=True))
    base = next((digits_cache / "digits_lt").iterdir())
    new = tmp_path / "cache" / "digits_lt" / result["cache"]["key"]
    assert new.is_dir() and new.name != base.name
    assert new.name.startswith("vlmcache-tiny__file-" + atomic.sha256_file(result["weights"])[:12])
    fp_new = cache.SplitCache(new / "train").fingerprint["encoder"]
    fp_base = cache.SplitCache(base / "train").fingerprint["encoder"]
    assert fp_new["weights_sha256"] and fp_new["weights_sha256"] != fp_base.get("weights_sha256")
    pooled_new, pooled_base = cache.SplitCache(new / "train").pooled(), cache.SplitCache(base / "train").pooled()
    assert pooled_new.shape == pooled_base.shape and not np.array_equal(pooled_new, pooled_base)
    head = train_head(
        TrainConfig(
            dataset="digits_lt",
            model="vlmcache-tiny",
            cache_dir=str(tmp_path / "cache"),
            cache_key=new.name,
            runs_dir=str(tmp_path / "runs"),
            device="cpu",
            epochs=2,
        )
    )
    assert 0 <= head["metrics"]["overall"] <= 1
    again = evaluate_run(result["run"])  # `vlmcache eval` of a fine-tuning run rebuilds its tuned tower
    assert again["metrics"] == result["metrics"]
    assert evaluate_run(result["run"], logit_adjust=1.0)["metrics"] != result["metrics"]
    with pytest.raises(VlmcacheError, match="is a fine-tuning run") as refused:
        load_run(result["run"], torch.device("cpu"))
    assert f"--pretrained {Path(result['run']) / Path(result['weights']).name} " in str(refused.value)
    config = Path(result["run"]) / "config.json"
    meta = json.loads(config.read_text())
    meta["train_counts"] = meta["train_counts"][::-1]  # hand-edited: many and few swapped
    config.write_text(json.dumps(meta))
    with pytest.raises(VlmcacheError, match="config.json' records .* training images for class 0"):
        evaluate_run(result["run"])


def test_two_processes_under_torchrun_equal_one_with_twice_the_batch(tmp_path):
    one = run(_cli(tmp_path, "--out", str(tmp_path / "one"), "--workers", "0", "--epochs", "2", "-b", "64"))
    two = run(
        _cli(tmp_path, "--out", str(tmp_path / "two"), "--workers", "0", "--epochs", "2", "-b", "32", "--nproc", "2",
             "--reextract")
    )  # fmt: skip
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    w0 = load_encoder("vlmcache-tiny", "none", "cpu").model.state_dict()
    wa = torch.load(next((tmp_path / "one").glob("*-ft-*.pt")), weights_only=True)
    wb = torch.load(next((tmp_path / "two").glob("*-ft-*.pt")), weights_only=True)
    # the same samples, crops and mean gradient per step: the updates agree up to float summation order
    # (Adam's normalisation magnifies that on near-zero gradients, so compare whole updates, not elements)
    da = torch.cat([(wa[k] - w0[k]).flatten() for k in wa if k.startswith("visual.")])
    db = torch.cat([(wb[k] - w0[k]).flatten() for k in wa if k.startswith("visual.")])
    assert float((da - db).norm() / da.norm()) < 1e-3  # 7e-5 measured; another seed: 1.6
    # both processes took part in the re-extraction (one alone would wait for the other forever)
    new = json.loads(two.stdout)["cache"]["path"]
    assert cache.read_manifest(Path(new) / "train")["complete"]


def test_bad_settings_are_named(tmp_path):
    for kw, match in [
        (dict(tune="first"), "Choose one of: all, last, norms"),
        (dict(tune="last", last_k=5), "the tower has 2 blocks"),
        (dict(head="decoder"), "Choose one of: linear, cosine"),
        (dict(text_init="photo"), "use --head cosine"),
        (dict(crop_scale=(0.9, 0.5)), "--crop-scale"),
    ]:
        with pytest.raises(VlmcacheError, match=match):
            finetune(_cfg(tmp_path, **kw))
    res = CliRunner().invoke(
        app, ["finetune", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none", "--loss", "focall"]
    )
    assert res.exit_code == 2 and "did you mean 'focal'" in res.output.lower()
    res = CliRunner().invoke(app, ["finetune", "-d", "digits_lt", "-m", "vlmcache-tiny", "-p", "none", "--nproc", "0"])
    assert res.exit_code == 2 and "--nproc must be at least 1" in res.output


def test_a_cosine_head_starts_as_the_zero_shot_classifier(tmp_path):
    from vlmcache.datasets import load_dataset
    from vlmcache.templates import get_templates

    result = finetune(_cfg(tmp_path, head="cosine", text_init="photo", lr=1e-12, head_lr=1e-12))
    head = torch.load(f"{result['run']}/head.pt", weights_only=True)["head_state"]
    encoder = load_encoder("vlmcache-tiny", "none", "cpu")
    classnames = load_dataset("digits_lt", None, {}, None).classnames
    text = encoder.encode_classnames(classnames, get_templates("photo"))
    torch.testing.assert_close(head["classifier.weight"], text, rtol=0, atol=1e-6)
    assert float(head["classifier.log_scale"].exp()) == pytest.approx(float(encoder.model.logit_scale.exp()))


def test_protocol_seed_for_fine_tuning_resolves_and_trains(tmp_path):
    cfg = FinetuneConfig(dataset="digits_lt", protocol="seed", loss="grw").resolve()
    assert (cfg.optimizer, cfg.nesterov, cfg.head_lr, cfg.weight_decay) == ("sgd", True, 0.03, 5e-4)
    assert (cfg.warmup_iters, cfg.schedule, cfg.lr) == (512, "seed_cosine", 1e-5)  # the seed never tunes the tower
    assert cfg.loss_params == {"reduction": "weighted_mean"}
    assert cfg.sampler_params == {"replacement": False, "num_samples": 65536}
    run = finetune(
        _cfg(tmp_path, protocol="seed", tune="norms", warmup_iters=2, sampler_params={"num_samples": 128}),
        log=lambda *a: None,
    )
    saved = json.loads((Path(run["run"]) / "config.json").read_text())["config"]
    assert saved["protocol"] == "seed" and saved["optimizer"] == "sgd" and saved["lr"] == 1e-3  # explicit wins
    assert run["history"][0]["lr"] > 0 and len(run["history"]) == 1


def test_training_workers_are_started_once_per_run_and_give_each_epoch_what_no_workers_give(split_dataset):
    """The loader's workers live across epochs (forked once: a worker forked anew each epoch shares the trainer's
    memory copy-on-write and slowed CPU training by a third), while each epoch's items, their order and their
    seeded crops are set in the main process: two workers give, epoch by epoch, the batches that none give."""
    import os

    from vlmcache.datasets import load_dataset
    from vlmcache.finetune_data import AugmentedRows, EpochBatches, training_loader

    root, files = split_dataset
    split = load_dataset("split", str(root), {"train": str(files["train"])}, None).split("train")
    transform = load_encoder("vlmcache-tiny", "none", "cpu").train_transform()
    rng = np.random.default_rng(0)
    first = rng.permutation(len(split))[:20]
    orders = {1: first, 2: first, 3: rng.permutation(len(split))[:20]}

    def epochs(workers: int) -> tuple[list, set]:
        batches = EpochBatches(6)
        loader = training_loader(AugmentedRows(split, transform, seed=4), batches, workers, False)
        seen, pids = [], set()
        for epoch, order in orders.items():
            batches.set_epoch(epoch, order, np.arange(len(order)))
            seen.append([(b["rows"], b["images"]) for b in loader])
            if workers:
                pids.add(tuple(sorted(w.pid for w in loader._iterator._workers)))
        return seen, pids

    alone, _ = epochs(0)
    together, pids = epochs(2)
    assert len(pids) == 1 and os.getpid() not in pids.pop()  # the same two workers served all three epochs
    for one, two, order in zip(alone, together, orders.values(), strict=True):
        assert torch.cat([r for r, _ in one]).tolist() == order.tolist()
        for (r1, x1), (r2, x2) in zip(one, two, strict=True):
            assert torch.equal(r1, r2) and torch.equal(x1, x2)
    assert not torch.equal(alone[0][0][1], alone[1][0][1])  # the same rows in epochs 1 and 2, cropped anew


def test_the_training_workers_end_with_training(tmp_path, monkeypatch):
    """No training worker outlives the epochs: evaluation and re-extraction run beside none of them."""
    import multiprocessing

    from vlmcache import finetune as ft

    alive = []
    real = ft._finish

    def spy(*args, **kwargs):
        alive.extend(p for p in multiprocessing.active_children() if p.is_alive())
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "_finish", spy)
    finetune(_cfg(tmp_path, workers=2, epochs=2), log=lambda *a: None)
    assert alive == []
