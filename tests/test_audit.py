"""The audit's cases (numbers a user reads that were wrong), each reproduced as it was found."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import long_tailed_features, make_image, write_feature_cache

from vlmcache import runs
from vlmcache.ablate import run_pipeline
from vlmcache.encoders import load_encoder
from vlmcache.errors import VlmcacheError
from vlmcache.finetune_config import FinetuneConfig
from vlmcache.finetune_data import finetune_dataset
from vlmcache.heads import build_head
from vlmcache.metrics import Evaluator
from vlmcache.pipeline import load_pipeline
from vlmcache.recipe import make_optimizer, param_groups
from vlmcache.stage2 import build_stage2
from vlmcache.tables import collect_runs, paper_table, summarize
from vlmcache.train import evaluate_run, load_run, train_head
from vlmcache.train_config import TrainConfig

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit")
    x, y = long_tailed_features(np.random.default_rng(0), [120, 60, 30, 12, 6, 3], noise=1.2)
    xt, yt = long_tailed_features(np.random.default_rng(0), [20] * 6, noise=1.2)
    write_feature_cache(d, "synth", {"train": (x, y, None), "test": (xt, yt, None)}, 6, shard_size=64)
    return d


def _cfg(cache_dir, runs_dir, **kw) -> TrainConfig:
    base = dict(
        dataset="synth",
        model="synthetic",
        pretrained="random",
        cache_dir=str(cache_dir),
        runs_dir=str(runs_dir),
        device="cpu",
        epochs=3,
        lr=1e-2,
        batch_size=32,
    )
    return TrainConfig(**{**base, **kw})


# 1. report merged different configurations and called them seeds


def test_report_keeps_runs_that_differ_in_any_setting_apart(cache_dir, tmp_path):
    runs_dir = tmp_path / "runs"
    for kw in (
        dict(loss="focal", loss_params={"gamma": 0.0}),
        dict(loss="focal", loss_params={"gamma": 5.0}),
        dict(loss="focal", loss_params={"gamma": 0.0}, logit_adjust=1.0),
        dict(loss="focal", loss_params={"gamma": 0.0}, seed=1),  # the only true second seed
    ):
        train_head(_cfg(cache_dir, runs_dir, **kw), **QUIET)
    summary = summarize(collect_runs(runs_dir))
    assert len(summary) == 3
    assert sorted(summary["seeds"]) == [1, 1, 2]
    labels = " | ".join(summary["method"])
    assert "loss_params.gamma=5.0" in labels and "logit_adjust=1.0" in labels


# 2. the paper table dropped a row when one model had two sets of weights


def test_paper_table_has_a_row_per_model_and_weights():
    table = pd.DataFrame(
        [
            dict(
                dataset="d",
                model="ViT-B-32",
                pretrained=p,
                method="CE",
                seed=0,
                status="done",
                run=None,
                overall=acc,
                many=acc,
                medium=acc,
                few=acc,
            )
            for p, acc in (("openai", 0.40), ("laion2b", 0.50))
        ]
    )
    markdown = paper_table(summarize(table))
    assert "CE (ViT-B-32 openai)" in markdown and "40.0" in markdown
    assert "CE (ViT-B-32 laion2b)" in markdown and "50.0" in markdown


# 3. a second stage's cost left out its frozen-feature pass


def test_a_second_stage_reports_its_feature_pass_and_the_total_with_its_first_stage(cache_dir, tmp_path, monkeypatch):
    import time

    from vlmcache import train

    first = train_head(_cfg(cache_dir, tmp_path), **QUIET)
    real = train._build_model

    def slow_build(*args, **kwargs):  # the frozen pass made at least 20 ms long: its time must reach the cost
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "_build_model", slow_build)
    second = train_head(_cfg(cache_dir, tmp_path, dataset=None, stage2="crt", from_run=first["run"]), **QUIET)
    cost = second["cost"]
    assert cost["features_seconds"] >= 0.02  # on a fast machine the tiny pass alone rounds to 0.000 s
    parts = cost["train_seconds"] + cost["features_seconds"] + cost["load_seconds"] + cost["eval_seconds"]
    assert cost["total_seconds"] >= parts * 0.99
    assert cost["first_stage_seconds"] == first["cost"]["total_seconds"]
    assert cost["total_with_first_stage_seconds"] == pytest.approx(cost["total_seconds"] + cost["first_stage_seconds"])


# 4. --tau-norm saved the normalised classifier; logit adjustment the other way round


def test_post_hoc_corrections_are_recorded_and_applied_at_evaluation_once(cache_dir, tmp_path):
    run = train_head(_cfg(cache_dir, tmp_path / "tau", tau_norm=1.0), **QUIET)
    _, model, _ = load_run(run["run"], torch.device("cpu"))
    norms = model.head.classifier.weight.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # the trained head, not the normalised one
    assert evaluate_run(run["run"], device="cpu")["metrics"] == run["metrics"]
    assert evaluate_run(run["run"], tau_norm=1.0, device="cpu")["metrics"] == run["metrics"]  # not twice
    untuned = evaluate_run(run["run"], tau_norm=0.0, device="cpu")  # 0 turns it off... bias is dropped though
    assert untuned["tau_norm"] == 0.0
    adjusted = train_head(_cfg(cache_dir, tmp_path / "la", logit_adjust=1.0), **QUIET)
    assert evaluate_run(adjusted["run"], device="cpu")["metrics"] == adjusted["metrics"]
    assert evaluate_run(adjusted["run"], logit_adjust=1.0, device="cpu")["metrics"] == adjusted["metrics"]


# 5. fine-tuning's seed picked the held-out test split


def test_fine_tuning_seeds_share_one_test_split(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            make_image(rng, i).save(tmp_path / "imgs" / c / f"{i}.png")
    tests = [
        finetune_dataset(FinetuneConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), seed=s))
        .splits["test"]
        .source.relpaths
        for s in (0, 1, 2)
    ]
    assert tests[0] == tests[1] == tests[2]
    other = finetune_dataset(FinetuneConfig(dataset="imagefolder", root=str(tmp_path / "imgs"), holdout_seed=1))
    assert other.splits["test"].source.relpaths != tests[0]  # the hold-out has its own seed


# 6. ablate labelled a second stage with the default head


def test_ablate_records_a_second_stage_with_its_first_stages_head(tmp_path):
    x, y = long_tailed_features(np.random.default_rng(0), [60, 30, 10])
    key = "ViT-B-16__openai__00000001"
    write_feature_cache(tmp_path / "cache", "synth", {"train": (x, y, None), "test": (x, y, None)}, 3, key=key)
    path = tmp_path / "p.yaml"
    path.write_text(
        f"cache_dir: {tmp_path / 'cache'}\ndatasets: [synth]\n"
        f"models: [{{model: ViT-B-16, pretrained: openai, cache_key: {key}}}]\n"
        "defaults: {epochs: 2, device: cpu}\n"
        "methods:\n  - {name: cos, head: cosine}\n  - {name: cRT, stage2: crt, from: cos}\n"
    )
    table = run_pipeline(load_pipeline(path), str(tmp_path / "runs"), **QUIET)
    crt = table[table["method"] == "cRT"].iloc[0]
    assert crt["status"] == "done" and crt["head"] == "cosine" and "cosine" in Path(crt["run"]).name
    assert json.loads((Path(crt["run"]) / "config.json").read_text())["config"]["head"] == "cosine"


# 7. top-5 was 1.0 whenever there were 5 classes or fewer


def test_top5_is_none_at_five_classes_or_fewer():
    logits = torch.randn(40, 5)
    labels = torch.randint(0, 5, (40,))
    ev = Evaluator(np.full(5, 10))
    ev.update(logits, labels)
    assert ev.compute()[0]["top5"] is None
    ev = Evaluator(np.full(6, 10))
    ev.update(torch.randn(40, 6), labels)
    assert 0 <= ev.compute()[0]["top5"] <= 1


# 8. fine-tuning ignored normalize=standardize | center_l2


@pytest.mark.parametrize("normalize", ["standardize", "center_l2"])
def test_fine_tuning_refuses_input_statistics_it_cannot_keep(normalize):
    with pytest.raises(VlmcacheError, match="normalize=l2 or none"):
        FinetuneConfig(dataset="digits_lt", head_params={"normalize": normalize}).resolve()


# 9. weight decay reached biases, norms, scales


def test_weight_decay_reaches_matrices_only():
    head = build_head("linear", 8, 4)
    cosine = build_head("cosine", 8, 4)
    lws = build_stage2("lws", head.classifier)
    for module in (head, cosine, lws):
        params = [p for p in module.parameters() if p.requires_grad]
        decayed = {id(p) for g in param_groups(params, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert (id(p) in decayed) == (p.ndim >= 2), name
    # an AdamW step with zero gradients: only decay moves parameters, and it moves the weight matrix alone
    cfg = TrainConfig(dataset="x", lr=0.1, weight_decay=0.5)
    params = list(head.parameters())
    before = [p.detach().clone() for p in params]
    opt = make_optimizer(cfg, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    weight, bias = head.classifier.weight, head.classifier.bias
    assert torch.allclose(weight, before[[id(p) for p in params].index(id(weight))] * (1 - 0.1 * 0.5))
    assert torch.equal(bias, before[[id(p) for p in params].index(id(bias))])


# 10. no horizontal flip anywhere


def test_augmented_views_include_mirrored_images():
    from PIL import Image

    encoder = load_encoder("vlmcache-tiny", "none", device="cpu")
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :8] = 255  # a bright band on the left only
    img = Image.fromarray(arr)
    transform = encoder.train_transform(scale=(1.0, 1.0))  # the whole image: only the flip varies
    views = []
    for seed in range(16):
        torch.manual_seed(seed)
        views.append(transform(img))
    left_bright = [bool(v[:, :, :8].mean() > v[:, :, -8:].mean()) for v in views]
    assert any(left_bright) and not all(left_bright)
    assert "RandomHorizontalFlip" in repr(transform) and "bicubic" in repr(transform)


# double corrections


def test_double_corrections_are_warned_naming_both(cache_dir, tmp_path):
    said = []
    train_head(_cfg(cache_dir, tmp_path, loss="balanced_softmax", logit_adjust=1.0, epochs=1), log=said.append)
    train_head(_cfg(cache_dir, tmp_path, loss="grw", sampler="class_balanced", epochs=1), log=said.append)
    assert any("balanced_softmax" in s and "--logit-adjust" in s for s in said)
    assert any("'grw'" in s and "'class_balanced'" in s for s in said)


def test_run_identity_ignores_the_seed_and_where_things_go_only():
    a = {"head": "linear", "loss": "ce", "seed": 0, "runs_dir": "x", "lr": 0.1, "loss_params": {}}
    assert runs.identity_key(a) == runs.identity_key({**a, "seed": 3, "runs_dir": "y", "device": "cuda"})
    assert runs.identity_key(a) != runs.identity_key({**a, "lr": 0.2})
    assert runs.identity_key(a) != runs.identity_key({**a, "loss_params": {"gamma": 1}})


# 11. cache keys depended on names, not content


def test_the_cache_key_is_the_weights_content_and_resolved_settings(tmp_path, monkeypatch):
    import open_clip
    from open_clip import pretrained

    same = dict(url="", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", resize_mode="squash")
    monkeypatch.setitem(pretrained._PRETRAINED, "vlmcache-tiny", {"a": dict(same), "b": dict(same)})
    net = open_clip.create_model("vlmcache-tiny")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    first = load_encoder("vlmcache-tiny", str(tmp_path / "w.pt"), device="cpu", preprocess_from="a")
    (tmp_path / "w.pt").rename(tmp_path / "renamed.pt")
    renamed = load_encoder("vlmcache-tiny", str(tmp_path / "renamed.pt"), device="cpu", preprocess_from="b")
    assert renamed.key == first.key  # another file name, another tag of identical settings: the same cache
    from vlmcache.features import weights_label

    assert first.key.split("__")[1] == weights_label(str(tmp_path / "renamed.pt"))  # find_cache finds it


# 12. the fingerprint missed the model config, the batch size and the device's math


def test_an_edited_model_config_is_another_key(monkeypatch):
    import copy

    from open_clip import factory

    before = load_encoder("vlmcache-tiny", "none", device="cpu").key
    edited = copy.deepcopy(factory._MODEL_CONFIGS["vlmcache-tiny"])
    edited["vision_cfg"]["layers"] += 1
    monkeypatch.setitem(factory._MODEL_CONFIGS, "vlmcache-tiny", edited)
    assert load_encoder("vlmcache-tiny", "none", device="cpu").key != before


def test_a_resume_with_another_batch_size_is_refused_naming_it(tmp_path):
    from vlmcache.extract import ExtractConfig, run_extract

    cfg = dict(
        dataset="digits_lt",
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
        cache_dir=str(tmp_path),
        splits=["test"],
    )
    summary = run_extract(ExtractConfig(**cfg, batch_size=64), **QUIET)
    split = Path(summary["splits"][0]["path"])
    fingerprint = json.loads((split / "manifest.json").read_text())["fingerprint"]
    assert fingerprint["batch_size"] == 64 and fingerprint["device"] == "cpu" and "tf32" in fingerprint
    with pytest.raises(VlmcacheError, match="batch_size: 64 -> 32"):
        run_extract(ExtractConfig(**cfg, batch_size=32), **QUIET)
