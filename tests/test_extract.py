"""Stage 1 against in-memory references: what the cache holds equals a direct forward pass of the encoder."""

import json
from pathlib import Path

import h5py
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from vlmcache import atomic, cache, text_cache
from vlmcache.encoders import load_encoder, resolve_weights
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract

TINY = dict(model="vlmcache-tiny", pretrained="none", device="cpu", workers=0)


def _extract(tmp_path, split_dataset, **kw):
    root, files = split_dataset
    cfg = ExtractConfig(
        dataset="split",
        root=str(root),
        split_files={s: str(p) for s, p in files.items()},
        classnames_file=str(root / "classnames.txt"),
        cache_dir=str(tmp_path / "cache"),
        **{**TINY, **kw},
    )
    return run_extract(cfg, log=lambda *a: None)


def _reference(encoder, root, split_file):
    """Pooled embeddings and final-block tokens computed here by hand, image by image."""
    visual = encoder.model.visual
    pooled, tokens = [], []
    for line in split_file.read_text().split("\n"):
        if not line:
            continue
        x = encoder.preprocess(Image.open(root / line.rsplit(" ", 1)[0]).convert("RGB"))[None]
        with torch.no_grad():
            pooled.append(encoder.model.encode_image(x)[0].numpy())
            h = visual.conv1(x).flatten(2).transpose(1, 2)  # (1, grid*grid, W)
            h = torch.cat([visual.class_embedding.expand(1, 1, -1), h], dim=1) + visual.positional_embedding
            tokens.append(visual.transformer(visual.ln_pre(h))[0].numpy())  # before ln_post
    return np.stack(pooled), np.stack(tokens)


def test_cached_rows_equal_a_direct_forward_pass(tmp_path, split_dataset, tiny_encoder):
    root, files = split_dataset
    summary = _extract(tmp_path, split_dataset, tokens=True, shard_size=10, batch_size=7)
    train = cache.SplitCache(f"{summary['cache']}/train")
    assert len(train.shards) == 5 and len(train) == 47
    ref_pooled, ref_tokens = _reference(tiny_encoder, root, files["train"])
    np.testing.assert_allclose(train.pooled().astype(np.float32), ref_pooled, rtol=2e-3, atol=2e-3)
    tokens = train.read_tokens(0, len(train))
    assert tokens.dtype == np.float16 and tokens.shape == (47, 17, 64)
    np.testing.assert_allclose(tokens.astype(np.float32), ref_tokens, rtol=2e-3, atol=2e-3)
    assert train.rows().tolist() == list(range(47))
    assert train.labels().tolist() == [0] * 30 + [1] * 12 + [2] * 5


def test_sharded_reads_equal_one_concatenated_array(tmp_path, split_dataset):
    summary = _extract(tmp_path, split_dataset, tokens=True, shard_size=8)
    train = cache.SplitCache(f"{summary['cache']}/train")
    whole = np.concatenate([h5["tokens"][()] for h5 in (cache.open_h5(s.path) for s in train.shards)])
    assert whole.shape[0] == 47
    for start, stop in [(0, 47), (0, 8), (7, 9), (5, 30), (40, 47), (46, 47), (12, 12)]:
        np.testing.assert_array_equal(train.read_tokens(start, stop), whole[start:stop])
    with pytest.raises(IndexError):
        train.read_tokens(40, 48)


def test_reader_pickles_without_open_files(tmp_path, split_dataset):
    import pickle

    summary = _extract(tmp_path, split_dataset, tokens=True, shard_size=16)
    train = cache.SplitCache(f"{summary['cache']}/train")
    before = train.read_tokens(10, 20)
    clone = pickle.loads(pickle.dumps(train))
    assert clone._files == {}
    np.testing.assert_array_equal(clone.read_tokens(10, 20), before)


