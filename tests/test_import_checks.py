"""Import's one validator (vlmcache/ingest.py), clip-retrieval's own export layout, and import sources.

Every refusal is one VlmcacheError (exit 2 from the CLI) naming the file and the row, and leaves the cache folder
as it was; what is accepted is stored exactly."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vlmcache import cache, text_cache
from vlmcache.cli import app
from vlmcache.errors import VlmcacheError
from vlmcache.exchange import export_cache, file_number, import_embeddings, unit_rows

QUIET = {"log": lambda *_: None}


def _cache(tmp_path: Path, n: int = 40, dim: int = 8, classes: int = 3, shard: int = 16, seed: int = 0) -> Path:
    """A small cache with image paths and class names, in the on-disk format extraction writes."""
    rng = np.random.default_rng(seed)
    model_dir = tmp_path / "src" / "toy" / "m__random__00000000"
    for split in ("train", "test"):
        x = (rng.normal(size=(n, dim)) * 5).astype(np.float16)
        y = np.arange(n) % classes
        fp = {"encoder": {"model": "m"}, "dataset": "toy", "split": split, "num_classes": classes}
        paths = [f"{split}/img{i:03d}.jpg" for i in range(n)]
        cache.write_arrays(model_dir / split, x, y, fp, None, shard, "synthetic", paths)
    names = ["cat", "dog", "bird", "fish", "cow"][:classes]
    emb = np.eye(classes, dim, dtype=np.float32)
    text_cache.write_text(
        model_dir / text_cache.TEXT_FILE, text_cache.TextCache({}, names, {"photo": (["{}"], emb)}, 100.0)
    )
    return model_dir


def _parquet(path: Path, emb, labels, paths=None, **extra) -> Path:
    """A generic parquet file of path, label, embedding (a list column), as pandas or DuckDB would write it."""
    n = len(labels)
    cols = {"path": paths or [f"img{i}.jpg" for i in range(n)], "label": labels, "embedding": emb, **extra}
    pq.write_table(pa.table(cols), path)
    return path


def _tree(folder: Path) -> dict:
    """Every file under folder with its bytes: what "nothing else changed" compares."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(tmp_path: Path, source: str, location: Path, match: str, **kw) -> None:
    before = _tree(tmp_path / "c")
    with pytest.raises(VlmcacheError, match=match):
        dataset, split = kw.pop("dataset", "mine"), kw.pop("split", "train")
        import_embeddings(source, location, dataset, split, tmp_path / "c", **kw, **QUIET)
    assert _tree(tmp_path / "c") == before
    leftovers = [p for p in (tmp_path / "c").rglob("*") if p.name.startswith(".import-") or ".tmp-" in p.name]
    assert not leftovers


# --------------------------------------------------------------------------- embeddings


def test_values_beyond_float16_are_refused_after_the_cast_naming_the_row(tmp_path):
    emb = np.ones((9, 4), np.float32).tolist()
    emb[6][2] = 1e6  # finite as float32, inf once stored as float16
    path = _parquet(tmp_path / "a.parquet", emb, [0, 1, 2] * 3)
    _refused(tmp_path, "parquet", path, r"row 6: the value 1e\+06 is beyond float16's range")
    emb[6][2] = float("nan")
    path = _parquet(tmp_path / "b.parquet", emb, [0, 1, 2] * 3)
    _refused(tmp_path, "parquet", path, "row 6: the embedding holds NaN or inf")
    emb[6][2] = 65000.0  # the largest float16 is 65504: stored exactly as given
    out = import_embeddings("parquet", _parquet(tmp_path / "c.parquet", emb, [0, 1, 2] * 3), "m", "train",
                            tmp_path / "ok", **QUIET)  # fmt: skip
    assert cache.SplitCache(Path(out["cache"]) / "train").pooled()[6, 2] == np.float16(65000.0)


