"""A new user's first hour: defaults that learn, commands that find their cache, several image folders side by
side, where the data comes from, a report to trust, ablate's pre-flight and one vocabulary of flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import torch
import typer
from conftest import write_feature_cache, write_split_dataset
from typer.testing import CliRunner

from vlmcache import choices
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.heads import build_head, full_head_params, upgrade_head_file
from vlmcache.loop import train_epochs
from vlmcache.plots import plot_per_class
from vlmcache.tables import _cell, detail_table, summarize
from vlmcache.train import train_head
from vlmcache.train_config import TrainConfig

runner = CliRunner()


# --------------------------------------------------------------------------- defaults that learn


def _quiet(*_):
    pass


@pytest.mark.parametrize("loss", choices.LOSSES)
def test_default_train_head_learns_on_the_demo_cache_for_every_loss(digits_cache, tmp_path, loss):
    """Nothing but the loss given: the linear head standardises its inputs and the default protocol trains at
    least 2,000 steps, so the demo's 568 images are learnt (10 classes: chance is 10%)."""
    cfg = TrainConfig(dataset=None, loss=loss, cache_dir=str(digits_cache), runs_dir=str(tmp_path), device="cpu")
    result = train_head(cfg, log=_quiet)
    assert result["metrics"]["overall"] > 0.4, result["metrics"]
    assert result["history"][-1]["step"] >= 2000


def test_default_cosine_head_learns_and_text_init_keeps_zero_shot_at_step_0(digits_cache, tmp_path):
    cfg = TrainConfig(dataset=None, head="cosine", cache_dir=str(digits_cache), runs_dir=str(tmp_path), device="cpu")
    assert train_head(cfg, log=_quiet)["metrics"]["overall"] > 0.4
    assert cfg.head_params == {"normalize": "standardize"}
    text = TrainConfig(dataset="digits_lt", head="cosine", text_init="openai").resolve()
    assert text.head_params == {"normalize": "none"}  # raw inputs: the text-initialised head is zero-shot


def test_the_step_floor_applies_to_the_protocol_length_only():
    cfg = TrainConfig(dataset="d").resolve()
    assert (cfg.epochs, cfg.min_steps) == (30, 2000)
    assert train_epochs(cfg, 3) == 667  # 568 rows in batches of 256: 3 steps an epoch
    assert train_epochs(cfg, 453) == 30  # ImageNet-LT: 13,590 steps, above the floor
    explicit = TrainConfig(dataset="d", epochs=5).resolve()
    assert explicit.min_steps == 0 and train_epochs(explicit, 3) == 5
    assert TrainConfig(dataset="d", protocol="seed").resolve().min_steps == 0
    with pytest.raises(VlmcacheError, match="min-steps"):
        TrainConfig(dataset="d", min_steps=-1).resolve()


def test_head_files_from_before_the_default_change_rebuild_as_they_were_trained():
    """head.pt recorded only the user's settings: a linear head then normalised with l2 and a cosine head had no
    input buffers. Upgraded, both give the logits they gave."""
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    for name, normalize in (("linear", "l2"), ("cosine", "none")):
        trained = build_head(name, 8, 3, normalize=normalize)
        state = {k: v for k, v in trained.state_dict().items() if name == "linear" or k not in ("shift", "scale")}
        old = {"head": name, "head_params": {}, "head_state": state}
        new = upgrade_head_file(old)
        rebuilt = build_head(name, 8, 3, **new["head_params"])
        rebuilt.load_state_dict(new["head_state"])
        torch.testing.assert_close(rebuilt(x), trained(x))
    assert full_head_params("linear", {})["normalize"] == "standardize"
    assert upgrade_head_file({"head": "decoder", "head_params": {}, "head_state": {}})["head_params"] == {}


# --------------------------------------------------------------------------- commands find their cache


