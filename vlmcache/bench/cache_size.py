"""Section 5: bytes per image and read speed of pooled and tokens, raw and compressed."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np

from vlmcache.bench.common import table


def bench_cache_size(rows: int, dim: int, token_shape: tuple, folder: Path) -> dict:
    """Bytes per image and sequential read speed of pooled and tokens, raw and compressed."""
    codecs = {"none": {}, "gzip-4": {"compression": "gzip", "compression_opts": 4}}
    try:
        import hdf5plugin

        codecs["blosc-lz4"] = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        codecs["blosc-zstd"] = dict(hdf5plugin.Blosc(cname="zstd", clevel=3, shuffle=hdf5plugin.Blosc.SHUFFLE))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    # CLIP-like values: float16 embeddings of modest range (random normals compress like real features do: poorly)
    arrays = {
        "pooled": (rng.normal(size=(rows, dim)) * 0.5).astype(np.float16),
        "tokens": (rng.normal(size=(rows, *token_shape)) * 0.5).astype(np.float16),
    }
    out = {"rows": rows, "pooled_dim": dim, "token_shape": list(token_shape), "codecs": {}}
    for codec, kw in codecs.items():
        row = {}
        for name, arr in arrays.items():
            path = folder / f"{codec}-{name}.h5"
            chunks = (1, *arr.shape[1:]) if name == "tokens" else (min(4096, rows), dim)
            t0 = time.perf_counter()
            with h5py.File(path, "w") as f:
                f.create_dataset(name, data=arr, chunks=chunks, **kw)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with h5py.File(path, "r") as f:
                f[name][()]
            read_s = time.perf_counter() - t0
            row[name] = {
                "bytes_per_image": round(path.stat().st_size / rows, 1),
                "read_mb_per_s": round(arr.nbytes / 2**20 / read_s, 1),
                "write_mb_per_s": round(arr.nbytes / 2**20 / write_s, 1),
            }
        out["codecs"][codec] = row
    return out


def markdown(r: dict) -> list[str]:
    cs = r["cache_size"]
    rows = [
        {
            "codec": codec,
            "pooled B/img": row["pooled"]["bytes_per_image"],
            "pooled read MB/s": row["pooled"]["read_mb_per_s"],
            "tokens B/img": row["tokens"]["bytes_per_image"],
            "tokens read MB/s": row["tokens"]["read_mb_per_s"],
            "tokens write MB/s": row["tokens"]["write_mb_per_s"],
        }
        for codec, row in cs["codecs"].items()
    ]
    return [
        f"## 5. Cache size and read speed ({cs['rows']:,} rows; pooled {cs['pooled_dim']}, tokens "
        f"{cs['token_shape']}, float16)",
        "",
        table(rows),
        "",
        "The data are random normals in float16, a lower bound on what compression saves: real embeddings "
        "may compress somewhat better. The cache stores them raw, for read speed.",
    ]