def test_widths_must_be_at_least_one_and_equal_everywhere(tmp_path):
    _refused(tmp_path, "parquet", _parquet(tmp_path / "w0.parquet", [[]] * 3, [0, 1, 2]), "width")
    ragged = [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0]]
    _refused(tmp_path, "parquet", _parquet(tmp_path / "r.parquet", ragged, [0, 1, 2]), "row 2: an embedding of width 3")
    strings = [["a", "b"]] * 3
    _refused(tmp_path, "parquet", _parquet(tmp_path / "s.parquet", strings, [0, 1, 2]), "must be a list of numbers")
    _refused(tmp_path, "parquet", _parquet(tmp_path / "n.parquet", [[1.0], None, [2.0]], [0, 1, 2]), "row 1: .*null")
    # across the files of a clip-retrieval folder
    folder = tmp_path / "cr"
    for i, width in enumerate((4, 5)):
        (folder / "img_emb").mkdir(parents=True, exist_ok=True)
        (folder / "metadata").mkdir(exist_ok=True)
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", np.ones((3, width), np.float16))
        pq.write_table(pa.table({"image_path": [f"{i}_{j}" for j in range(3)], "label": [0, 1, 2]}),
                       folder / "metadata" / f"metadata_{i}.parquet")  # fmt: skip
    _refused(tmp_path, "clip-retrieval", folder, "img_emb_1.npy', row 0: embeddings of width 5, where earlier")
    np.save(folder / "img_emb" / "img_emb_1.npy", np.array([["x"] * 4] * 3))
    _refused(tmp_path, "clip-retrieval", folder, "a <U1 array")
    np.save(folder / "img_emb" / "img_emb_1.npy", np.ones((3, 4), np.float16))
    np.save(folder / "img_emb" / "img_emb_01.npy", np.ones((3, 4), np.float16))  # a file of another export
    _refused(tmp_path, "clip-retrieval", folder, "two files numbered 1 .'img_emb_01.npy', 'img_emb_1.npy'.")
    (folder / "img_emb" / "img_emb_01.npy").unlink()
    (folder / "metadata" / "metadata_1.parquet").write_bytes(b"not parquet at all")
    _refused(tmp_path, "clip-retrieval", folder, "metadata_1.parquet' is not a readable parquet file")


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0.0, 1.0, 1.7, 2.0], r"row 2: the label 1.7 is not a whole number"),
        (["0", "1", "2", "1"], r"row 0: the label '0' is of type string"),
        ([0, 1, None, 2], r"row 2: the label is null"),
        ([True, False, True, False], r"of type bool"),
        ([0, 1, -1, 2], r"row 2: the label -1 is out of range"),
        ([0, 1, 2, 50_000], r"row 3: the label 50000 would make 50001 classes for 4 distinct labels"),
    ],
)
def test_labels_must_be_class_indices_named_by_row(tmp_path, labels, match):
    path = _parquet(tmp_path / "l.parquet", np.ones((4, 3)).tolist(), labels)
    _refused(tmp_path, "parquet", path, match)


def test_whole_float_labels_import_and_the_class_count_rule_is_extracts(tmp_path):
    from vlmcache.user_data import implied_classes_problem

    out = import_embeddings("parquet", _parquet(tmp_path / "f.parquet", np.ones((4, 3)).tolist(), [0.0, 2.0, 1.0, 2.0]),
                            "m", "train", tmp_path / "c", **QUIET)  # fmt: skip
    assert cache.SplitCache(Path(out["cache"]) / "train").labels().tolist() == [0, 2, 1, 2]
    # the rule extract applies to a split file (2 x distinct + 10), here at its edge; the same words from both
    assert implied_classes_problem(17, 4) is None and implied_classes_problem(18, 4) is not None
    from vlmcache.datasets import load_dataset

    (tmp_path / "r").mkdir()
    (tmp_path / "s.txt").write_text("a.jpg 0\nb.jpg 1\nc.jpg 2\nd.jpg 50000\n")
    with pytest.raises(VlmcacheError, match="line 4: " + implied_classes_problem(50_000, 4)):
        load_dataset("split", root=str(tmp_path / "r"), split_files={"train": str(tmp_path / "s.txt")})
    ok = _parquet(tmp_path / "e.parquet", np.ones((4, 3)).tolist(), [0, 1, 2, 17])
    assert import_embeddings("parquet", ok, "m", "val", tmp_path / "e", **QUIET)["rows"] == 4
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    path = _parquet(tmp_path / "x.parquet", np.ones((4, 3)).tolist(), [0, 1, 2, 3])
    _refused(tmp_path, "parquet", path, "row 3: the label 3 is beyond the 3 class names", classnames_file=names)


# --------------------------------------------------------------------------- files


