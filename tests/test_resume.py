"""Kill and resume with real processes: a resumed cache equals an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from vlmcache import cache


def _cmd(root: Path, files: dict, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vlmcache",
        "extract",
        "--dataset",
        "split",
        "--root",
        str(root),
        "--split-file",
        f"train={files['train']}",
        "--classnames",
        str(root / "classnames.txt"),
        "--model",
        "vlmcache-tiny",
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--cache-dir",
        str(cache_dir),
        "--shard-size",
        "8",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--tokens",
        "--json",
        *extra,
    ]


def _run(cmd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def _arrays(split_dir: Path) -> dict:
    c = cache.SplitCache(split_dir)
    return {"rows": c.rows(), "labels": c.labels(), "pooled": c.pooled(), "tokens": c.read_tokens(0, len(c))}


def _assert_same(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["rows"], b["rows"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    # float16 tolerance: a resumed run batches the rows differently, which may move the last bit
    np.testing.assert_allclose(a["pooled"].astype(np.float32), b["pooled"].astype(np.float32), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(a["tokens"].astype(np.float32), b["tokens"].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_sigkill_after_first_shard_then_resume_equals_uninterrupted(tmp_path, split_dataset):
    root, files = split_dataset
    full = _run(_cmd(root, files, tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    reference_dir = Path(json.loads(full.stdout)["splits"][0]["path"])

    killed = _run(_cmd(root, files, tmp_path / "resumed"), VLMCACHE_FAULT="shard_published:1")
    assert killed.returncode == -signal.SIGKILL
    split_dir = tmp_path / "resumed" / reference_dir.relative_to(tmp_path / "full")
    manifest = cache.read_manifest(split_dir)
    assert len(manifest["shards"]) == 1 and not manifest["complete"]
    listed = {e["file"] for e in manifest["shards"]}
    assert {p.name for p in split_dir.glob("shard-*.h5")} == listed  # no unlisted shard is visible
    (split_dir / "shard-00001.h5.tmp-999999").write_bytes(b"half a shard")  # a leftover of a dead process

    resumed = _run(_cmd(root, files, tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)["splits"][0]
    assert summary["resumed_shards"] == 1 and summary["rows"] == 47
    assert not list(split_dir.glob("*.tmp-*"))
    assert "removed a leftover temporary file: shard-00001.h5.tmp-999999" in resumed.stderr
    _assert_same(_arrays(split_dir), _arrays(reference_dir))
    assert cache.verify_split(split_dir) == []


def test_external_sigkill_at_any_moment_then_resume(tmp_path, split_dataset):
    """Killed from outside as soon as one shard is published, wherever the writer then is."""
    root, files = split_dataset
    reference = _run(_cmd(root, files, tmp_path / "ref"))
    reference_dir = Path(json.loads(reference.stdout)["splits"][0]["path"])
    split_dir = tmp_path / "kill" / reference_dir.relative_to(tmp_path / "ref")
    proc = subprocess.Popen(_cmd(root, files, tmp_path / "kill"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = (split_dir / cache.MANIFEST).is_file() and cache.read_manifest(split_dir)
        if m and m["shards"]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    m = cache.read_manifest(split_dir)
    assert {p.name for p in split_dir.glob("shard-*.h5")} == {e["file"] for e in m["shards"]}
    resumed = _run(_cmd(root, files, tmp_path / "kill"))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(_arrays(split_dir), _arrays(reference_dir))


def test_a_changed_fingerprint_is_refused_in_a_new_process(tmp_path, split_dataset):
    root, files = split_dataset
    killed = _run(_cmd(root, files, tmp_path), VLMCACHE_FAULT="shard_published:1")
    assert killed.returncode == -signal.SIGKILL
    cmd = [c for c in _cmd(root, files, tmp_path) if c != "--tokens"]
    refused = _run(cmd)
    assert refused.returncode == 2
    assert "tokens: True -> False" in refused.stderr and "Traceback" not in refused.stderr