def test_train_head_zero_shot_and_knn_need_no_dataset_with_one_cache(digits_cache, tmp_path):
    common = ["--cache-dir", str(digits_cache), "--device", "cpu", "--json"]
    trained = runner.invoke(app, ["train-head", "--loss", "focal", "--runs-dir", str(tmp_path), *common])
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout)
    config = json.loads((Path(result["run"]) / "config.json").read_text())["config"]
    assert (config["dataset"], config["model"], config["pretrained"]) == ("digits_lt", "vlmcache-tiny", "random")
    for command in (["zero-shot"], ["knn", "--k", "5"]):
        out = runner.invoke(app, [*command, *common])
        assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["dataset"] == "digits_lt"
    again = runner.invoke(app, ["eval", result["run"], "--device", "cpu", "--json"])
    assert json.loads(again.stdout)["metrics"]["overall"] == pytest.approx(result["metrics"]["overall"])


def test_several_caches_are_listed_as_flags_and_missing_ones_suggest_what_exists(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2
    for key in ("ViT-B-16__openai__00000001", "ViT-L-14__openai__00000002"):
        write_feature_cache(tmp_path, "places_lt", {"train": (x, y, None), "test": (x, y, None)}, 2, key=key)
    several = runner.invoke(app, ["train-head", "--cache-dir", str(tmp_path)])
    assert several.exit_code == 2 and "Several caches" in several.output
    assert "-d places_lt -m ViT-B-16 -p openai" in several.output
    assert "-d places_lt -m ViT-L-14 -p openai" in several.output
    assert "Traceback" not in several.output
    missing = runner.invoke(app, ["train-head", "-d", "inat18", "--cache-dir", str(tmp_path)])
    text = missing.output.replace("\n", " ")
    assert missing.exit_code == 2 and "Caches there: -d places_lt -m ViT-B-16 -p openai" in text
    assert text.index("Caches there") < text.index("vlmcache extract --dataset inat18")
    chosen = runner.invoke(
        app, ["zero-shot", "-m", "ViT-L-14", "--templates", "photo", "--cache-dir", str(tmp_path), "--json"]
    )
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.stdout)["cache"].endswith("ViT-L-14__openai__00000002")


# --------------------------------------------------------------------------- several image folders