def test_class_text_embeddings_match_open_clip(tmp_path, split_dataset, tiny_encoder):
    summary = _extract(tmp_path, split_dataset)
    text = text_cache.read_text(Path(summary["text"]["path"]))
    names, sets = text.classnames, text.sets
    assert names == ["red thing", "green thing", "blue thing"] and set(sets) == {"openai", "photo"}
    templates, emb = sets["photo"]
    assert templates == ["a photo of a {}."]
    tok = open_clip.get_tokenizer("vlmcache-tiny")
    with torch.no_grad():
        direct = tiny_encoder.model.encode_text(tok([f"a photo of a {n}." for n in names]), normalize=True)
    np.testing.assert_allclose(emb, direct.numpy(), rtol=1e-5, atol=1e-5)
    assert len(sets["openai"][0]) == 80 and np.allclose(np.linalg.norm(sets["openai"][1], axis=1), 1, atol=1e-5)
    assert text.fingerprint["encoder"] == tiny_encoder.fingerprint
    assert text.logit_scale == pytest.approx(float(tiny_encoder.model.logit_scale.exp()))


def test_bad_images_become_skipped_rows(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = lambda: Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8))  # noqa: E731
    good().save(root / "img/ok.jpg")
    good().convert("CMYK").save(root / "img/cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (20, 20), np.uint16)).save(root / "img/deep.png")
    pal = good().convert("P")
    pal.save(root / "img/pal.png", transparency=3)
    full = (root / "img/ok.jpg").read_bytes()
    (root / "img/trunc.jpg").write_bytes(full[: len(full) // 2])
    (root / "img/zero.jpg").write_bytes(b"")
    (root / "img/text.jpg").write_text("hello")
    names = ["ok.jpg", "cmyk.jpg", "trunc.jpg", "deep.png", "zero.jpg", "pal.png", "text.jpg", "absent.jpg"]
    (root / "train.txt").write_text("".join(f"img/{n} {i % 2}\n" for i, n in enumerate(names)))
    cfg = ExtractConfig(
        dataset="split",
        root=str(root),
        split_files={"train": str(root / "train.txt")},
        cache_dir=str(tmp_path / "cache"),
        shard_size=3,
        **TINY,
    )
    summary = run_extract(cfg, log=lambda *a: None)
    assert summary["splits"][0]["rows"] == 4 and summary["splits"][0]["skipped"] == 4
    split_dir = f"{summary['cache']}/train"
    manifest = cache.read_manifest(Path(split_dir))
    skipped = {x["path"]: x["reason"] for e in manifest["shards"] for x in e["skipped"]}
    assert set(skipped) == {"img/trunc.jpg", "img/zero.jpg", "img/text.jpg", "img/absent.jpg"}
    assert "empty file" in skipped["img/zero.jpg"] and "not an image" in skipped["img/text.jpg"]
    assert "file not found" in skipped["img/absent.jpg"] and "cannot decode" in skipped["img/trunc.jpg"]
    train = cache.SplitCache(split_dir)
    assert train.rows().tolist() == [0, 1, 3, 5] and train.labels().tolist() == [0, 1, 1, 1]
    assert np.isfinite(train.pooled().astype(np.float32)).all()


def test_a_whole_shard_of_bad_images_is_still_a_typed_shard(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (9, 9)).save(root / "a.png")
    (root / "b.jpg").write_bytes(b"")
    (root / "train.txt").write_text("b.jpg 0\na.png 0\n")
    cfg = ExtractConfig(
        dataset="split",
        root=str(root),
        split_files={"train": str(root / "train.txt")},
        cache_dir=str(tmp_path / "cache"),
        shard_size=1,
        tokens=True,
        **TINY,
    )
    summary = run_extract(cfg, log=lambda *a: None)
    train = cache.SplitCache(f"{summary['cache']}/train")
    assert train.pooled().shape == (1, 32) and train.read_tokens(0, 1).shape == (1, 17, 64)


def test_views_are_seeded_augmentations_of_the_training_split(tmp_path, split_dataset):
    a = _extract(tmp_path / "a", split_dataset, views=3, shard_size=20)
    b = _extract(tmp_path / "b", split_dataset, views=3, shard_size=9, batch_size=5)
    va = cache.SplitCache(f"{a['cache']}/train").load("views")
    vb = cache.SplitCache(f"{b['cache']}/train").load("views")
    assert va.shape == (47, 3, 32)
    np.testing.assert_allclose(va.astype(np.float32), vb.astype(np.float32), atol=2e-3)  # same crops, any sharding
    assert not np.allclose(va[:, 0], va[:, 1], atol=1e-2)  # the views differ from one another
    pooled = cache.SplitCache(f"{a['cache']}/train").pooled()
    assert not np.allclose(va[:, 0], pooled, atol=1e-2)
    test = cache.SplitCache(f"{a['cache']}/test")
    assert test.fingerprint["views"] == 0  # augmentations are for training only


def test_a_changed_fingerprint_is_refused_naming_the_keys(tmp_path, split_dataset):
    _extract(tmp_path, split_dataset, shard_size=10)
    with pytest.raises(VlmcacheError) as e:
        _extract(tmp_path, split_dataset, shard_size=10, tokens=True)
    assert "tokens: False -> True" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(VlmcacheError, match="shard_size: 10 -> 16"):
        _extract(tmp_path, split_dataset, shard_size=16)
    summary = _extract(tmp_path, split_dataset, shard_size=16, overwrite=True)
    assert summary["splits"][0]["shards"] == 3 and summary["splits"][0]["resumed_shards"] == 0
    again = _extract(tmp_path, split_dataset, shard_size=16)
    assert again["splits"][0]["resumed_shards"] == 3


def test_a_changed_split_file_is_refused(tmp_path, split_dataset):
    root, files = split_dataset
    _extract(tmp_path, split_dataset)
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join(files["train"].read_text().split("\n")[1:]))
    cfg = ExtractConfig(
        dataset="split",
        root=str(root),
        split_files={"train": str(edited)},
        classnames_file=str(root / "classnames.txt"),
        cache_dir=str(tmp_path / "cache"),
        **TINY,
    )
    with pytest.raises(VlmcacheError, match="split_sha256"):
        run_extract(cfg, log=lambda *a: None)


def test_missing_root_and_wrong_root_are_refused(tmp_path, split_dataset):
    root, files = split_dataset
    cfg = ExtractConfig(dataset="split", split_files={"train": str(files["train"])}, cache_dir=str(tmp_path), **TINY)
    with pytest.raises(VlmcacheError, match="pass --root"):
        run_extract(cfg)
    cfg.root = str(tmp_path)
    with pytest.raises(VlmcacheError, match="None of the sampled images"):
        run_extract(cfg)
    assert not (tmp_path / "split").exists()  # nothing written for a refused run


def test_tokens_need_a_vit(tmp_path, monkeypatch):
    cfg = ExtractConfig(
        dataset="digits_lt",
        model="RN50",
        pretrained="none",
        tokens=True,
        cache_dir=str(tmp_path),
        device="cpu",
        workers=0,
    )
    with pytest.raises(VlmcacheError, match="--tokens needs a ViT image tower"):
        run_extract(cfg)


# --------------------------------------------------------------------------- weights and preprocessing


@pytest.fixture
def fake_tags(monkeypatch):
    """Two published tags for vlmcache-tiny that preprocess differently (as ViT-B-16's tags do)."""
    from open_clip import pretrained

    tags = {
        "squares": dict(
            url="", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", resize_mode="squash"
        ),
        "openai_like": dict(url="", quick_gelu=True),
    }
    monkeypatch.setitem(pretrained._PRETRAINED, "vlmcache-tiny", tags)
    return tags


def test_a_local_weights_file_takes_its_preprocessing_from_the_named_tag(tmp_path, fake_tags):
    net = open_clip.create_model("vlmcache-tiny")
    torch.manual_seed(3)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    path = tmp_path / "finetuned.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(VlmcacheError) as refused:
        load_encoder("vlmcache-tiny", str(path), device="cpu")
    said = str(refused.value)  # each tag with what it sets, QuickGELU included
    assert "--preprocess-from" in said and "activation (QuickGELU)" in said
    assert (
        "[QuickGELU off, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), interpolation bilinear, resize squash] squares"
        in said
    )
    assert "[QuickGELU on" in said and said.rstrip(".").endswith("openai_like")
    enc = load_encoder("vlmcache-tiny", str(path), device="cpu", preprocess_from="squares")
    assert "'squares'" in enc.note and "QuickGELU off" in enc.note
    assert enc.preprocess_cfg["mean"] == [0.5, 0.5, 0.5] and enc.preprocess_cfg["resize_mode"] == "squash"
    assert "bilinear" in repr(enc.preprocess).lower() and "0.5" in repr(enc.preprocess)
    assert enc.fingerprint["weights_sha256"] == atomic.sha256_file(path) and enc.key.startswith("vlmcache-tiny__file-")
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        np.testing.assert_allclose(enc.encode_images(x)[0], net.encode_image(x), rtol=1e-5, atol=1e-6)
    quick = load_encoder("vlmcache-tiny", str(path), device="cpu", preprocess_from="openai_like")
    assert quick.fingerprint["quick_gelu"] and quick.key != enc.key
    assert "'openai_like'" in quick.note and "QuickGELU on" in quick.note  # said, not decided silently


def test_a_local_file_whose_sha_is_published_is_recognised(tmp_path, fake_tags, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights")
    digest = atomic.sha256_file(path)
    fake_tags["squares"]["url"] = f"https://example.org/{digest}/tiny.pt"
    resolved = resolve_weights("vlmcache-tiny", str(path))
    assert resolved["preprocess_from"] == "squares" and resolved["tag_cfg"]["mean"] == [0.5, 0.5, 0.5]


def test_unknown_model_tag_and_broken_file_are_clear(tmp_path):
    with pytest.raises(VlmcacheError, match="Did you mean 'ViT-B-16'"):
        resolve_weights("ViT-B-61", "openai")
    with pytest.raises(VlmcacheError, match="neither a pretrained tag of ViT-B-16 nor an existing file.*laion2b"):
        resolve_weights("ViT-B-16", "laion5b")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VlmcacheError, match="weights file"):
        load_encoder("vlmcache-tiny", str(bad), device="cpu")


def test_random_weights_are_seeded_so_resume_sees_the_same_encoder():
    a = load_encoder("vlmcache-tiny", "none", device="cpu")
    torch.manual_seed(123)  # the global seed must not matter
    b = load_encoder("vlmcache-tiny", "none", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.encode_images(x)[0], b.encode_images(x)[0]) and a.key == b.key
    assert json.dumps(a.fingerprint)  # serialisable for the manifest


def test_write_arrays_reads_back_equal_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(23, 8)).astype(np.float16)
    tokens = rng.normal(size=(23, 3, 4)).astype(np.float16)
    labels = rng.integers(0, 5, 23)
    split_dir = cache.write_arrays(tmp_path / "s", pooled, labels, {"num_classes": 5}, tokens, shard_size=7)
    split = cache.SplitCache(split_dir)
    assert len(split.shards) == 4 and split.fingerprint["tokens"]
    np.testing.assert_array_equal(split.pooled(), pooled)
    np.testing.assert_array_equal(split.labels(), labels)
    np.testing.assert_array_equal(split.read_tokens(5, 16), tokens[5:16])
    assert cache.verify_split(split_dir) == []
    # read as float32 into one array, shard by shard; into a reused buffer across shard boundaries
    as32 = split.load("pooled", np.float32)
    assert as32.dtype == np.float32 and np.array_equal(as32, pooled.astype(np.float32))
    buf = np.full((16, 3, 4), np.nan, np.float16)
    got = split.read_tokens(5, 16, out=buf)
    assert np.shares_memory(got, buf) and np.array_equal(got, tokens[5:16]) and np.isnan(buf[11:]).all()
    with pytest.raises(ValueError, match="out must be float16"):
        split.read_tokens(0, 20, out=buf)


def test_loading_a_split_as_float32_peaks_at_the_result_and_one_shard(tmp_path):
    """An iNaturalist-sized pooled cache read for training: the float16 shards, their concatenation and the
    float32 copy were all alive at once (twice the result). Measured in a child process's own peak RSS."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    rows, dim = 60_000, 512
    cache.write_arrays(
        tmp_path / "s", rng.normal(size=(rows, dim)).astype(np.float16), np.zeros(rows, np.int64), {"num_classes": 1},
        shard_size=8192,
    )  # fmt: skip
    code = (
        "import sys, numpy as np\n"
        "from vlmcache import cache\n"
        "from vlmcache.memory import current_rss_mb, peak_rss_mb, reset_peak\n"
        "split = cache.SplitCache(sys.argv[1]); split.labels()\n"
        "reset_peak(); before = current_rss_mb()\n"
        "x = split.load('pooled', np.float32)\n"
        "print(peak_rss_mb() - before, current_rss_mb() - before)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], capture_output=True, text=True, check=True)
    peak, kept = map(float, res.stdout.split())  # kept: the result (117 MB) and what HDF5 keeps of the files
    # before: the float16 shards and their concatenation on top (peak 210.3 MB against 151.7 MB kept); now a shard
    # (8 MB) and HDF5's read buffers (151.6 against 135.2 measured)
    assert peak - kept < 0.25 * rows * dim * 4 / 2**20, (peak, kept)


def test_shards_build_in_several_threads_at_once(tmp_path):
    """Extraction's writer threads build HDF5 images concurrently: each in its own in-memory file."""
    from concurrent.futures import ThreadPoolExecutor

    from vlmcache import cache

    rng = np.random.default_rng(0)
    arrays = {"rows": np.arange(512), "labels": np.zeros(512, np.int64), "pooled": rng.normal(size=(512, 64))}

    def write(i: int) -> dict:
        return cache.write_shard(tmp_path / cache.shard_name(i), arrays, {})

    with ThreadPoolExecutor(4) as pool:
        entries = list(pool.map(write, range(16)))
    assert len({e["sha256"] for e in entries}) == 1  # the same arrays, the same bytes
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == [cache.shard_name(i) for i in range(16)]


def test_draft_decoding_is_smaller_only_for_large_jpegs_and_a_cache_of_its_own(tmp_path):
    from PIL import Image

    from vlmcache import cache
    from vlmcache.bench.common import write_jpegs
    from vlmcache.extract import ExtractConfig, run_extract
    from vlmcache.images import decode

    split_file = write_jpegs(tmp_path / "data", 24, size=(500, 375))
    first = tmp_path / "data" / "img" / "train000000.jpg"
    assert decode(first).size == (500, 375)
    small = decode(first, (64, 64))
    assert small.size == (125, 94)  # libjpeg's 1/4 scale: 1/8 would make a side shorter than 64
    Image.open(first).save(tmp_path / "same.png")
    assert decode(tmp_path / "same.png", (64, 64)).size == (500, 375)  # not a JPEG: decoded whole

    common = dict(
        dataset="split", root=str(tmp_path / "data"), name="data", split_files={"train": str(split_file)},
        model="vlmcache-tiny", pretrained="none", device="cpu", workers=0, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    pil = run_extract(ExtractConfig(**common), log=lambda *_: None)
    draft = run_extract(ExtractConfig(**common, decode="draft"), log=lambda *_: None)
    assert pil["key"] != draft["key"]  # side by side, never mixed on resume
    a = cache.SplitCache(Path(pil["splits"][0]["path"])).pooled().astype(np.float32)
    b = cache.SplitCache(Path(draft["splits"][0]["path"])).pooled().astype(np.float32)
    assert not np.array_equal(a, b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9  # a 32-pixel input from a 1/8-scale decode: close to the full decode's
    manifest = cache.read_manifest(Path(draft["splits"][0]["path"]))
    assert manifest["fingerprint"]["encoder"]["decode"] == "draft"
    with pytest.raises(Exception, match="--decode"):
        ExtractConfig(**{**common, "decode": "nvjpeg"}).validate()


def test_device_decoding_matches_the_cpu_transform_and_falls_back_per_image(tmp_path, monkeypatch):
    """--decode gpu's path, run on the CPU (torchvision's decode_jpeg and resize on the encoder's device): JPEGs
    decoded together, a PNG and a CMYK JPEG through the CPU's decoder, a broken JPEG skipped with its reason, and
    the embeddings next to --decode pil's. On a CPU the command itself refuses --decode gpu."""
    from PIL import Image

    from vlmcache import extract
    from vlmcache.bench.common import write_jpegs
    from vlmcache.device_decode import DeviceDecoder
    from vlmcache.encoders import load_encoder
    from vlmcache.extract import ExtractConfig, run_extract

    split_file = write_jpegs(tmp_path / "data", 12, size=(120, 90))
    img = tmp_path / "data" / "img"
    Image.open(img / "train000003.jpg").save(img / "train000003.png")
    Image.open(img / "train000005.jpg").convert("CMYK").save(img / "train000005.jpg")
    (img / "train000007.jpg").write_bytes((img / "train000007.jpg").read_bytes()[:300])  # cut short
    lines = split_file.read_text().replace("train000003.jpg", "train000003.png")
    split_file.write_text(lines)

    encoder = load_encoder("vlmcache-tiny", "none", "cpu")
    on_device = DeviceDecoder(encoder.preprocess_cfg, encoder.device)
    from torchvision.io import decode_jpeg

    rgb = Image.open(img / "train000000.jpg").convert("RGB")
    ours = on_device.transform(
        decode_jpeg(torch.frombuffer(bytearray((img / "train000000.jpg").read_bytes()), dtype=torch.uint8))
    )
    assert ours.shape == encoder.preprocess(rgb).shape
    assert (ours - encoder.preprocess(rgb)).abs().mean() < 0.05  # another resize: close, not equal

    common = dict(
        dataset="split", root=str(tmp_path / "data"), name="data", split_files={"train": str(split_file)},
        model="vlmcache-tiny", pretrained="none", device="cpu", workers=0, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    with pytest.raises(VlmcacheError, match="CUDA device"):
        run_extract(ExtractConfig(**common, decode="gpu"), log=lambda *_: None)
    with pytest.raises(VlmcacheError, match="--views are cropped on the CPU"):
        run_extract(ExtractConfig(**common, decode="gpu", views=2), log=lambda *_: None)
    with pytest.raises(VlmcacheError, match="'longest' at"):
        DeviceDecoder({**encoder.preprocess_cfg, "resize_mode": "longest"}, encoder.device)
    monkeypatch.setattr(extract, "check_device_decode", lambda cfg, enc: None)  # the CPU stands in for the GPU
    gpu = run_extract(ExtractConfig(**common, decode="gpu", batch_size=5), log=lambda *_: None)
    pil = run_extract(ExtractConfig(**common), log=lambda *_: None)
    assert gpu["key"] != pil["key"] and gpu["splits"][0]["cpu_decoded"] == 2
    g, p = (cache.SplitCache(Path(r["splits"][0]["path"])) for r in (gpu, pil))
    assert np.array_equal(g.rows(), p.rows()) and 7 not in g.rows()
    skipped = cache.read_manifest(g.dir)["shards"][0]["skipped"]
    assert [x["row"] for x in skipped] == [7] and "cannot decode" in skipped[0]["reason"]
    a, b = g.pooled().astype(np.float32), p.pooled().astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99, cos
    assert cache.read_manifest(g.dir)["fingerprint"]["encoder"]["decode"] == "gpu"
    from vlmcache.train import train_head
    from vlmcache.train_config import TrainConfig

    stream = TrainConfig(
        dataset="data", cache_key=gpu["key"], cache_dir=str(tmp_path / "c"), stream=True, epochs=1,
        runs_dir=str(tmp_path / "runs"), device="cpu", select_on="none", eval_split="train",
    )  # fmt: skip
    with pytest.raises(VlmcacheError, match="decode: 'gpu' -> None.*streaming would not reproduce"):
        train_head(stream, log=lambda *_: None)


def test_shards_leave_the_page_cache_once_durable_and_parts_are_written_without_a_copy(
    tmp_path, split_dataset, monkeypatch
):
    """Each published shard is dropped from the page cache after its fsync (fadvise DONTNEED on the shard's own
    file); a dataset handed to the shard builder as parts (extraction's batches, views with no concatenated copy)
    is written as the same chunked, checksummed dataset as the whole array."""
    import os

    dropped = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    summary = _extract(tmp_path, split_dataset, tokens=True, shard_size=8, batch_size=3)
    for s in summary["splits"]:
        split_dir = Path(s["path"])
        shards = cache.read_manifest(split_dir)["shards"]
        assert s["shards"] > 1 and cache.damaged_shards(split_dir, {"shards": shards}) == {}
        names = sorted(Path(p).name.split(atomic.TMP_MARK)[0] for p in dropped if Path(p).parent == split_dir)
        assert names == sorted(e["file"] for e in shards)

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(7, 5, 4)).astype(np.float16)
    pooled = rng.normal(size=(7, 3)).astype(np.float16)
    images = {}
    for how, value in (("whole", tokens), ("parts", [tokens[:3], tokens[3:4], tokens[4:]])):
        image, _ = cache.shard_image(tmp_path / f"{how}.h5", {"pooled": pooled, "tokens": value}, {"start": 0})
        (tmp_path / f"{how}.h5").write_bytes(image)
        with h5py.File(tmp_path / f"{how}.h5", "r") as f:
            images[how] = (f["tokens"][:], f["tokens"].chunks, f["tokens"].fletcher32, f["pooled"][:])
    np.testing.assert_array_equal(images["parts"][0], tokens)
    assert images["parts"][1:3] == images["whole"][1:3] == ((1, 5, 4), True)


def test_in_memory_hdf5_image_reads_back_as_the_file_hdf5_writes_to_disk(tmp_path):
    """atomic.h5_image builds through h5py's fileobj driver into a MemoryFile. Its bytes are an HDF5 file holding
    what HDF5's default driver writes to disk for the same build (strings, groups, attributes, chunked fletcher32
    datasets written in parts), also when the file outgrows its expected size. (The layout may differ: that
    driver does not aggregate metadata.)"""
    rng = np.random.default_rng(0)
    tokens, emb = rng.normal(size=(9, 5, 4)).astype(np.float16), rng.normal(size=(3, 6)).astype(np.float32)
    names = ["a", "bé", "c" * 300]

    def build(f):
        f.attrs["fingerprint"] = json.dumps({"model": "m"})
        f.create_dataset("names", data=np.array(names, dtype=h5py.string_dtype()))
        f.create_group("set").create_dataset("embeddings", data=emb)
        d = f.create_dataset("tokens", tokens.shape, tokens.dtype, chunks=(1, 5, 4), fletcher32=True)
        d[:4], d[4:] = tokens[:4], tokens[4:]

    def content(path):
        with h5py.File(path, "r") as f:
            d = f["tokens"]
            return (
                dict(f.attrs), [s.decode() for s in f["names"][:]], f["set/embeddings"][:].tolist(),
                d[:].tolist(), d.chunks, d.fletcher32, sorted(f), sorted(f["set"]),
            )  # fmt: skip

    with h5py.File(tmp_path / "disk.h5", "w") as f:
        build(f)
    reference = content(tmp_path / "disk.h5")
    assert reference[1] == names and reference[3] == tokens.tolist()
    for expected in (1 << 20, 100):  # room for all of it; far too little, so the buffer grows as HDF5 writes
        image = atomic.h5_image(build, expected=expected)
        (tmp_path / f"image{expected}.h5").write_bytes(image)
        assert content(tmp_path / f"image{expected}.h5") == reference
    assert bytes(atomic.h5_image(build)) == bytes(image)  # the same build, the same bytes (and sha256)


def test_memory_file_reads_unwritten_bytes_as_zeros():
    """As a file does: a write past the end, or a truncate that lengthens it, leaves zeros in the gap (the buffer
    is allocated uninitialised)."""
    f = atomic.MemoryFile(16)
    f.buf[:] = 0xFF
    f.seek(4)
    f.write(b"ab")
    assert bytes(f.view()) == b"\0\0\0\0ab"
    f.truncate(40)  # beyond the buffer: it grows
    f.seek(0)
    assert f.read() == b"\0\0\0\0ab" + b"\0" * 34 and f.tell() == 40
    f.seek(-2, 2)
    f.write(b"xyz")
    assert f.size == 41 and bytes(f.view())[-4:] == b"\0xyz"
    f.truncate(3)
    assert bytes(f.view()) == b"\0\0\0"


def _stacked_in_shared_memory(items):
    from vlmcache.image_rows import collate

    batch = collate(items)
    return {"rows": batch["rows"], "shared": (batch["images"].is_shared(), batch["views"].is_shared())}


def test_loader_workers_stack_batches_straight_into_shared_memory(split_dataset, tiny_encoder):
    """In a worker, collate makes the batch's images and views in shared memory (so the loader need not copy
    them there to hand them over); the images are the transform's, in order."""
    from vlmcache.datasets import load_dataset
    from vlmcache.image_rows import ImageRows, collate, image_loader

    root, files = split_dataset
    source = load_dataset("split", root, {s: str(p) for s, p in files.items()}).splits["train"].source
    data = ImageRows(source, np.arange(6), tiny_encoder.preprocess, 2, tiny_encoder.train_transform(), 0)
    seen = list(image_loader(data, 3, 1, collate_fn=_stacked_in_shared_memory))
    assert [b["shared"] for b in seen] == [(True, True)] * 2
    assert torch.cat([b["rows"] for b in seen]).tolist() == list(range(6))
    batch = collate([data[i] for i in range(3)])  # in the main process: an ordinary stack
    expected = torch.stack([tiny_encoder.preprocess(source.load(i)) for i in range(3)])
    assert torch.equal(batch["images"], expected) and batch["views"].shape[:2] == (3, 2)


def test_uint8_handover_finishes_to_the_whole_transforms_numbers_bit_for_bit(tiny_encoder):
    """handover.cut: the workers' part ends in uint8 pixels and `finish` (on a batch) gives exactly the floats of
    the whole transform, for open_clip's eval transform at 32 and 224 px, the seed study's, and a seeded training
    view (the random crop and flip draw the same numbers); a transform that does not end in ToTensor, Normalize
    is left whole."""
    import open_clip
    from torchvision import transforms as T

    from vlmcache import handover
    from vlmcache.encoders import _seed_preprocess
    from vlmcache.image_rows import seeded_view

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((375, 500), (300, 260))]
    seed, _ = _seed_preprocess("m", {"size": 224})
    transforms = {
        "open_clip 32": tiny_encoder.preprocess,
        "open_clip 224": open_clip.image_transform(224, is_train=False),
        "seed": seed,
        "view": tiny_encoder.train_transform(),
    }
    for name, whole in transforms.items():
        part, finish = handover.cut(whole)
        assert finish is not None, name
        if name == "view":
            reference = torch.stack([seeded_view(whole, img, 3, row, 1) for row, img in enumerate(images)])
            handed = torch.stack([seeded_view(part, img, 3, row, 1) for row, img in enumerate(images)])
        else:
            reference = torch.stack([whole(img) for img in images])
            handed = torch.stack([part(img) for img in images])
        assert handed.dtype == torch.uint8 and handed.shape == reference.shape, name
        assert torch.equal(finish(handed), reference), name
        batch = handover.finished({"images": handed, "views": handed[:, None]}, torch.device("cpu"), finish, finish)
        assert torch.equal(batch["images"], reference) and torch.equal(batch["views"][:, 0], reference), name
    plain = T.Compose([T.ToTensor()])
    assert handover.cut(plain) == (plain, None)


def test_extraction_through_the_uint8_handover_equals_the_whole_transform(tmp_path, split_dataset, monkeypatch):
    """The cache made with the workers handing over uint8 images equals, bit for bit, the one made with the whole
    transform in the workers (pooled, tokens and views)."""
    from vlmcache import handover

    handed = _extract(tmp_path / "handed", split_dataset, tokens=True, views=2, shard_size=20, workers=1)
    monkeypatch.setattr(handover, "cut", lambda transform: (transform, None))
    whole = _extract(tmp_path / "whole", split_dataset, tokens=True, views=2, shard_size=20, workers=1)
    for split in ("train", "test"):
        a, b = cache.SplitCache(f"{handed['cache']}/{split}"), cache.SplitCache(f"{whole['cache']}/{split}")
        np.testing.assert_array_equal(a.pooled(), b.pooled())
        np.testing.assert_array_equal(a.read_tokens(0, len(a)), b.read_tokens(0, len(b)))
        if split == "train":
            np.testing.assert_array_equal(a.load("views"), b.load("views"))


def test_handover_finish_makes_its_constants_once_per_device(tiny_encoder, monkeypatch):
    """The finish's 255, mean and std are made once per device, not per batch (on CUDA, a tensor made from Python
    numbers waits for the work queued on the stream): a second batch makes no tensor from numbers, and gives the
    same numbers."""
    from vlmcache import handover

    _, finish = handover.cut(tiny_encoder.preprocess)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    first = finish(images)
    made = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    assert torch.equal(finish(images), first) and made == []
