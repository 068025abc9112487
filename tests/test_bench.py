"""One smoke run of the benchmark command at toy sizes, so that it cannot rot. Benchmarks assert no times."""

import json

from typer.testing import CliRunner

from vlmcache.cli import app


def test_bench_smoke_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    result = CliRunner().invoke(app, ["bench", "--scale", "smoke", "--markdown", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert {e["tokens"] for e in body["extraction"]} == {False, True}
    for row in body["extraction"] + body["loop"]:
        assert row["ratio"] > 0
    assert body["token_read"]["warm"]["ratio"] > 0 and body["token_read"]["cold"]["ratio"] > 0
    assert [d["decode"].split()[0] for d in body["decode"]] == ["pil", "draft", "gpu"]
    assert [c["head"] for c in body["cached_vs_streaming"]] == ["linear", "decoder"]
    assert all(c["limit_speedup"] >= 1 and c["stream_epoch_s"] > 0 for c in body["cached_vs_streaming"])
    assert [c["classes"] for c in body["prompts"]["chunked"]] == [100, 400]
    assert body["prompts"]["unchunked_mb_per_class"] > 0
    assert body["finetune"]["ratio"] > 0 and body["finetune"]["tuned_params"] > 0
    assert [e["k"] for e in body["tail"]["epochs"]] == [1, 2]
    assert all(
        e["limit_speedup"] >= 1 and e["prefix_bytes_per_image_view"] == 17 * 64 * 2 for e in body["tail"]["epochs"]
    )
    assert body["tail"]["disk"][0]["gb_per_view"] == round(115_846 * 197 * 768 * 2 / 1e9, 1)
    assert all(body["memory"][k]["peak_rss_mb"] > 0 for k in ("train_head_linear_1_epoch", "zero_shot", "knn_k20"))
    assert {"none", "gzip-4"} <= set(body["cache_size"]["codecs"])
    assert [p["outputs"].split()[0] for p in body["pipeline"]] == ["pooled", "tokens"]
    assert all(p["ratio"] > 0 and p["slowest_stage"] in ("loader", "encoder", "writer") for p in body["pipeline"])
    assert body["grouped"]["pooled"]["runs"] == 27 and body["grouped"]["tokens"]["grouped_train_passes"] > 0
    text = out.read_text()
    for heading in (
        "## Machine",
        "## 1. Extraction",
        "## 1b. The extraction pipeline at GPU rates",
        "## 2. Stage-2 loop",
        "## 2b. An ablation grid trained as a group",
        "## 3. Cached against streaming",
        "## 3b. Prompt tuning memory",
        "## 3c. Fine-tuning",
        "## 3d. Tail tuning from a cached prefix",
        "## 4. Memory",
        "## 5. Cache size",
        "## 6. GPU",
    ):
        assert heading in text
    bad = CliRunner().invoke(app, ["bench", "--scale", "huge", "--markdown", str(out)])
    assert bad.exit_code == 2 and "Choose one of: smoke, default, full" in bad.output


def test_only_replaces_its_sections_and_keeps_the_rest():
    from vlmcache.bench import splice

    md = "# t\n\nintro\n\n## Machine\n\nm\n\n## 2. Loop\n\nold 2\n\n## 3. X\n\nx\n"
    r = {"scale": "smoke", "date": "today", "only": ["grouped"]}
    once = splice(md, [["## 2b. Grouped", "", "first"]], r)
    assert once.index("## 2. Loop") < once.index("## 2b. Grouped") < once.index("## 3. X")
    assert "old 2" in once and "intro" in once and "--only grouped` on today" in once
    twice = splice(once, [["## 2b. Grouped", "", "second"]], r)
    assert "second" in twice and "first" not in twice and twice.count("## 2b.") == 1
    early = splice(md, [["## 1b. Early", "", "e"]], r)
    assert early.index("## Machine") < early.index("## 1b.") < early.index("## 2.")


def test_only_help_names_every_section():
    from vlmcache.bench import SECTIONS

    text = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "400"}).output
    assert all(name in text for name in SECTIONS), [name for name in SECTIONS if name not in text]