def test_two_image_folders_are_cached_side_by_side(tmp_path):
    caches = tmp_path / "cache"
    for name in ("birds", "cars"):
        root = tmp_path / name
        write_split_dataset(root, {"train": [6, 3], "test": [2, 2]}, seed=len(name))
        args = ["extract", "-d", "imagefolder", "--root", str(root / "images"), "--cache-dir", str(caches)]
        args += ["-m", "vlmcache-tiny", "-p", "random", "--device", "cpu", "--workers", "0", "--json"]
        if name == "cars":
            args += ["--name", "cars"]
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.output
    # birds: named after its root folder ("images"), cars by --name
    assert sorted(p.name for p in caches.iterdir()) == ["cars", "images"]
    trained = runner.invoke(
        app, ["train-head", "-d", "cars", "--cache-dir", str(caches), "--runs-dir", str(tmp_path / "runs"),
              "--epochs", "1", "--device", "cpu", "--json"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert Path(json.loads(trained.stdout)["run"]).name.startswith("cars__")
    bad = runner.invoke(app, ["extract", "-d", "imagefolder", "--root", str(tmp_path), "--name", "places_lt"])
    assert bad.exit_code == 2 and "built-in dataset" in bad.output


def test_default_names_of_user_image_sets():
    from vlmcache.extract import cache_name

    assert cache_name("imagefolder", "/data/birds", None) == "birds"
    assert cache_name("split", "/data/places_lt", None) == "split-places_lt"  # never a benchmark's folder
    assert cache_name("places_lt", "/data/x", None) == "places_lt"
    with pytest.raises(VlmcacheError, match="plain folder name"):
        cache_name("imagefolder", "/data/x", "../up")
    with pytest.raises(VlmcacheError, match="--name names the caches"):
        cache_name("inat18", "/data/x", "mine")


# --------------------------------------------------------------------------- where the data comes from


def test_datasets_info_and_missing_images_say_where_the_data_comes_from(tmp_path):
    info = runner.invoke(app, ["datasets", "info", "inat18", "--json"])
    source = json.loads(info.stdout)["data_source"]
    assert "github.com/visipedia/inat_comp" in source and "train2018.json" in source
    assert "ROOT/train_val2018/" in source  # the layout, from the shipped split file's first line
    for name, needle in (("imagenet_lt", "image-net.org"), ("places_lt", "places2.csail.mit.edu")):
        out = runner.invoke(app, ["extract", "-d", name, "--root", str(tmp_path), "-m", "vlmcache-tiny"])
        assert out.exit_code == 2 and needle in out.output and "Traceback" not in out.output
    nothing = runner.invoke(app, ["extract", "-d", "inat18", "-m", "vlmcache-tiny"])
    assert nothing.exit_code == 2 and "inat_comp" in nothing.output


# --------------------------------------------------------------------------- a report to trust


def test_report_cells_keep_a_zero_std_and_the_full_table_is_in_percent():
    assert _cell(0.5, 0.0) == "50.0 ± 0.0" and _cell(0.5, float("nan")) == "50.0"
    table = pd.DataFrame(
        {
            "dataset": "d", "model": "m", "pretrained": "p", "method": ["a", "a"], "seed": [0, 1],
            "status": "done", "overall": [0.5, 0.5], "many": 0.9, "medium": 0.5, "few": 0.1, "top5": 1.0,
            "mean_per_class": 0.5, "train_seconds": [13170.0, 13170.0], "peak_rss_mb": [812.0, 812.0],
        }
    )  # fmt: skip
    detail = detail_table(summarize(table))
    assert detail["overall (%)"].tolist() == ["50.0 ± 0.0"]
    assert detail["training loop (s)"].tolist() == ["13,170.00"]
    assert "e+" not in detail.to_markdown(index=False)


def test_peak_memory_is_each_runs_own(digits_cache, tmp_path):
    """In a fresh process (this one's malloc settings may have been changed by the commands other tests ran): 1,000
    MB touched and freed before the run is the process's peak, not the run's."""
    code = (
        "import sys, numpy as np\n"
        "from vlmcache.memory import current_rss_mb\n"
        "from vlmcache.train import train_head\n"
        "from vlmcache.train_config import TrainConfig\n"
        "before = current_rss_mb()\n"
        "big = np.ones(1000 * 2**20 // 8); del big\n"
        "cfg = TrainConfig(dataset=None, cache_dir=sys.argv[1], runs_dir=sys.argv[2], device='cpu', epochs=1)\n"
        "cost = train_head(cfg, log=lambda *a: None)['cost']\n"
        "print(before, cost['peak_rss_mb'], cost['peak_rss_scope'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(digits_cache), str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    before, peak, scope = res.stdout.split()
    assert scope == "run"
    assert float(peak) < float(before) + 600  # the run's own: its imports and steps (about 400 MB here)


def test_keep_heap_is_set_on_glibc_and_leaves_a_users_malloc_settings_alone():
    """memory.keep_heap (set by `extract` and `finetune` on a CPU): in force in a fresh process on glibc, not when
    the user set MALLOC_ variables of their own."""
    import os
    import platform

    code = "from vlmcache.memory import keep_heap_on_cpu; print(keep_heap_on_cpu('cpu'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert plain.stdout.strip() == str(platform.libc_ver()[0] == "glibc")
    own = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "MALLOC_MMAP_MAX_": "65536"},
        check=True,
    )  # fmt: skip
    assert own.stdout.strip() == "False"


def test_per_class_plot_has_a_panel_per_method_at_a_thousand_classes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    counts = np.maximum(5, 1280 * np.exp(-np.arange(1000) / 180)).astype(int)
    rows = []
    for m in range(11):
        run = tmp_path / f"run{m}"
        run.mkdir()
        acc = np.random.default_rng(m).uniform(size=1000)
        pd.DataFrame({"class": range(1000), "train_count": counts, "accuracy": acc}).to_csv(run / "per_class.csv")
        rows.append({"method": f"method {m}", "status": "done", "run": str(run)})
    panels = []
    monkeypatch.setattr(plt, "close", lambda fig: panels.append(sum(ax.get_visible() for ax in fig.axes)))
    assert plot_per_class(pd.DataFrame(rows), tmp_path / "pc.png")
    assert panels == [11] and (tmp_path / "pc.png").stat().st_size > 0


# --------------------------------------------------------------------------- ablate's pre-flight


def _pipeline(tmp_path: Path, dataset: str = "digits_lt") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"datasets: [{dataset}]\nmodels: [{{model: vlmcache-tiny, pretrained: random}}]\nseeds: [0]\n"
        f"cache_dir: {tmp_path / 'cache'}\nruns_dir: {tmp_path / 'runs'}\n"
        "defaults: {epochs: 1, device: cpu}\n"
        "methods:\n  - {name: CE, loss: ce}\n  - {name: dec, head: decoder, loss: ce}\n"
    )
    return path


