"""The fault suite: kills, full disks, damaged shards, hostile inputs and many processes, each with the outcome
a trusted tool promises. A subprocess wherever a process must die."""

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_same_cache, extract_cmd, long_tailed_features, run, write_feature_cache

from vlmcache import atomic, cache, runs
from vlmcache.errors import VlmcacheError
from vlmcache.extract import ExtractConfig, run_extract
from vlmcache.features import TokenBlocks
from vlmcache.train import train_head
from vlmcache.train_config import TrainConfig


def _extract_cmd(root: Path, files: dict, cache_dir: Path, *extra: str) -> list[str]:
    return extract_cmd(root, files, cache_dir, "--shard-size", "9", "--workers", "0", *extra)


def _split_dir(stdout: str) -> Path:
    return Path(json.loads(stdout)["splits"][0]["path"])


@pytest.fixture(scope="module")
def reference(split_dataset, tmp_path_factory):
    """An uninterrupted single-process extraction (47 rows, shards of 9: the count is not a multiple of 2)."""
    root, files = split_dataset
    out = run(_extract_cmd(root, files, tmp_path_factory.mktemp("ref")))
    assert out.returncode == 0, out.stderr
    return _split_dir(out.stdout)


def _twin(reference: Path, cache_dir: Path) -> Path:
    return cache_dir / reference.relative_to(reference.parents[2])


# --------------------------------------------------------------------------- many processes


def test_torchrun_two_processes_then_resume_with_one(split_dataset, reference, tmp_path):
    root, files = split_dataset
    killed = run(_extract_cmd(root, files, tmp_path, "--nproc", "2"), VLMCACHE_FAULT="shard_published:2")
    assert killed.returncode != 0  # every rank killed itself after its second shard; torchrun reports it
    split_dir = _twin(reference, tmp_path)
    manifest = cache.read_manifest(split_dir)
    assert 1 <= len(manifest["shards"]) < 6 and not manifest["complete"]
    assert {p.name for p in split_dir.glob("shard-*.h5")} == {e["file"] for e in manifest["shards"]}

    resumed = run(_extract_cmd(root, files, tmp_path))  # a different world size
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["splits"][0]["resumed_shards"] == len(manifest["shards"])
    assert_same_cache(split_dir, reference)