def test_fifos_folders_and_devices_are_refused_before_they_are_opened(tmp_path):
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    good = _parquet(tmp_path / "g.parquet", np.ones((3, 2)).tolist(), [0, 1, 2])
    results = []

    def attempt():  # a FIFO opened for reading blocks until a writer comes: run it where a hang is seen
        for kw in (
            {"location": fifo},
            {"location": good, "labels_file": fifo},
            {"location": good, "classnames_file": fifo},
        ):
            try:
                import_embeddings("parquet", kw.pop("location"), "m", "train", tmp_path / "c", **kw, **QUIET)
            except VlmcacheError as e:
                results.append(str(e))

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "import blocked on a FIFO"
    assert len(results) == 3 and all("is a FIFO; give a regular file" in r for r in results), results
    (tmp_path / "d.parquet").mkdir()
    _refused(tmp_path, "parquet", tmp_path / "d.parquet", "is a folder")
    if os.path.exists("/dev/zero"):
        _refused(tmp_path, "parquet", Path("/dev/zero"), "not a regular file")


def test_the_cli_gives_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is no parquet PAR1")
    res = CliRunner().invoke(app, ["import", str(path), "--from", "parquet", "-d", "m", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output and "is not a readable parquet file" in res.output


_IMPORT_PEAK = """
import json, sys
from pathlib import Path
from vlmcache.exchange import import_embeddings
from vlmcache.memory import peak_rss_mb, reset_peak
import_embeddings("parquet", Path(sys.argv[2]), "warm", "train", Path(sys.argv[3]), log=lambda *_: None)
reset_peak()
before = peak_rss_mb()
import_embeddings("parquet", Path(sys.argv[1]), "big", "train", Path(sys.argv[3]), log=lambda *_: None)
print(json.dumps({"growth_mb": peak_rss_mb() - before}))
"""


def test_import_memory_is_bounded_by_a_piece_and_a_shard(tmp_path):
    """60,000 x 384 float32 (88 MB in row groups of 20,000) import with a flat peak: 83 MB here and the same at
    120,000 rows; the earlier import, which concatenated, grew by 390 MB at 100,000 rows."""
    rows, dim = 60_000, 384
    rng = np.random.default_rng(0)
    flat = pa.array(rng.normal(size=rows * dim).astype(np.float32))
    table = pa.table({"path": [f"i{i}" for i in range(rows)], "label": np.arange(rows) % 10,
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, dim)})  # fmt: skip
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=20_000)  # a row group is 30 MB
    pq.write_table(table.slice(0, 2000), tmp_path / "small.parquet")
    del table, flat
    res = subprocess.run(
        [sys.executable, "-c", _IMPORT_PEAK, str(tmp_path / "big.parquet"), str(tmp_path / "small.parquet"),
         str(tmp_path / "c")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    growth = json.loads(res.stdout.strip().splitlines()[-1])["growth_mb"]
    assert growth < 120, f"import grew the process by {growth} MB for {rows * dim * 4 / 2**20:.0f} MB of embeddings"
    split = cache.SplitCache(next((tmp_path / "c" / "big").iterdir()) / "train")
    assert len(split) == rows and len(split.shards) == -(-rows // 8192)


# --------------------------------------------------------------------------- paths and class names


def test_absolute_image_paths_are_kept_or_made_relative_to_root(tmp_path):
    root = tmp_path / "images"
    paths = [str(root / "a" / f"{i}.jpg") for i in range(3)]
    src = _parquet(
        tmp_path / "abs.parquet",
        np.ones((3, 2)).tolist(),
        [0, 1, 2],
        paths=paths,
    )
    out = import_embeddings("parquet", src, "m", "train", tmp_path / "c1", **QUIET)
    assert cache.SplitCache(Path(out["cache"]) / "train").paths() == paths
    root.mkdir()
    out = import_embeddings("parquet", src, "m", "train", tmp_path / "c2", root=root, **QUIET)
    assert cache.SplitCache(Path(out["cache"]) / "train").paths() == [f"a/{i}.jpg" for i in range(3)]
    # a --labels file may name them either way
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"a/{i}.jpg {2 - i}\n" for i in range(3)))
    out = import_embeddings("parquet", src, "m", "val", tmp_path / "c2", labels_file=labels, root=root, **QUIET)
    assert cache.SplitCache(Path(out["cache"]) / "val").labels().tolist() == [2, 1, 0]
    (tmp_path / "elsewhere").mkdir()
    _refused(tmp_path, "parquet", src, "row 0: the image path '.*' is not under --root", root=tmp_path / "elsewhere")


@pytest.mark.parametrize(
    "bad, says",
    [
        ("../up.jpg", "contains '..'"),
        ("a/../../up.jpg", "contains '..'"),
        ("a\\..\\..\\up.jpg", "contains '..'"),
        ("two\nlines.jpg", "control characters"),
        ("esc\x1b[31m.jpg", "control characters"),
    ],
)
def test_image_paths_that_leave_their_root_or_hold_control_characters_are_refused(tmp_path, bad, says):
    src = _parquet(tmp_path / "p.parquet", np.ones((3, 2)).tolist(), [0, 1, 2], paths=["a/0.jpg", bad, "a/2.jpg"])
    _refused(tmp_path, "parquet", src, f"row 1: the image path .* {says}")
    kept = _parquet(tmp_path / "k.parquet", np.ones((2, 2)).tolist(), [0, 1], paths=["a/..b.jpg", "a/b..jpg"])
    out = import_embeddings("parquet", kept, "m", "train", tmp_path / "c", **QUIET)  # '..' inside a name is fine
    assert cache.SplitCache(Path(out["cache"]) / "train").paths() == ["a/..b.jpg", "a/b..jpg"]


def test_the_exports_own_class_names_come_back(tmp_path):
    model_dir = _cache(tmp_path)
    export_cache(model_dir, "parquet", tmp_path / "pq", **QUIET)
    out = import_embeddings("parquet", tmp_path / "pq" / "train.parquet", "toy", "train", tmp_path / "c", **QUIET)
    assert text_cache.read_text(Path(out["cache"]) / text_cache.TEXT_FILE).classnames == ["cat", "dog", "bird"]
    t = pq.read_table(tmp_path / "pq" / "test.parquet")
    names = t.column("class_name").to_pylist()
    names[5] = "wolf" if names[5] != "wolf" else "fox"
    pq.write_table(t.set_column(t.schema.get_field_index("class_name"), "class_name", pa.array(names)),
                   tmp_path / "renamed.parquet")  # fmt: skip
    _refused(tmp_path, "parquet", tmp_path / "renamed.parquet", r"row 5: class 2 is named 'wolf' here and 'bird'")


# --------------------------------------------------------------------------- clip-retrieval's layout


def test_clip_retrieval_export_is_what_clip_retrieval_writes(tmp_path):
    """Read with clip-retrieval's conventions (clip_inference/mapper.py and writer.py): float16 rows of unit norm,
    the float32 feature divided by its norm then cast; metadata_N.parquet with image_path; files numbered
    zero-padded to the digits of their count."""
    model_dir = _cache(tmp_path, n=170, shard=16)  # 11 shards: img_emb_00 .. img_emb_10
    res = CliRunner().invoke(app, ["export", str(model_dir), "--format", "clip-retrieval", "--out",
                                   str(tmp_path / "cr"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dtype"] == "float16"
    split = cache.SplitCache(model_dir / "train")
    folder = tmp_path / "cr" / "train"
    names = sorted(p.name for p in (folder / "img_emb").iterdir())
    assert names == [f"img_emb_{i:02d}.npy" for i in range(11)] and file_number(3, 11) == "03"
    emb = np.concatenate([np.load(folder / "img_emb" / n) for n in names])
    assert emb.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
    ref = split.pooled().astype(np.float32)
    ref = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype(np.float16)
    np.testing.assert_array_equal(emb, ref)
    meta = pq.read_table(folder / "metadata" / "metadata_00.parquet")
    assert meta.column_names[0] == "image_path" and meta.schema.field("image_path").type == pa.string()
    assert meta.column("image_path").to_pylist() == split.paths()[:16]
    # clip-retrieval's index is an inner-product faiss index over these rows: its scores are now cosines
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb.astype(np.float32))
    scores, found = index.search(emb[:20].astype(np.float32), 5)
    x = split.pooled().astype(np.float32)
    cos = (x[:20] / np.linalg.norm(x[:20], axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    np.testing.assert_allclose(scores, np.take_along_axis(cos, found, 1), atol=3e-3)
    np.testing.assert_allclose(scores, -np.sort(-cos, axis=1)[:, :5], atol=3e-3)
    assert (found[:, 0] == np.arange(20)).all() and np.abs(scores[:, 0] - 1).max() < 3e-3
    # the raw layout keeps the cached values
    export_cache(model_dir, "npy-raw", tmp_path / "raw", **QUIET)
    raw = np.load(tmp_path / "raw" / "train" / "img_emb" / "img_emb_00.npy")
    assert raw.dtype == np.float32 and np.array_equal(raw.astype(np.float16), split.pooled()[:16])
    # zero rows stay zero, as clip-retrieval's normalized() leaves them
    assert not unit_rows(np.zeros((2, 3))).any()

    # round trip: what import stores equals the files
    out = import_embeddings("clip-retrieval", folder, "toy", "train", tmp_path / "c", **QUIET)
    back = cache.SplitCache(Path(out["cache"]) / "train")
    np.testing.assert_array_equal(back.pooled(), emb)
    assert back.paths() == split.paths() and back.labels().tolist() == split.labels().tolist()
    assert text_cache.read_text(Path(out["cache"]) / text_cache.TEXT_FILE).classnames == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "npy"], "choose one: clip-retrieval (L2-normalised float16"),
        (["--format", "clip-retrieval", "--dtype", "float32"], "--format clip-retrieval writes float16"),
        (["--format", "npy_raw"], "Did you mean 'npy-raw'"),
    ],
)
def test_ambiguous_export_formats_are_refused(tmp_path, args, message):
    model_dir = _cache(tmp_path)
    res = CliRunner().invoke(app, ["export", str(model_dir), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- sources


def test_a_split_from_another_source_is_refused(tmp_path):
    model_dir = _cache(tmp_path)
    export_cache(model_dir, "clip-retrieval", tmp_path / "cr", **QUIET)
    export_cache(model_dir, "npy-raw", tmp_path / "raw", **QUIET)
    out = import_embeddings("clip-retrieval", tmp_path / "cr" / "train", "toy", "train", tmp_path / "c", **QUIET)
    source = cache.read_manifest(Path(out["cache"]) / "train")["fingerprint"]["source"]
    assert source == {"made_by": "toy/m__random__00000000", "format": "clip-retrieval", "unit_norm": True}
    # the same cache's test split, but raw: another embedding space for a head trained on unit vectors
    _refused(tmp_path, "clip-retrieval", tmp_path / "raw" / "test", "not unit-norm", split="test", dataset="toy")
    # clip-retrieval's own files (no provenance) beside a vlmcache export
    folder = tmp_path / "theirs"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", unit_rows(np.ones((4, 8))).astype(np.float16))
    pq.write_table(pa.table({"image_path": list("abcd"), "label": [0, 1, 2, 0]}),
                   folder / "metadata" / "metadata_0.parquet")  # fmt: skip
    _refused(tmp_path, "clip-retrieval", folder, "files made elsewhere .* the cache's 'train' split came from vlmcache",
             split="test", dataset="toy")  # fmt: skip
    # each under its own --model is fine, and the matching split joins
    import_embeddings("clip-retrieval", folder, "toy", "test", tmp_path / "c", model="other", **QUIET)
    import_embeddings("clip-retrieval", tmp_path / "cr" / "test", "toy", "test", tmp_path / "c", **QUIET)
    assert (Path(out["cache"]) / "test" / cache.MANIFEST).is_file()


def test_a_refused_overwrite_keeps_the_old_split(tmp_path):
    good = _parquet(tmp_path / "g.parquet", np.ones((4, 2)).tolist(), [0, 1, 2, 0])
    out = import_embeddings("parquet", good, "m", "train", tmp_path / "c", **QUIET)
    bad = _parquet(tmp_path / "b.parquet", np.ones((4, 2)).tolist(), [0, 1, 2.5, 0])
    _refused(tmp_path, "parquet", bad, "row 2: the label 2.5", overwrite=True, dataset="m")
    new = _parquet(tmp_path / "n.parquet", (np.ones((5, 2)) * 2).tolist(), [1, 1, 2, 0, 0])
    import_embeddings("parquet", new, "m", "train", tmp_path / "c", overwrite=True, **QUIET)
    split = cache.SplitCache(Path(out["cache"]) / "train")
    assert split.labels().tolist() == [1, 1, 2, 0, 0] and sorted(p.name for p in Path(out["cache"]).iterdir()) == [
        "text.h5",
        "train",
    ]


def test_import_stages_in_a_folder_of_its_own_and_removes_nothing_else(tmp_path):
    """The staging folder is made new (mkdtemp), never by removing a folder of the name it would take: folders
    named as the pid-named staging and replaced folders once were survive an import and an --overwrite import."""
    good = _parquet(tmp_path / "g.parquet", np.ones((4, 2)).tolist(), [0, 1, 2, 0])
    out = Path(import_embeddings("parquet", good, "m", "train", tmp_path / "c", **QUIET)["cache"])
    theirs = [out / f".import-train-{os.getpid()}", out / f".replaced-train-{os.getpid()}"]
    for folder in theirs:
        folder.mkdir()
        (folder / "keep.txt").write_text("someone's")
    new = _parquet(tmp_path / "n.parquet", (np.ones((5, 2)) * 2).tolist(), [1, 1, 2, 0, 0])
    import_embeddings("parquet", new, "m", "train", tmp_path / "c", overwrite=True, **QUIET)
    import_embeddings("parquet", good, "m", "test", tmp_path / "c", **QUIET)
    assert all((folder / "keep.txt").read_text() == "someone's" for folder in theirs)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f.name for f in theirs), "test", "text.h5", "train"])
    assert cache.SplitCache(out / "train").labels().tolist() == [1, 1, 2, 0, 0]