def test_ablate_stops_before_the_first_run_when_a_cache_is_missing(tmp_path):
    out = runner.invoke(app, ["ablate", str(_pipeline(tmp_path, "places_lt"))])
    text = out.output.replace("\n", " ")
    assert out.exit_code == 2 and "no run was started" in text
    assert "vlmcache extract --dataset places_lt --model vlmcache-tiny --pretrained random --tokens" in text
    assert not (tmp_path / "runs" / "results.csv").exists()
    dry = runner.invoke(app, ["ablate", str(_pipeline(tmp_path, "places_lt")), "--dry-run", "--json"])
    assert json.loads(dry.stdout)["missing_caches"][0].startswith("vlmcache extract --dataset places_lt")
    refused = runner.invoke(app, ["ablate", str(_pipeline(tmp_path, "places_lt")), "--extract"])
    assert refused.exit_code == 2 and "need your images" in refused.output


def test_ablate_extract_makes_the_built_in_cache_then_runs(tmp_path):
    out = runner.invoke(app, ["ablate", str(_pipeline(tmp_path)), "--extract", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["status"] == {"done": 2}
    results = pd.read_csv(tmp_path / "runs" / "results.csv")
    assert set(results["pretrained"]) == {"random"}  # as the cache key says, whatever alias the file used


# --------------------------------------------------------------------------- one vocabulary of flags


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_flags_mean_one_thing_everywhere():
    root = typer.main.get_command(app)
    seen: dict[str, set] = {}
    for path, cmd in _commands(root):
        for p in cmd.params:
            if isinstance(p, click.Option) and p.is_flag and p.opts != ["--help"]:
                assert p.secondary_opts, f"{' '.join(path)} {p.opts[0]} has no --no- form"
            for opt in getattr(p, "opts", []):
                seen.setdefault(opt, set()).add(p.name)
    assert seen["--out"] == {"out_dir"}  # one run's own folder, wherever it appears
    assert seen["--runs-dir"] == {"runs_dir"} and seen["--split"] == {"split"} and seen["--splits"] == {"splits"}
    assert "--workers" in seen and all(
        p.default is None for _, c in _commands(root) for p in c.params if p.name == "workers"
    )


def test_version_and_help_import_nothing_heavy():
    assert runner.invoke(app, ["--version"]).stdout.startswith("vlmcache ")
    code = "import sys; import vlmcache.cli; print(sorted(m for m in ('torch', 'open_clip', 'faiss', 'pandas') if m in sys.modules))"  # noqa: E501
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_help_choices_are_the_registries():
    from vlmcache.datasets import DATASETS
    from vlmcache.heads import HEADS
    from vlmcache.losses import LOSSES
    from vlmcache.recipe import PROTOCOLS
    from vlmcache.samplers import SAMPLERS
    from vlmcache.stage2 import STAGE2
    from vlmcache.templates import TEMPLATE_SETS

    for names, registry in (
        (choices.DATASETS, DATASETS), (choices.LOSSES, LOSSES), (choices.HEADS, HEADS),
        (choices.SAMPLERS, SAMPLERS), (choices.STAGE2, STAGE2), (choices.TEMPLATE_SETS, TEMPLATE_SETS),
        (choices.PROTOCOLS, PROTOCOLS),
    ):  # fmt: skip
        assert names == tuple(registry)
