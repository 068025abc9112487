"""`cache verify` checks text.h5 as it checks shards: its schema, its class names against the splits, and the
fletcher32 checksum of its embeddings."""

import json

import h5py
import numpy as np
from conftest import write_feature_cache
from typer.testing import CliRunner

from vlmcache import text_cache
from vlmcache.cli import app


def _verify(model_dir):
    res = CliRunner().invoke(app, ["cache", "verify", str(model_dir), "--json"])
    return res.exit_code, json.loads(res.stdout)["problems"] if res.stdout.strip() else res.output


def test_cache_verify_names_a_damaged_or_mismatched_text_file(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)).astype(np.float32), np.arange(30) % 3
    model_dir = write_feature_cache(tmp_path, "toy", {"train": (x, y, None)}, 3)
    text = model_dir / text_cache.TEXT_FILE
    good = text.read_bytes()
    assert _verify(model_dir) == (0, [])

    with h5py.File(text, "r") as f:  # one byte of the embeddings, inside their checksummed chunk
        at = f["photo/embeddings"].id.get_chunk_info(0).byte_offset + 5
    data = bytearray(good)
    data[at] ^= 0x10
    text.write_bytes(bytes(data))
    code, problems = _verify(model_dir)
    assert code == 1 and len(problems) == 1 and "text.h5" in problems[0] and "not a valid class-text" in problems[0]

    text.write_bytes(good[: len(good) // 2])  # cut
    code, problems = _verify(model_dir)
    assert code == 1 and "text.h5" in problems[0]

    names = [f"class {i}" for i in range(4)]  # a valid file for another class count
    text_cache.write_text(
        text, text_cache.TextCache({}, names, {"photo": (["{}"], np.eye(4, 8, dtype=np.float32))}, 100.0)
    )
    code, problems = _verify(model_dir)
    assert code == 1 and problems == [f"{text}: 4 class names, the split 'train' has 3 classes"]

    text.unlink()
    code, problems = _verify(model_dir)
    assert code == 1 and problems == [f"{text}: missing (class names and zero-shot texts are read from it)"]