def test_a_damaged_imported_shard_says_to_import_again(tmp_path):
    """`cache verify --repair` extracts; an imported split has no extraction to repeat, so its message says so."""
    good = _parquet(tmp_path / "g.parquet", np.ones((4, 2)).tolist(), [0, 1, 2, 0])
    out = Path(import_embeddings("parquet", good, "m", "train", tmp_path / "c", **QUIET)["cache"])
    shard = next((out / "train").glob("shard-*.h5"))
    import h5py

    with h5py.File(shard, "r") as f:  # a byte of the embeddings flipped: the shard's fletcher32 check fails
        offset = f["pooled"].id.get_chunk_info(0).byte_offset
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VlmcacheError, match="it is damaged: import it again with --overwrite"):
        cache.SplitCache(out / "train").pooled()


# --------------------------------------------------------------------------- fuzz

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALUES = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([0.0, 1e6, -7e4, 65504.0, float("nan"), float("inf")]))
LABELS = {
    "int": st.integers(0, 14),
    "float": st.one_of(st.integers(0, 5).map(float), st.floats(0, 5)),
    "null": st.one_of(st.none(), st.integers(0, 5)),
    "str": st.sampled_from(["0", "1", "cat"]),
    "bool": st.booleans(),
}


@st.composite
def _inputs(draw):
    n = draw(st.integers(0, 6))
    width = draw(st.integers(0, 4))
    kind = draw(st.sampled_from(sorted(LABELS)))
    rows = [draw(st.lists(VALUES, min_size=width, max_size=width)) for _ in range(n)]
    if n and draw(st.booleans()):  # ragged: one row one value longer
        rows[draw(st.integers(0, n - 1))].append(0.5)
    labels = [draw(LABELS[kind]) for _ in range(n)]
    return rows, labels, kind, draw(st.sampled_from(["parquet", "clip-retrieval"]))


