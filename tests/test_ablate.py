"""Ablation grids end to end on a synthetic cache: resume, recorded failures, tables and report files."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import long_tailed_features, write_feature_cache
from PIL import Image
from typer.testing import CliRunner

from vlmcache.ablate import run_pipeline
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.pipeline import load_pipeline, shipped_pipelines
from vlmcache.planning import plan
from vlmcache.report import write_report
from vlmcache.tables import paper_table, summarize

KEY = "vlmcache-tiny__random__00000000"  # a synthetic cache filed under the tiny model, as extract would
PIPELINE = """\
name: small
datasets: [synth, synth_pooled]
models:
  - {model: vlmcache-tiny, pretrained: none}
seeds: [0, 1]
defaults: {epochs: 3, lr: 0.01, batch_size: 64}
methods:
  - {name: linear, head: linear, loss: [ce, balanced_softmax]}
  - {name: decoder, head: decoder, head_params: {depth: 1}, loss: ce}
  - {name: cRT, stage2: crt, from: decoder, epochs: 2}
"""


@pytest.fixture
def grid(tmp_path):
    rng = np.random.default_rng(0)
    x, y = long_tailed_features(rng, [200, 60, 10])
    xt, yt = long_tailed_features(np.random.default_rng(0), [30, 30, 30])
    tok, tok_t = np.repeat(x[:, None], 2, 1), np.repeat(xt[:, None], 2, 1)
    write_feature_cache(tmp_path / "cache", "synth", {"train": (x, y, tok), "test": (xt, yt, tok_t)}, 3, key=KEY)
    # the same data without tokens: the decoder fails there, and its cRT with it
    write_feature_cache(tmp_path / "cache", "synth_pooled", {"train": (x, y, None), "test": (xt, yt, None)}, 3, key=KEY)
    path = tmp_path / "small.yaml"
    path.write_text(PIPELINE + f"cache_dir: {tmp_path / 'cache'}\nruns_dir: {tmp_path / 'runs'}\n")
    return path


def test_a_grid_runs_resumes_records_failures_and_reports(grid, tmp_path):
    pipe = load_pipeline(grid)
    runs = plan(pipe)
    assert len(runs) == 2 * 2 * 4  # datasets x seeds x (2 linear + decoder + cRT)
    assert {r.method for r in runs} == {"linear[loss=ce]", "linear[loss=balanced_softmax]", "decoder", "cRT"}
    assert runs[-1].from_method == "decoder"  # second stages after the first stages they need

    table = run_pipeline(pipe)
    assert (tmp_path / "runs" / "results.csv").is_file()
    ok = table[table["dataset"] == "synth"]
    assert (ok["status"] == "done").all()
    failed = table[table["status"] == "failed"]
    assert set(failed["method"]) == {"decoder", "cRT"} and set(failed["dataset"]) == {"synth_pooled"}
    assert failed[failed["method"] == "decoder"]["error"].str.contains("pooled features only").all()
    assert failed[failed["method"] == "cRT"]["error"].str.contains("first stage 'decoder' failed").all()
    for column in (
        "loss",
        "sampler",
        "lr",
        "epochs",
        "head_params.depth",
        "overall",
        "many",
        "few",
        "top5",
        "mean_per_class",
        "train_seconds",
        "samples_per_s",
        "peak_rss_mb",
    ):
        assert column in table.columns, column

    heads = {r: (tmp_path / "runs" / r.split("/")[-1] / "head.pt").stat().st_mtime_ns for r in ok["run"]}
    again = run_pipeline(load_pipeline(grid))
    assert (again[again["dataset"] == "synth"]["status"] == "resumed").all()
    assert {r: (tmp_path / "runs" / r.split("/")[-1] / "head.pt").stat().st_mtime_ns for r in ok["run"]} == heads
    pd.testing.assert_series_equal(again["overall"], table["overall"])

    summary = summarize(again)
    row = summary[(summary["dataset"] == "synth") & (summary["method"] == "linear[loss=ce]")].iloc[0]
    overall = ok[ok["method"] == "linear[loss=ce]"]["overall"]
    assert row["seeds"] == 2 and row["overall_mean"] == pytest.approx(overall.mean())
    assert row["overall_std"] == pytest.approx(overall.std())

    result = write_report(tmp_path / "runs")
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "| method | synth many | synth medium | synth few | synth overall |" in report
    assert "## Failed runs" in report and "pooled features only" in report
    assert set(result["plots"]) == {"per_class", "shots", "cost"}
    for png in result["plots"].values():
        with Image.open(png) as img:
            img.verify()
            assert img.format == "PNG"
        assert f"]({png.split('/')[-1]})" in report


def test_paper_table_layout():
    summary = pd.DataFrame(
        {
            "dataset": ["a", "a", "b"],
            "model": ["m"] * 3,
            "pretrained": ["p"] * 3,
            "method": ["CE", "BS", "CE"],
            **{f"{g}_mean": [0.5, 0.6, 0.7] for g in ("many", "medium", "few", "overall")},
            **{f"{g}_std": [0.01, 0.0, np.nan] for g in ("many", "medium", "few", "overall")},
        }
    )
    lines = paper_table(summary).splitlines()
    assert lines[0] == ("| method | a many | a medium | a few | a overall | b many | b medium | b few | b overall |")
    assert lines[2] == "| CE | 50.0 ± 1.0 | 50.0 ± 1.0 | 50.0 ± 1.0 | 50.0 ± 1.0 | 70.0 | 70.0 | 70.0 | 70.0 |"
    assert lines[3] == "| BS | 60.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 | - | - | - | - |"  # seeds agreed


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            ("  - {name: decoder, head: decoder", "  - {name: decoder, hed: decoder"),
            "line 9: unknown key 'hed' in a method",
        ),
        (("seeds: [0, 1]", "seeds: [0, 1]\nsedes: [2]"), "line 6: unknown key 'sedes' in the pipeline"),
        (("defaults: {epochs: 3", "defaults: {epoch: 3"), "line 6: unknown key 'epoch' in defaults"),
        (("from: decoder", "from: decodr"), "'from: decodr' names no method above it"),
        (("loss: [ce, balanced_softmax]", "loss: [ce, balance]"), "The loss 'balance' is unknown"),
        (("pretrained: none", "pretrained: openai"), "'openai' is not a pretrained tag of vlmcache-tiny"),
        (
            ("{name: cRT, stage2: crt, from: decoder, epochs: 2}", "{name: cRT, stage2: crt, epochs: 2}"),
            "'stage2' and 'from' together",
        ),
        (("name: small", "name: small\n  bad: [indent"), "not valid YAML"),
        (("name: small", "name: !!python/object/apply:os.system [echo hacked]"), "not valid YAML"),
    ],
)
def test_bad_pipelines_name_the_key_and_line(tmp_path, edit, message):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace(*edit))
    with pytest.raises(VlmcacheError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_pipeline(path)


@pytest.mark.parametrize("name", sorted(shipped_pipelines()))
def test_every_shipped_pipeline_validates(name):
    result = CliRunner().invoke(app, ["ablate", f"pipelines/{name}.yaml", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert runs and all({"dataset", "model", "seed", "method"} <= set(r) for r in runs)
    text = shipped_pipelines()[name].read_text()
    assert "vlmcache extract" in text  # says which cache it needs and how to make it


def test_paper_pipelines_hold_the_seed_papers_settings():
    stage1 = load_pipeline("paper_stage1")
    got = {(m.settings.get("loss"), m.settings.get("sampler", "instance")) for m in stage1.methods}
    assert got == {
        ("ce", "instance"),
        ("ce", "class_balanced"),
        ("cbw", "instance"),
        ("focal", "instance"),
        ("balanced_softmax", "instance"),
        ("grw", "instance"),
        ("lade", "instance"),
        ("ldam", "instance"),
    }
    assert stage1.defaults["head"] == "decoder"
    stage2 = {m.settings.get("stage2"): m.settings for m in load_pipeline("paper_stage2").methods}
    assert stage2["crt"]["sampler"] == stage2["lws"]["sampler"] == "class_balanced"
    assert stage2["disalign"]["loss"] == stage2["marc"]["loss"] == "grw"
    assert len(load_pipeline("backbones").models) >= 5


def test_ablate_and_report_from_the_cli(grid, tmp_path):
    runner = CliRunner()
    refused = runner.invoke(app, ["ablate", str(grid), "--json"])  # pre-flight: the decoder needs tokens
    assert refused.exit_code == 2 and "has no tokens for the decoder" in refused.output
    assert not (tmp_path / "runs" / "results.csv").exists()
    # tokens of width 6, which 4 attention heads do not divide: the decoder runs now fail at run time
    shutil.rmtree(tmp_path / "cache" / "synth_pooled")
    x, y = long_tailed_features(np.random.default_rng(0), [200, 60, 10])
    tok = np.zeros((len(y), 2, 6), np.float32)
    write_feature_cache(tmp_path / "cache", "synth_pooled", {"train": (x, y, tok), "test": (x, y, tok)}, 3, key=KEY)
    result = runner.invoke(app, ["ablate", str(grid), "--json"])
    assert result.exit_code == 1, result.output  # failures are recorded, the grid goes on, the exit code says so
    body = json.loads(result.stdout)
    assert body["status"] == {"done": 12, "failed": 4}
    table = runner.invoke(app, ["ablate", str(grid)])
    assert table.exit_code == 1 and "| method |" in table.stdout and "runs: 12 resumed, 4 failed." in table.stdout
    rep = runner.invoke(app, ["report", str(tmp_path / "runs")])
    assert rep.exit_code == 0 and "report.md" in rep.stdout
    # the report's files are replaced whole (temporary name, rename), never written into: a file elsewhere that
    # shares one of them (a hard link) keeps its bytes, and a reader never sees half a file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    written = ["report.md", "summary.csv"]
    written += [p.name for p in (tmp_path / "runs").glob("*.png")]
    assert any(name.endswith(".png") for name in written)
    for name in written:
        os.link(tmp_path / "runs" / name, elsewhere / name)
    before = {name: (elsewhere / name).read_bytes() for name in written}
    assert runner.invoke(app, ["report", str(tmp_path / "runs")]).exit_code == 0
    assert {name: (elsewhere / name).read_bytes() for name in written} == before
    assert all((tmp_path / "runs" / name).stat().st_nlink == 1 for name in written)
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_a_tail_head_in_a_grid_needs_a_prefix_cache_and_extract_makes_it(tmp_path, monkeypatch):
    """The pre-flight knows the tail head reads a prefix: a cache without one is missing (the command names the
    model entry's tail_blocks and views), and --extract makes it with them."""
    from vlmcache import planning

    cache_dir = tmp_path / "cache"
    x, y = long_tailed_features(np.random.default_rng(0), [20, 8, 4])
    write_feature_cache(cache_dir, "digits_lt", {"train": (x, y, None), "test": (x, y, None)}, 3,
                        key="vlmcache-tiny__random__00000000")  # fmt: skip
    path = tmp_path / "tail.yaml"
    path.write_text(
        f"datasets: [digits_lt]\ncache_dir: {cache_dir}\nmodels:\n"
        "  - {model: vlmcache-tiny, pretrained: random, cache_key: vlmcache-tiny__random__00000000, tail_blocks: 1, "
        "views: 2}\nmethods:\n  - {name: lin, head: linear}\n  - {name: tail, head: tail, tune: lora}\n"
    )
    (missing,) = planning.missing_caches(load_pipeline(path))
    assert missing.prefix and "no prefix for the tail head" in missing.reason
    assert "--tail-blocks 1 --views 2 --overwrite" in missing.command(str(cache_dir))
    made = []
    monkeypatch.setattr("vlmcache.extract.run_extract", lambda cfg, **kw: made.append(cfg))
    planning.extract_missing(load_pipeline(path), [missing])
    assert (made[0].tail_blocks, made[0].views, made[0].overwrite) == (1, 2, True)
    path.write_text(path.read_text().replace(", tail_blocks: 1", ""))  # no K to extract with: said, not guessed
    with pytest.raises(VlmcacheError, match="add tail_blocks"):
        planning.extract_missing(load_pipeline(path), planning.missing_caches(load_pipeline(path)))
