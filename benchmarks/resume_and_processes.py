"""Two figures for the fault and scale work:

    python benchmarks/resume_and_processes.py

1. How long a resume takes to decide what is done, on a cache of 1,000 shards (manifest and file sizes only,
   and with --verify, which re-hashes every shard).
2. Peak memory (RSS) of each extraction process at 1, 2 and 4 processes (torchrun, gloo on CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vlmcache.extract import ExtractConfig, _prepare_split_dir, run_extract


def write_images(root: Path, n: int, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {i % 10}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root / "train.txt"


def main() -> None:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split_file = write_images(root, 1000)
        cfg = ExtractConfig(
            dataset="split",
            root=str(root),
            split_files={"train": str(split_file)},
            cache_dir=str(root / "cache"),
            shard_size=1,
            model="vlmcache-tiny",
            pretrained="none",
            device="cpu",
            workers=0,
            templates=["photo"],
        )
        t0 = time.perf_counter()
        summary = run_extract(cfg, log=lambda *a: None)
        out["extract_1000_shards_s"] = round(time.perf_counter() - t0, 2)
        split_dir = Path(summary["splits"][0]["path"])
        manifest = json.loads((split_dir / "manifest.json").read_text())
        for verify in (False, True):
            cfg.verify = verify
            t0 = time.perf_counter()
            kept = _prepare_split_dir(split_dir, manifest["fingerprint"], cfg, log=lambda *a: None)
            out[f"resume_decision_s{'_verify' if verify else ''}"] = round(time.perf_counter() - t0, 4)
            assert len(kept["shards"]) == 1000
        cfg.verify = False
        t0 = time.perf_counter()
        again = run_extract(cfg, log=lambda *a: None)
        out["resume_whole_command_s"] = round(time.perf_counter() - t0, 2)
        assert again["splits"][0]["resumed_shards"] == 1000

        small = root / "small"
        small_file = write_images(small, 64, size=224)
        for nproc in (1, 2, 4):
            cmd = [
                sys.executable,
                "-m",
                "vlmcache",
                "extract",
                "--dataset",
                "split",
                "--root",
                str(small),
                "--split-file",
                f"train={small_file}",
                "--cache-dir",
                str(root / f"c{nproc}"),
                "--shard-size",
                "8",
                "--model",
                "ViT-B-16",
                "--pretrained",
                "none",
                "--device",
                "cpu",
                "--workers",
                "1",
                "--batch-size",
                "32",
                "--templates",
                "photo",
                "--nproc",
                str(nproc),
                "--json",
            ]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            body = json.loads(res.stdout)
            out[f"processes_{nproc}"] = {
                "peak_rss_mb_per_process": body["peak_rss_mb"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
