"""Image paths in the cache; export to parquet and clip-retrieval's layout, read back with pyarrow and numpy;
import from them; a round trip is exact."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_feature_cache
from typer.testing import CliRunner

from vlmcache import cache, text_cache
from vlmcache.cli import app
from vlmcache.datasets import load_dataset
from vlmcache.errors import VlmcacheError
from vlmcache.exchange import export_cache, import_embeddings

QUIET = {"log": lambda *_: None}


def _model_dir(cache_dir: Path) -> Path:
    return next((cache_dir / "digits_lt").iterdir())


def _split(model_dir: Path, name: str) -> cache.SplitCache:
    return cache.SplitCache(model_dir / name)


def test_shards_store_each_rows_image_path(digits_cache):
    model_dir = _model_dir(digits_cache)
    dataset = load_dataset("digits_lt")
    for name in ("train", "test"):
        split = _split(model_dir, name)
        rows = split.rows()
        assert split.paths() == [dataset.split(name).source.describe(int(r)) for r in rows]
    res = CliRunner().invoke(app, ["cache", "info", str(model_dir), "--paths", "2", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)["paths"]["train"]
    assert [r["path"] for r in listed] == _split(model_dir, "train").paths()[:2]


def test_a_cache_without_paths_still_reads_and_exports(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)).astype(np.float32), np.arange(50) % 3
    model_dir = write_feature_cache(tmp_path, "old", {"train": (x, y, None)}, 3)
    split = _split(model_dir, "train")
    assert split.paths() is None and len(split.pooled()) == 50
    export_cache(model_dir, "parquet", tmp_path / "out", **QUIET)
    t = pq.read_table(tmp_path / "out" / "train.parquet")
    assert t.column("path").null_count == 50 and t.column("label").to_pylist() == y.tolist()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parquet_export_reads_back_as_the_cache_and_imports_exactly(digits_cache, tmp_path, dtype):
    model_dir = _model_dir(digits_cache)
    export_cache(model_dir, "parquet", tmp_path / "pq", dtype=dtype, **QUIET)
    names = text_cache.read_text(model_dir / text_cache.TEXT_FILE).classnames
    for name in ("train", "test"):
        split = _split(model_dir, name)
        f = pq.ParquetFile(tmp_path / "pq" / f"{name}.parquet")
        assert f.num_row_groups == len(split.shards)  # written piece by piece (a shard is smaller than a piece)
        t = f.read()
        assert t.schema.field("pooled").type == pa.list_(getattr(pa, dtype)(), split.pooled().shape[1])
        assert t.column("row").to_pylist() == split.rows().tolist()
        assert t.column("path").to_pylist() == split.paths()
        assert t.column("label").to_pylist() == split.labels().tolist()
        assert t.column("class_name").to_pylist() == [names[i] for i in split.labels()]
        pooled = np.stack(t.column("pooled").to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(pooled.astype(np.float16), split.pooled())

        result = import_embeddings(
            "parquet", tmp_path / "pq" / f"{name}.parquet", "digits_again", name, tmp_path / "imported", **QUIET
        )
        back = _split(Path(result["cache"]), name)
        np.testing.assert_array_equal(back.pooled(), split.pooled())
        np.testing.assert_array_equal(back.labels(), split.labels())
        assert back.paths() == split.paths()
        assert back.fingerprint["imported"] and back.fingerprint["encoder"]["imported_from"]["source"] == "parquet"


def test_clip_retrieval_layout_round_trips_and_trains_a_head(digits_cache, tmp_path):
    model_dir = _model_dir(digits_cache)
    runner = CliRunner()
    args = ["export", str(model_dir), "--format", "npy-raw", "--out", str(tmp_path / "npy"), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for name in ("train", "test"):
        split = _split(model_dir, name)
        folder = tmp_path / "npy" / name
        embs = [np.load(folder / "img_emb" / f"img_emb_{i}.npy") for i in range(len(split.shards))]
        metas = [pq.read_table(folder / "metadata" / f"metadata_{i}.parquet") for i in range(len(split.shards))]
        np.testing.assert_array_equal(np.concatenate(embs).astype(np.float16), split.pooled())
        assert [p for m in metas for p in m.column("image_path").to_pylist()] == split.paths()

    imported = tmp_path / "imported"
    for name in ("train", "test"):
        args = ["import", str(tmp_path / "npy" / name), "--from", "clip-retrieval", "-d", "digits_cr"]
        res = runner.invoke(app, [*args, "--split", name, "--cache-dir", str(imported), "--json"])
        assert res.exit_code == 0, res.output
        back = _split(Path(json.loads(res.stdout)["cache"]), name)
        split = _split(model_dir, name)
        np.testing.assert_array_equal(back.pooled(), split.pooled())
        assert back.paths() == split.paths() and back.labels().tolist() == split.labels().tolist()

    common = ["-d", "digits_cr", "--cache-dir", str(imported), "--device", "cpu", "--json"]
    res = runner.invoke(app, ["train-head", *common, "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["metrics"]["overall"] > 0.3  # 10 classes: well above chance
    res = runner.invoke(app, ["knn", *common, "--k", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["zero-shot", *common])
    assert res.exit_code != 0 and "no class-text embeddings" in res.output
    res = runner.invoke(app, ["cache", "verify", "--repair", str(imported / "digits_cr")])
    assert "imported" in res.output and "Traceback" not in res.output


def test_a_hand_made_clip_retrieval_folder_imports_with_a_labels_file(tmp_path):
    """clip-retrieval writes float16 img_emb_N.npy and metadata_N.parquet with image_path only."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "clip_out"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    paths, all_emb = [], []
    for i, n in enumerate((7, 5)):
        emb = rng.normal(size=(n, 16)).astype(np.float16)
        names = [f"imgs/{i}_{j}.jpg" for j in range(n)]
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", emb)
        pq.write_table(pa.table({"image_path": names}), folder / "metadata" / f"metadata_{i}.parquet")
        paths += names
        all_emb.append(emb)
    labels = {p: k % 3 for k, p in enumerate(paths)}
    (tmp_path / "labels.txt").write_text("".join(f"{p} {y}\n" for p, y in labels.items()))
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")

    with pytest.raises(VlmcacheError, match="no label column"):
        import_embeddings("clip-retrieval", folder, "mine", "train", tmp_path / "c", **QUIET)
    out = import_embeddings(
        "clip-retrieval", folder, "mine", "train", tmp_path / "c", tmp_path / "labels.txt", tmp_path / "names.txt",
        model="ViT-B-32", **QUIET,
    )  # fmt: skip
    split = _split(Path(out["cache"]), "train")
    np.testing.assert_array_equal(split.pooled(), np.concatenate(all_emb))
    assert split.labels().tolist() == list(labels.values()) and split.paths() == paths
    assert text_cache.read_text(Path(out["cache"]) / text_cache.TEXT_FILE).classnames == ["cat", "dog", "bird"]
    assert Path(out["cache"]).name.startswith("ViT-B-32__imported__")

    (tmp_path / "labels.txt").write_text("".join(f"{p} {y}\n" for p, y in list(labels.items())[:-1]))
    with pytest.raises(VlmcacheError, match="no label in"):
        import_embeddings("clip-retrieval", folder, "mine", "val", tmp_path / "c", tmp_path / "labels.txt", **QUIET)
    (folder / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(VlmcacheError, match="do not pair up"):
        import_embeddings("clip-retrieval", folder, "mine", "val", tmp_path / "c", **QUIET)
    with pytest.raises(VlmcacheError, match="not a clip-retrieval"):
        import_embeddings("clip-retrieval", tmp_path, "mine", "val", tmp_path / "c", **QUIET)


_EXPORT_PEAK = """
import json, sys
from pathlib import Path
from vlmcache.exchange import export_cache
from vlmcache.memory import peak_rss_mb, reset_peak
# a first, small export: what pyarrow and h5py set up once is not the export's per-row memory
export_cache(Path(sys.argv[4]), sys.argv[2], Path(sys.argv[3]) / "warm", log=lambda *_: None)
reset_peak()
before = peak_rss_mb()
export_cache(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), log=lambda *_: None)
print(json.dumps({"growth_mb": peak_rss_mb() - before}))
"""


@pytest.mark.parametrize("fmt", ["parquet", "npy-raw"])
def test_export_memory_is_bounded_by_a_shard(tmp_path, fmt):
    """A 98 MB float16 cache (196 MB as float32 in the files) exports with a peak far below its size."""
    rows, dim = 100_000, 512
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(rows, dim)).astype(np.float16)
    model_dir = write_feature_cache(tmp_path, "big", {"train": (pooled, np.arange(rows) % 10, None)}, 10, 8192)
    small = write_feature_cache(tmp_path, "small", {"train": (pooled[:2000], np.arange(2000) % 10, None)}, 10, 8192)
    del pooled
    res = subprocess.run(
        [sys.executable, "-c", _EXPORT_PEAK, str(model_dir), fmt, str(tmp_path / "out"), str(small)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    growth = json.loads(res.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 40, f"export grew the process by {growth} MB for a {rows * dim * 4 / 2**20:.0f} MB float32 output"


def _agrees(path: Path, metrics: dict, split: cache.SplitCache) -> pa.Table:
    """A predictions file covers the split's rows in order and gives back the reported overall and top-5."""
    t = pq.read_table(path)
    assert t.column("row").to_pylist() == split.rows().tolist()
    assert t.column("path").to_pylist() == split.paths()
    assert t.column("label").to_pylist() == split.labels().tolist()
    correct = np.asarray(t.column("correct").to_pylist())
    assert correct.mean() == pytest.approx(metrics["overall"], abs=1e-12)
    topk = np.stack(t.column("topk").to_numpy(zero_copy_only=False))
    scores = np.stack(t.column("topk_scores").to_numpy(zero_copy_only=False))
    hit = (topk == split.labels()[:, None]) & np.isfinite(scores)  # -inf: a class no kNN neighbour voted for
    assert hit.any(1).mean() == pytest.approx(metrics["top5"], abs=1e-12)
    assert (np.diff(np.nan_to_num(scores, neginf=-1e38), axis=1) <= 0).all()  # best first
    assert t.column("pred").to_pylist() == topk[:, 0].tolist()
    return t


def test_predictions_files_agree_with_the_reported_metrics(digits_cache, tmp_path):
    model_dir = _model_dir(digits_cache)
    test = _split(model_dir, "test")
    runner = CliRunner()
    common = ["--cache-dir", str(digits_cache), "--device", "cpu", "--json"]

    args = ["train-head", *common, "--epochs", "3", "--runs-dir", str(tmp_path), "--save-predictions"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout)
    _agrees(Path(run["run"]) / "predictions.parquet", run["metrics"], test)

    res = runner.invoke(
        app, ["eval", run["run"], "--logit-adjust", "1.0", "--device", "cpu", "--json", "--save-predictions"]
    )
    assert res.exit_code == 0, res.output
    evaluated = json.loads(res.stdout)
    _agrees(Path(evaluated["predictions"]), evaluated["metrics"], test)

    for command in (["zero-shot"], ["knn", "--k", "5"]):
        out = tmp_path / f"{command[0]}.parquet"
        res = runner.invoke(app, [*command, *common, "--save-predictions", str(out)])
        assert res.exit_code == 0, res.output
        _agrees(out, json.loads(res.stdout)["metrics"], test)


def test_predictions_at_8142_classes_are_written_chunk_by_chunk(tmp_path):
    from vlmcache.zeroshot import zero_shot

    rng = np.random.default_rng(0)
    classes, rows = 8142, 9000
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    write_feature_cache(tmp_path, "inat_like", {"test": (x, y, None)}, classes, 4096)
    out = tmp_path / "p.parquet"
    result = zero_shot(str(tmp_path), "inat_like", None, None, templates="photo", device="cpu", predictions=str(out))
    f = pq.ParquetFile(out)
    assert f.num_row_groups == 9 and f.metadata.num_rows == rows  # one per 1,024-row chunk: top-5 only in memory
    assert np.mean(f.read().column("correct").to_pylist()) == pytest.approx(result["metrics"]["overall"])


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_run_logs_hold_the_per_epoch_history(digits_cache, tmp_path, kind):
    import pandas as pd

    args = ["train-head", "--cache-dir", str(digits_cache), "--device", "cpu", "--json", "--epochs", "3"]
    res = CliRunner().invoke(app, [*args, "--runs-dir", str(tmp_path), "--select-on", "test", "--log", kind])
    assert res.exit_code == 0, res.output
    run = json.loads(res.stdout)
    history = run["history"]
    logs = Path(run["run"]) / "logs"
    assert not (tmp_path / ".logs" / Path(run["run"]).name).exists()  # moved into the finished run
    if kind == "csv":
        table = pd.read_csv(logs / "epochs.csv")
        assert table["step"].tolist() == [h["step"] for h in history]
        assert table["loss"].tolist() == pytest.approx([h["loss"] for h in history], rel=1e-12)
        assert table["select_score"].tolist() == pytest.approx([h["select_score"] for h in history])
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    assert {"train/loss", "train/lr", "test/accuracy"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [h["step"] for h in history]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)  # stored as float32
    assert [e.value for e in events.Scalars("test/accuracy")] == pytest.approx([h["select_score"] for h in history])


def test_an_unknown_log_kind_is_refused():
    res = CliRunner().invoke(app, ["train-head", "-d", "x", "--log", "wandb"])
    assert res.exit_code == 2 and "--log" in res.output and "tensorboard" in res.output


def _write_shards(root: Path, split_file: Path, folder: Path, per_shard: int, name: str) -> list[str]:
    """The split file's images as webdataset tar shards (webdataset's own TarWriter), in split-file order."""
    import webdataset as wds

    lines = [line.rsplit(maxsplit=1) for line in split_file.read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, lo in enumerate(range(0, len(lines), per_shard)):
        shards.append(f"{name}-{s:03d}.tar")
        with wds.TarWriter(str(folder / shards[-1])) as sink:
            for k, (rel, label) in enumerate(lines[lo : lo + per_shard]):
                ext = rel.rsplit(".", 1)[1]
                sink.write({"__key__": f"sample{lo + k:05d}", ext: (root / rel).read_bytes(), "cls": label})
    return shards


def test_a_webdataset_extraction_equals_the_split_file_extraction(split_dataset, tmp_path):
    from vlmcache.extract import ExtractConfig, run_extract

    root, files = split_dataset
    common = {"model": "vlmcache-tiny", "pretrained": "none", "device": "cpu", "workers": 0, "shard_size": 16}
    run_extract(
        ExtractConfig(dataset="split", root=str(root), name="ref", split_files={k: str(v) for k, v in files.items()},
                      cache_dir=str(tmp_path / "ref"), **common), **QUIET,
    )  # fmt: skip
    n = {s: _write_shards(root, files[s], tmp_path / "wds", 20, s) for s in files}
    assert len(n["train"]) == 3  # 47 training images in shards of 20
    # a bad sample: bytes that are no image, with a label; extraction skips it with a reason
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "wds" / "test-001.tar")) as sink:
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "cls": "1"})
    shards = ["train=train-{000..002}.tar", "test=test-{000..001}.tar"]
    res = CliRunner().invoke(
        app,
        ["extract", "-d", "wds", "--root", str(tmp_path / "wds"), "--name", "mine", "--cache-dir", str(tmp_path / "w"),
         "-m", "vlmcache-tiny", "-p", "none", "--device", "cpu", "--workers", "0", "--shard-size", "16", "--json",
         *[a for s in shards for a in ("--shards", s)]],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ref_dir = next((tmp_path / "ref" / "ref").iterdir())
    wds_dir = next((tmp_path / "w" / "mine").iterdir())
    for split in ("train", "test"):
        a, b = _split(ref_dir, split), _split(wds_dir, split)
        good = b.rows() < len(a)  # the broken sample is the test split's last row, skipped
        np.testing.assert_array_equal(b.rows()[good], a.rows())
        np.testing.assert_array_equal(b.labels(), a.labels())
        np.testing.assert_array_equal(b.pooled(), a.pooled())
        assert b.paths()[0] == f"{split}-000.tar/sample00000"
    manifest = cache.read_manifest(wds_dir / "test")
    skipped = [x for e in manifest["shards"] for x in e["skipped"]]
    assert [x["path"] for x in skipped] == ["test-001.tar/broken"] and "cannot" in skipped[0]["reason"]

    # resume: the same command again finds every shard done
    res2 = CliRunner().invoke(
        app,
        ["extract", "-d", "wds", "--root", str(tmp_path / "wds"), "--name", "mine", "--cache-dir", str(tmp_path / "w"),
         "-m", "vlmcache-tiny", "-p", "none", "--device", "cpu", "--workers", "0", "--shard-size", "16", "--json",
         *[a for s in shards for a in ("--shards", s)]],
    )  # fmt: skip
    assert res2.exit_code == 0 and all(s["resumed_shards"] == s["shards"] for s in json.loads(res2.stdout)["splits"])


def test_webdataset_mistakes_name_the_shard_and_the_option(tmp_path):
    import webdataset as wds

    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "a-0.tar")) as sink:
        sink.write({"__key__": "x", "jpg": b"...", "txt": "3"})
    base = ["extract", "-d", "wds", "--root", str(tmp_path / "s"), "-m", "vlmcache-tiny", "-p", "none"]
    cases = [
        (["--shards", "train=a-{0..1}.tar"], "a-1.tar' does not exist"),
        (["--shards", "train=a-0.tar"], "no .cls member (it has: jpg, txt)"),
        (["--shards", "train"], "--shards takes NAME=PATH"),
        (["--split-file", "train=x.txt"], "not --split-file"),
    ]
    for extra, message in cases:
        res = CliRunner().invoke(app, [*base, *extra, "--cache-dir", str(tmp_path / "c")])
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    res = CliRunner().invoke(app, ["extract", "-d", "split", "--shards", "train=a.tar"])
    assert res.exit_code == 2 and "--dataset wds" in res.output
