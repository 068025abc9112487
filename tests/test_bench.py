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
    assert body["token_read"]["ratio"] > 0
    assert [c["head"] for c in body["cached_vs_streaming"]] == ["linear", "decoder"]
    assert all(c["limit_speedup"] >= 1 and c["stream_epoch_s"] > 0 for c in body["cached_vs_streaming"])
    assert [c["classes"] for c in body["prompts"]["chunked"]] == [100, 400, 800]
    assert body["prompts"]["unchunked_mb_per_class"] > 0
    assert body["finetune"]["ratio"] > 0 and body["finetune"]["tuned_params"] > 0
    assert all(body["memory"][k]["peak_rss_mb"] > 0 for k in ("train_head_linear_1_epoch", "zero_shot", "knn_k20"))
    assert {"none", "gzip-4"} <= set(body["cache_size"]["codecs"])
    text = out.read_text()
    for heading in (
        "## Machine",
        "## 1. Extraction",
        "## 2. Stage-2 loop",
        "## 3. Cached against streaming",
        "## 3b. Prompt tuning memory",
        "## 3c. Fine-tuning",
        "## 4. Memory",
        "## 5. Cache size",
        "## 6. GPU",
    ):
        assert heading in text
    bad = CliRunner().invoke(app, ["bench", "--scale", "huge", "--markdown", str(out)])
    assert bad.exit_code == 2 and "Choose one of: smoke, default, full" in bad.output