def test_torchrun_two_processes_write_every_row_once(split_dataset, reference, tmp_path):
    root, files = split_dataset
    out = run(_extract_cmd(root, files, tmp_path, "--nproc", "2"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)  # only rank 0 prints
    assert summary["processes"] == 2 and len(summary["peak_rss_mb"]) == 2
    split_dir = _twin(reference, tmp_path)
    rows = cache.SplitCache(split_dir).rows()
    assert sorted(rows.tolist()) == list(range(47)) and len(set(rows.tolist())) == 47
    assert_same_cache(split_dir, reference)


def test_a_signal_to_the_nproc_launcher_alone_stops_every_rank(split_dataset, tmp_path):
    """`extract --nproc 2` killed by its pid (a scheduler's SIGTERM, `kill -INT`): the launcher passes it on, so no
    rank goes on writing the cache after the command has ended."""
    root, files = split_dataset
    proc = subprocess.Popen(
        _extract_cmd(root, files, tmp_path, "--nproc", "2"), start_new_session=True,
        env={**os.environ, "VLMCACHE_FAULT": "shard_published:1:HANG"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("shard-*.h5")) and time.monotonic() < deadline:  # both ranks under way
        time.sleep(0.2)
    assert proc.poll() is None, "the launcher ended before its ranks started"
    proc.send_signal(signal.SIGTERM)  # to the launcher's pid alone, not its group (SIGINT takes the same path)
    proc.wait(60)
    for _ in range(150):  # every process of this command (torchrun and its ranks, whatever their session) is gone
        left = _processes_naming(tmp_path)
        if not left:
            break
        time.sleep(0.2)
    else:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{len(left)} processes went on after the launcher ended")


def _processes_naming(path: Path) -> list[int]:
    """The pids whose command line holds `path` (this test's own folder, so no other process matches)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- kills and full disks


def test_sigkill_mid_shard_leaves_nothing_visible(split_dataset, reference, tmp_path):
    root, files = split_dataset
    killed = run(_extract_cmd(root, files, tmp_path), VLMCACHE_FAULT="shard_written:3")
    assert killed.returncode == -signal.SIGKILL
    split_dir = _twin(reference, tmp_path)
    manifest = cache.read_manifest(split_dir)
    assert [e["file"] for e in manifest["shards"]] == ["shard-00000.h5", "shard-00001.h5"]
    assert not (split_dir / "shard-00002.h5").exists() and list(split_dir.glob("shard-00002.h5.tmp-*"))
    resumed = run(_extract_cmd(root, files, tmp_path))
    assert resumed.returncode == 0 and not list(split_dir.glob("*.tmp-*"))
    assert_same_cache(split_dir, reference)


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_is_a_clear_error_and_resume_completes(split_dataset, reference, tmp_path):
    root, files = split_dataset
    run(_extract_cmd(root, files, tmp_path), VLMCACHE_FAULT="shard_published:2")
    split_dir = _twin(reference, tmp_path)
    before = (split_dir / cache.MANIFEST).read_bytes()
    shard_bytes = (split_dir / "shard-00000.h5").stat().st_size
    full = run(_extract_cmd(root, files, tmp_path), preexec=_limit_file_size(shard_bytes // 2))
    assert full.returncode == 2, full.stderr
    assert "Is the disk full?" in full.stderr and "Traceback" not in full.stderr
    assert (split_dir / cache.MANIFEST).read_bytes() == before  # untouched
    assert not list(split_dir.glob("*.tmp-*"))  # the temporary file is removed
    resumed = run(_extract_cmd(root, files, tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_cache(split_dir, reference)


# --------------------------------------------------------------------------- damaged shards


def _flip_pooled_byte(shard: Path) -> None:
    with h5py.File(shard, "r") as f:
        offset = f["pooled"].id.get_chunk_info(0).byte_offset
    data = bytearray(shard.read_bytes())
    data[offset + 5] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_flipped_byte_verify_names_it_training_refuses_repair_fixes_only_it(split_dataset, reference, tmp_path):
    root, files = split_dataset
    cfg = ExtractConfig(
        dataset="split",
        name="split",
        root=str(root),
        split_files={"train": str(files["train"])},
        cache_dir=str(tmp_path),
        shard_size=9,
        tokens=True,
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
    )
    summary = run_extract(cfg, log=lambda *a: None)
    split_dir = Path(summary["splits"][0]["path"])
    _flip_pooled_byte(split_dir / "shard-00002.h5")
    problems = cache.verify_split(split_dir)
    assert len(problems) == 1 and "shard-00002.h5" in problems[0] and "sha256 differs" in problems[0]

    with pytest.raises(VlmcacheError, match=r"shard-00002.h5' cannot be read .* --repair"):
        cache.SplitCache(split_dir).pooled()  # fletcher32 catches it on read
    with pytest.raises(VlmcacheError, match="shard-00002.h5"):
        train_head(
            TrainConfig(
                dataset="split",
                model="vlmcache-tiny",
                pretrained="none",
                cache_dir=str(tmp_path),
                eval_split="train",
                runs_dir=str(tmp_path / "runs"),
                device="cpu",
                epochs=1,
            )
        )

    mtimes = {p.name: p.stat().st_mtime_ns for p in split_dir.glob("shard-*.h5")}
    out = run([sys.executable, "-m", "vlmcache", "cache", "verify", "--repair", "--cache-dir", str(tmp_path), "--json"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["repaired"] == [str(split_dir / "shard-00002.h5")]
    after = {p.name: p.stat().st_mtime_ns for p in split_dir.glob("shard-*.h5")}
    assert [n for n in mtimes if after[n] != mtimes[n]] == ["shard-00002.h5"]
    assert cache.verify_split(split_dir) == []
    assert_same_cache(split_dir, reference)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_hdf5"])
def test_broken_shard_files_are_detected_without_hanging(split_dataset, reference, tmp_path, damage):
    root, files = split_dataset
    shutil.copytree(reference.parents[2], tmp_path, dirs_exist_ok=True)  # the same command's cache, copied
    split_dir = _twin(reference, tmp_path)
    shard = split_dir / "shard-00001.h5"
    content = {
        "truncated": shard.read_bytes()[: shard.stat().st_size // 2],
        "empty": b"",
        "not_hdf5": b"this is not an HDF5 file" * 100,
    }[damage]
    shard.write_bytes(content)
    t0 = time.time()
    verify = run([sys.executable, "-m", "vlmcache", "cache", "verify", "--cache-dir", str(tmp_path)])
    assert verify.returncode == 1 and "shard-00001.h5" in verify.stdout
    with pytest.raises(VlmcacheError, match="shard-00001.h5"):
        cache.SplitCache(split_dir).pooled()
    assert time.time() - t0 < 60
    resumed = run(_extract_cmd(root, files, tmp_path))  # the size no longer matches: extracted again
    assert resumed.returncode == 0 and "shard-00001.h5 is missing or has the wrong size" in resumed.stderr
    assert_same_cache(split_dir, reference)


def test_resume_trusts_sizes_unless_asked_to_verify(split_dataset, tmp_path, monkeypatch):
    root, files = split_dataset
    base = dict(
        dataset="split",
        root=str(root),
        split_files={"train": str(files["train"])},
        cache_dir=str(tmp_path),
        shard_size=9,
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
    )
    split_dir = Path(run_extract(ExtractConfig(**base), log=lambda *a: None)["splits"][0]["path"])
    _flip_pooled_byte(split_dir / "shard-00000.h5")
    hashed = []
    real = atomic.sha256_file

    def spy(p):
        return hashed.append(Path(p).name) or real(p)

    monkeypatch.setattr(atomic, "sha256_file", spy)  # where extraction's resume check looks it up
    monkeypatch.setattr(cache, "sha256_file", spy)  # and cache.damaged_shards (it imports the name)
    again = run_extract(ExtractConfig(**base), log=lambda *a: None)
    assert again["splits"][0]["resumed_shards"] == 6 and hashed == []  # nothing re-hashed, nothing redone
    checked = run_extract(ExtractConfig(**base, verify=True), log=lambda *a: None)
    assert checked["splits"][0]["resumed_shards"] == 5 and cache.verify_split(split_dir) == []


# --------------------------------------------------------------------------- hostile and broken inputs


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_skipped_with_bounded_memory(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "bomb.png").write_bytes(_png_header_only(60_000, 60_000))  # 3.6 G pixels, 10.8 GB as RGB
    from PIL import Image

    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "train.txt").write_text("img/bomb.png 0\nimg/ok.png 1\n")
    out = run(
        [
            sys.executable,
            "-m",
            "vlmcache",
            "extract",
            "--dataset",
            "split",
            "--root",
            str(tmp_path),
            "--split-file",
            f"train={tmp_path / 'train.txt'}",
            "--cache-dir",
            str(tmp_path / "c"),
            "--model",
            "vlmcache-tiny",
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--json",
        ]
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["splits"][0]["rows"] == 1 and summary["splits"][0]["skipped"] == 1
    assert max(summary["peak_rss_mb"]) < 2000
    manifest = cache.read_manifest(Path(summary["splits"][0]["path"]))
    assert "decompression bomb" in manifest["shards"][0]["skipped"][0]["reason"]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan, -np.nan])
def test_the_float16_finite_check_finds_every_non_finite_value_and_passes_the_extremes(bad):
    """The bit test (exponent all ones) against numpy's isfinite: the largest finite float16 values, subnormals
    and signed zeros pass; inf, -inf and NaN of either sign anywhere in a token array are found, naming the row."""
    from types import SimpleNamespace

    from vlmcache.shard_writer import _check_finite

    split = SimpleNamespace(source=SimpleNamespace(describe=lambda row: f"img/{row}.jpg"))
    tokens = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float16)
    tokens[0, 0, :] = [np.finfo(np.float16).max, np.finfo(np.float16).min, np.finfo(np.float16).smallest_subnormal]
    tokens[1, 0, :] = [0.0, -0.0, -np.finfo(np.float16).smallest_subnormal]
    rows = np.arange(10, 15)
    _check_finite("tokens", tokens, rows, split)
    for where in [(0, 0, 0), (4, 6, 2), (2, 3, 1)]:
        broken = tokens.copy()
        broken[where] = bad
        assert not np.isfinite(broken).all()
        with pytest.raises(
            VlmcacheError, match=rf"tokens embedding of row {10 + where[0]} \('img/{10 + where[0]}.jpg'\)"
        ):
            _check_finite("tokens", broken, rows, split)


def test_non_finite_embeddings_are_rejected_at_write_naming_the_row(split_dataset, tmp_path, monkeypatch):
    from vlmcache.encoders import Encoder

    real = Encoder.encode_images

    def overflowing(self, images, tokens=False):
        pooled, tok = real(self, images, tokens)
        pooled = pooled.clone()
        if len(pooled) > 3:
            pooled[3, 0] = 1e6  # beyond float16's range: inf in the cache
        return pooled, tok

    monkeypatch.setattr(Encoder, "encode_images", overflowing)
    root, files = split_dataset
    cfg = ExtractConfig(
        dataset="split",
        name="split",
        root=str(root),
        split_files={"train": str(files["train"])},
        cache_dir=str(tmp_path),
        shard_size=9,
        batch_size=9,
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
    )
    with pytest.raises(VlmcacheError, match=r"row 3 \('images/train/c0/003.png'\) is not finite"):
        run_extract(cfg, log=lambda *a: None)
    split_dir = next(tmp_path.rglob("train"))
    manifest = cache.read_manifest(split_dir)  # none yet: the first shard was the one refused
    assert not list(split_dir.glob("shard-*")) and (manifest is None or manifest["shards"] == [])


def test_symlinks_out_of_the_root_are_refused(tmp_path):
    from PIL import Image

    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "img" / "ok.png")
    (root / "img" / "link.png").symlink_to(outside / "secret.png")
    os.symlink(outside, root / "dirlink")
    (root / "train.txt").write_text("img/ok.png 0\nimg/link.png 0\ndirlink/secret.png 1\n")
    cfg = ExtractConfig(
        dataset="split",
        name="split",
        root=str(root),
        split_files={"train": str(root / "train.txt")},
        cache_dir=str(tmp_path / "c"),
        model="vlmcache-tiny",
        pretrained="none",
        device="cpu",
        workers=0,
    )
    summary = run_extract(cfg, log=lambda *a: None)
    manifest = cache.read_manifest(Path(summary["splits"][0]["path"]))
    reasons = {x["path"]: x["reason"] for e in manifest["shards"] for x in e["skipped"]}
    assert set(reasons) == {"img/link.png", "dirlink/secret.png"}
    assert all("outside --root" in r for r in reasons.values()) and summary["splits"][0]["rows"] == 1


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "head.pt", "wb") as f:
        pickle.dump({"head": _Payload()}, f)
    monkeypatch.chdir(tmp_path)  # where the payload would write
    with pytest.raises(VlmcacheError, match="not a vlmcache head"):
        runs.load_head_file(run_dir, torch.device("cpu"))  # what load_run and eval of a fine-tuning run use
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    x, y = long_tailed_features(np.random.default_rng(0), [300, 80, 20])
    tokens = np.random.default_rng(1).normal(size=(len(y), 5, 16)).astype(np.float16)
    write_feature_cache(
        d,
        "synth",
        {"train": (x, y, tokens), "test": (x, y, tokens)},
        3,
        shard_size=70,
        key="vlmcache-tiny__random__00000000",
    )
    return d


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers_read_the_token_store(token_cache, context):
    split = cache.SplitCache(token_cache / "synth" / "vlmcache-tiny__random__00000000" / "train")
    split.read_tokens(0, 10)  # the parent has files open; the workers must not inherit handles
    blocks = TokenBlocks(split, block_rows=64)
    loader = torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=2, multiprocessing_context=context)
    got = [(x, y) for x, y in loader]
    np.testing.assert_array_equal(torch.cat([x for x, _ in got]).numpy(), split.read_tokens(0, len(split)))
    np.testing.assert_array_equal(torch.cat([y for _, y in got]).numpy(), split.labels())


def test_concurrent_readers_and_cache_ls(token_cache, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "vlmcache",
        "train-head",
        "-d",
        "split",
        "-m",
        "vlmcache-tiny",
        "-p",
        "none",
        "--cache-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--json",
    ]

    shutil.copytree(token_cache / "synth", tmp_path / "split")
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(s), "--runs-dir", str(tmp_path / f"r{s}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for s in range(3)
    ]
    shard = next((tmp_path / "split").rglob("shard-00000.h5"))
    reader = cache.SplitCache(shard.parent)
    reader.pooled()  # this process holds the shards open for reading while the others train
    # a writer in another process (HDF5 locking on) can still open them: no reader holds a file lock
    writer = run([sys.executable, "-c", f"import h5py; h5py.File({str(shard)!r}, 'r+').close()"])
    assert writer.returncode == 0, writer.stderr
    ls = run([sys.executable, "-m", "vlmcache", "cache", "ls", "--cache-dir", str(tmp_path), "--json"])
    assert ls.returncode == 0 and json.loads(ls.stdout)["caches"][0]["splits"]["train"]["complete"]
    for p in procs:
        out, errs = p.communicate(timeout=300)
        assert p.returncode == 0, errs
        assert 0 <= json.loads(out)["metrics"]["overall"] <= 1
