"""Grouped training: a run trained in a group equals the same run trained alone, bit for bit on the CPU."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import long_tailed_features, write_feature_cache

from vlmcache.features import BlockReader, Tokens, block_order
from vlmcache.group import make_groups, train_group
from vlmcache.train import train_head
from vlmcache.train_config import TrainConfig

KEY = "vlmcache-tiny__random__00000000"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [150, 60, 20, 6], dim=12)
    xt, yt = long_tailed_features(np.random.default_rng(0), [20, 20, 20, 20], dim=12)
    tok = np.stack([x, x * 0.5, -x], 1)  # (N, 3, 12): a class token and two others
    tok_t = np.stack([xt, xt * 0.5, -xt], 1)
    write_feature_cache(
        root, "synth", {"train": (x, y, tok), "val": (xt, yt, tok_t), "test": (xt, yt, tok_t)}, 4, 32, KEY
    )
    return root


FIRST = [  # every loss, both pooled heads, the samplers, the schedule, post-hoc corrections, selection, decoders
    *[
        {"loss": loss}
        for loss in ("ce", "focal", "cbw", "cb", "balanced_softmax", "grw", "lade", "ldam", "logit_adjust")
    ],
    {"loss": "ce", "sampler": "class_balanced"},
    {"loss": "ce", "sampler": "sqrt", "sampler_params": {"replacement": False}, "batch_size": 48},
    {"loss": "ce", "tau_norm": 1.0, "logit_adjust": 1.0, "select_on": "val"},
    {"loss": "ldam", "head": "cosine"},
    {"loss": "ce", "head": "cosine", "text_init": "photo", "optimizer": "adamw", "lr": 0.001},
    {"loss": "ce", "iters": 7, "warmup_iters": 3},
    {"loss": "balanced_softmax", "head": "decoder", "head_params": {"depth": 1}},
    {"loss": "ce", "head": "decoder", "head_params": {"depth": 1}, "stream_tokens": True, "batch_size": 40},
    {"loss": "focal", "head": "decoder", "head_params": {"depth": 1}, "stream_tokens": True, "seed": 3},
]


def _config(cache_dir: Path, runs_dir: Path, settings: dict) -> TrainConfig:
    base = {"dataset": "synth", "cache_dir": str(cache_dir), "runs_dir": str(runs_dir), "device": "cpu"}
    return TrainConfig(**{"epochs": 3, "lr": 0.01, "batch_size": 32, **base, **settings})


def _same_run(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    strip = ("seconds", "samples_per_s")
    assert [{k: v for k, v in h.items() if k not in strip} for h in a["history"]] == [
        {k: v for k, v in h.items() if k not in strip} for h in b["history"]
    ]
    assert a["selection"] == b["selection"]
    ha = torch.load(Path(a["run"]) / "head.pt", weights_only=True)
    hb = torch.load(Path(b["run"]) / "head.pt", weights_only=True)
    for part in ("head_state", "stage2_state"):
        assert (ha[part] is None) == (hb[part] is None)
        for k, v in (ha[part] or {}).items():
            assert torch.equal(v, hb[part][k]), (part, k)
    assert (Path(a["run"]) / "per_class.csv").read_text() == (Path(b["run"]) / "per_class.csv").read_text()


def test_a_group_trains_each_run_as_it_trains_alone(cache_dir, tmp_path):
    alone = [train_head(_config(cache_dir, tmp_path / "alone", s), log=lambda *_: None) for s in FIRST]
    cfgs = [_config(cache_dir, tmp_path / "grouped", s) for s in FIRST]
    assert len(make_groups(cfgs)) == 2  # pooled heads; decoders on tokens
    grouped = []
    for members in make_groups(cfgs):
        outcomes = train_group([cfgs[i] for i in members], log=lambda *_: None)
        assert all(o.error is None for o in outcomes), [o.trace for o in outcomes if o.error]
        grouped += [(i, o.result) for i, o in zip(members, outcomes, strict=True)]
    for i, result in grouped:
        _same_run(alone[i], result)
        assert result["cost"]["group_size"] > 1 and "group_size" not in alone[i]["cost"]

    # second stages on those first stages, grouped the same way
    stage2 = [("crt", 0), ("lws", 1), ("disalign", 13), ("marc", 15)]
    alone2 = [
        train_head(_config(cache_dir, tmp_path / "alone", {"stage2": s, "from_run": alone[f]["run"], "dataset": None}))
        for s, f in stage2
    ]
    by_index = dict(grouped)
    cfgs2 = [
        _config(cache_dir, tmp_path / "grouped", {"stage2": s, "from_run": by_index[f]["run"], "dataset": None})
        for s, f in stage2
    ]
    outcomes = train_group(cfgs2, log=lambda *_: None)
    for a, o in zip(alone2, outcomes, strict=True):
        assert o.error is None, o.trace
        _same_run(a, o.result)


def test_a_failing_run_drops_out_and_the_others_finish(cache_dir, tmp_path, monkeypatch):
    cfgs = [_config(cache_dir, tmp_path, {"loss": loss}) for loss in ("ce", "focal", "cb")]
    cfgs[1] = replace(cfgs[1], loss_params={"gamma": -1.0})  # refused when the loss is built
    cfgs[2] = replace(cfgs[2], lr=1e30)  # diverges during training
    done = []
    outcomes = train_group(cfgs, log=lambda *_: None, on_done=lambda i, o: done.append(i))
    assert outcomes[0].error is None and (Path(outcomes[0].result["run"]) / "metrics.json").is_file()
    assert "gamma" in str(outcomes[1].error)
    assert "loss became" in str(outcomes[2].error) or "NaN" in str(outcomes[2].error)
    assert sorted(done) == [0, 1, 2]
    assert len(list(tmp_path.glob("*/metrics.json"))) == 1  # nothing of the failed runs is published


def test_streamed_runs_of_a_group_read_each_block_once(cache_dir, tmp_path):
    from vlmcache import cache as cache_mod

    split = cache_mod.SplitCache(cache_dir / "synth" / KEY / "train")
    order = block_order(8, 2)
    assert sorted(order) == list(range(8)) and np.array_equal(order, block_order(8, 2))
    assert not np.array_equal(order, block_order(8, 3))

    reader = BlockReader(split, 32, keep=64)
    runs = []
    for seed in range(4):
        t = Tokens(split, torch.device("cpu"), in_memory=False, block_rows=32, window_blocks=2)
        t.blocks = reader
        runs.append((t, torch.Generator().manual_seed(seed)))
    seen = []
    for t, g in runs:
        t.set_epoch(0, 1)
        rows = torch.randperm(len(t), generator=g)
        seen.append(sum(len(y) for _, y in t.batches(rows, 16, g)))
    assert seen == [len(split)] * 4
    row_bytes = int(np.prod(split.token_shape())) * 2
    assert reader.bytes_read == len(split) * row_bytes  # four runs, one read of every row


def test_each_run_keeps_its_own_global_random_state(cache_dir, tmp_path, monkeypatch):
    """A component that draws from torch's global generator (dropout, a noisy loss) draws in a group what it
    draws alone: the group swaps each run's generator state in around its steps."""
    import vlmcache.train as train_mod

    real = train_mod.build_loss

    class Noisy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, logits, y):
            return self.inner(logits + torch.rand_like(logits), y)

    monkeypatch.setattr(train_mod, "build_loss", lambda *a, **k: Noisy(real(*a, **k)))
    settings = [{"loss": "ce", "seed": s} for s in (0, 1, 2)]
    alone = [train_head(_config(cache_dir, tmp_path / "alone", s), log=lambda *_: None) for s in settings]
    outcomes = train_group([_config(cache_dir, tmp_path / "grouped", s) for s in settings], log=lambda *_: None)
    for a, o in zip(alone, outcomes, strict=True):
        _same_run(a, o.result)