def _valid(rows, labels, kind) -> bool:
    """The spec, written apart from the code: what import must accept."""
    if not rows or len({len(r) for r in rows}) != 1 or len(rows[0]) < 1:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(np.asarray(rows, np.float64).astype(np.float16)).all():
            return False
    if kind in ("str", "bool") or any(y is None or y != int(y) or y < 0 for y in labels):
        return False
    top, distinct = max(int(y) for y in labels), len({int(y) for y in labels})
    return top + 1 <= 2 * distinct + 10


@settings(max_examples=int(os.environ.get("VLMCACHE_FUZZ", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(case=_inputs())
@example(case=([[1e6, 0.0], [1.0, 2.0]], [0, 1], "int", "parquet"))  # the cases, always tried
@example(case=([[1e6, 0.0], [1.0, 2.0]], [0, 1], "int", "clip-retrieval"))
@example(case=([[1.0], [2.0]], [0.0, 1.7], "float", "parquet"))
@example(case=([[1.0], [2.0, 3.0]], [0, 1], "int", "clip-retrieval"))
@example(case=([[1.0], [2.0]], [0, 5_000], "int", "parquet"))
def test_fuzzed_imports_store_the_same_data_or_give_one_error(tmp_path_factory, case):
    rows, labels, kind, fmt = case
    tmp = tmp_path_factory.mktemp("fuzz")
    paths = [f"img{i}.jpg" for i in range(len(rows))]
    if fmt == "parquet":
        emb = pa.array(rows, type=pa.list_(pa.float64()))
        location = tmp / "in.parquet"
        pq.write_table(pa.table({"path": paths, "label": pa.array(labels), "embedding": emb}), location)
    else:  # rows of one width per npy file: files of different widths must be refused
        files, current = [], []
        for r in rows:
            if current and len(r) != len(current[0]):
                files.append(current)
                current = []
            current.append(r)
        files.append(current)
        location = tmp / "cr"
        (location / "img_emb").mkdir(parents=True)
        (location / "metadata").mkdir()
        at = 0
        for i, part in enumerate(files):
            arr = np.asarray(part, np.float32).reshape(len(part), len(part[0]) if part else 1)
            np.save(location / "img_emb" / f"img_emb_{i}.npy", arr)
            label = pa.array(labels[at : at + len(part)]) if part else pa.array([], pa.int64())
            pq.write_table(pa.table({"image_path": paths[at : at + len(part)], "label": label}),
                           location / "metadata" / f"metadata_{i}.parquet")  # fmt: skip
            at += len(part)
        with np.errstate(over="ignore"):  # the spec sees the float32 values the files hold
            rows = [np.asarray(r, np.float32).astype(np.float64).tolist() for r in rows]
    source_files = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    ok = _valid(rows, labels, kind)
    try:
        out = import_embeddings(fmt, location, "fz", "train", tmp / "c", **QUIET)
    except VlmcacheError:
        assert not ok, (rows, labels, kind)
        assert not (tmp / "c").exists()  # nothing made, nothing left
    else:
        assert ok, (rows, labels, kind)
        split = cache.SplitCache(Path(out["cache"]) / "train")
        np.testing.assert_array_equal(split.pooled(), np.asarray(rows, np.float64).astype(np.float16))
        assert split.labels().tolist() == [int(y) for y in labels] and split.paths() == paths
    assert {p: p.read_bytes() for p in source_files} == source_files


def test_a_split_that_names_the_classes_otherwise_is_refused(tmp_path):
    model_dir = _cache(tmp_path)
    export_cache(model_dir, "parquet", tmp_path / "pq", **QUIET)
    import_embeddings("parquet", tmp_path / "pq" / "train.parquet", "toy", "train", tmp_path / "c", **QUIET)
    test = pq.read_table(tmp_path / "pq" / "test.parquet")
    pq.write_table(test.drop_columns(["class_name"]).replace_schema_metadata(test.schema.metadata),
                   tmp_path / "test.parquet")  # fmt: skip
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nsheep\n")
    _refused(tmp_path, "parquet", tmp_path / "test.parquet", "names class 2 'sheep'; the cache's class names",
             split="test", dataset="toy", classnames_file=names)  # fmt: skip
    names.write_text("cat\ndog\nbird\n")
    import_embeddings("parquet", tmp_path / "test.parquet", "toy", "test", tmp_path / "c", classnames_file=names,
                      **QUIET)  # fmt: skip


def _reference(fmt: str, location: Path):
    """What the damaged files hold, read by numpy and pyarrow directly: (embeddings, labels, paths), or None when
    they cannot read it."""
    try:
        if fmt == "parquet":
            t = pq.read_table(location)
            emb = np.asarray(t.column("embedding").to_pylist(), np.float64)
            return emb, t.column("label").to_pylist(), t.column("path").to_pylist()
        emb = np.load(location / "img_emb" / "img_emb_0.npy", allow_pickle=False)
        t = pq.read_table(location / "metadata" / "metadata_0.parquet")
        return emb, t.column("label").to_pylist(), t.column("image_path").to_pylist()
    except Exception:
        return None


@settings(max_examples=int(os.environ.get("VLMCACHE_FUZZ", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(
    fmt=st.sampled_from(["parquet", "clip-retrieval"]),
    target=st.sampled_from(["embeddings", "metadata"]),
    cut=st.booleans(),
    where=st.floats(0, 1),
    value=st.integers(1, 255),
)
@example(fmt="clip-retrieval", target="embeddings", cut=False, where=0.0625, value=1)  # numpy: SyntaxError
@example(fmt="parquet", target="embeddings", cut=True, where=0.5, value=1)
def test_damaged_import_files_read_what_they_hold_or_give_one_error(tmp_path_factory, fmt, target, cut, where, value):
    """A generated input with one byte changed or cut short: import stores exactly what numpy and pyarrow read
    from it, or gives one VlmcacheError and makes nothing."""
    tmp = tmp_path_factory.mktemp("damaged")
    emb = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    if fmt == "parquet":
        location = target_file = _parquet(tmp / "in.parquet", emb.tolist(), [0, 1, 2])
    else:
        location = tmp / "cr"
        (location / "img_emb").mkdir(parents=True)
        (location / "metadata").mkdir()
        np.save(location / "img_emb" / "img_emb_0.npy", emb)
        pq.write_table(pa.table({"image_path": ["a", "b", "c"], "label": [0, 1, 2]}),
                       location / "metadata" / "metadata_0.parquet")  # fmt: skip
        target_file = location / ("img_emb/img_emb_0.npy" if target == "embeddings" else "metadata/metadata_0.parquet")
    data = bytearray(target_file.read_bytes())
    at = min(int(where * len(data)), len(data) - 1)
    if cut:
        data = data[:at]
    else:
        data[at] = (data[at] + value) % 256
    target_file.write_bytes(bytes(data))
    ref = _reference(fmt, location)
    try:
        out = import_embeddings(fmt, location, "dm", "train", tmp / "c", **QUIET)
    except VlmcacheError as e:
        assert "\n" not in str(e) and not (tmp / "c").exists()
    else:
        assert ref is not None
        split = cache.SplitCache(Path(out["cache"]) / "train")
        np.testing.assert_array_equal(split.pooled(), np.asarray(ref[0], np.float64).astype(np.float16))
        assert split.labels().tolist() == ref[1] and split.paths() == ref[2]


def test_a_folder_in_the_splits_place_that_is_no_split_is_never_replaced(tmp_path):
    good = _parquet(tmp_path / "g.parquet", np.ones((4, 2)).tolist(), [0, 1, 2, 0])
    out = import_embeddings("parquet", good, "m", "train", tmp_path / "c", **QUIET)
    theirs = Path(out["cache"]) / "test"
    theirs.mkdir()
    (theirs / "shard-00000.h5").write_bytes(b"someone's file")  # the old import unlinked shard-*.h5 here
    for overwrite in (False, True):
        _refused(tmp_path, "parquet", good, "test' exists and is not a cache split", dataset="m", split="test",
                 overwrite=overwrite)  # fmt: skip
    assert (theirs / "shard-00000.h5").read_bytes() == b"someone's file"


def test_overwrite_never_removes_someone_elses_file_and_never_follows_a_link(tmp_path):
    """--overwrite replaces a split vlmcache wrote, never a file of someone else's inside it (refused, kept), and
    a link in place of the split or cache folder is refused, as extract refuses it (guard.check_cache_folders)."""
    good = _parquet(tmp_path / "g.parquet", np.ones((4, 2)).tolist(), [0, 1, 2, 0])
    out = import_embeddings("parquet", good, "m", "train", tmp_path / "c", **QUIET)
    notes = Path(out["cache"]) / "train" / "notes.txt"
    notes.write_text("mine")
    _refused(tmp_path, "parquet", good, "holds 'notes.txt', which vlmcache did not write", dataset="m", overwrite=True)
    assert notes.read_text() == "mine"
    outside = tmp_path / "outside"
    outside.mkdir()
    (Path(out["cache"]) / "test").symlink_to(outside, target_is_directory=True)
    _refused(tmp_path, "parquet", good, "symbolic link", dataset="m", split="test", overwrite=True)
    assert not any(outside.iterdir())