PIPELINE = """\
name: grouped
datasets: [synth]
models:
  - {model: vlmcache-tiny, pretrained: none}
seeds: [0, 1]
defaults: {epochs: 2, lr: 0.01, batch_size: 32}
methods:
  - {name: linear, loss: [ce, ldam]}
  - {name: cosine, head: cosine, loss: focal}
  - {name: decoder, head: decoder, head_params: {depth: 1}, loss: ce, stream_tokens: true}
  - {name: cRT, stage2: crt, from: decoder, epochs: 1}
"""


def test_ablate_groups_by_default_and_two_processes_give_the_same_table(cache_dir, tmp_path):
    """`ablate` (grouped), `--no-group` and `--nproc 2` (torchrun, gloo on the CPU) write the same results."""
    import pandas as pd
    from conftest import run

    from vlmcache.ablate import run_pipeline
    from vlmcache.pipeline import load_pipeline

    path = tmp_path / "grid.yaml"
    path.write_text(PIPELINE + f"cache_dir: {cache_dir}\n")
    pipe = load_pipeline(path)
    quiet = {"log": lambda *_: None}
    run_pipeline(pipe, str(tmp_path / "group"), **quiet)
    run_pipeline(pipe, str(tmp_path / "alone"), group=False, **quiet)
    res = run(
        [sys.executable, "-m", "vlmcache", "ablate", str(path), "--runs-dir", str(tmp_path / "two"), "--nproc", "2"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    tables = {name: pd.read_csv(tmp_path / name / "results.csv") for name in ("group", "alone", "two")}
    metrics = ["method", "seed", "status", "overall", "many", "medium", "few", "top5", "mean_per_class"]
    for name in ("alone", "two"):
        pd.testing.assert_frame_equal(tables["group"][metrics], tables[name][metrics])
    assert (tables["group"]["status"] == "done").all() and len(tables["group"]) == 2 * 5
    assert len(list((tmp_path / "two").glob("*/metrics.json"))) == 10  # both processes' runs, in one folder
    # resumed: every run is finished, nothing trains again
    assert (run_pipeline(pipe, str(tmp_path / "two"), **quiet)["status"] == "resumed").all()
    again = pd.read_csv(tmp_path / "two" / "results.csv")
    pd.testing.assert_frame_equal(again[metrics[3:]], tables["two"][metrics[3:]])
