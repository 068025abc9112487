"""Per-image predictions (`--save-predictions`): a parquet file with a row per evaluated image, written chunk
by chunk as evaluation reduces its logits, so memory holds the top-k of one chunk whatever the class count.

Columns: `row` (the split's row), `path` (the image, relative to the root it was read from; empty for a cache
made before paths were stored), `label`, `class_name`, `pred`, `pred_name`, `correct`, `topk` (the k best
classes, best first) and `topk_scores` (their scores: the logits the metrics ranked, after any logit
adjustment; kNN's log class probabilities, -inf for a class that got no vote, which is never a hit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlmcache import atomic, cache, guard
from vlmcache.errors import VlmcacheError

FILE = "predictions.parquet"


def require_pyarrow():
    """(pyarrow, pyarrow.parquet), or the one-line error: called before training too, so that a run that will
    save predictions cannot fail for want of pyarrow after it trained."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise VlmcacheError("--save-predictions writes parquet, which needs pyarrow: pip install pyarrow.") from None
    return pa, pq


class PredictionWriter:
    """Feeds on (top-k classes, top-k scores, labels) per chunk in row order; `close()` publishes the file."""

    def __init__(self, path: Path, split: cache.SplitCache, classnames: list[str], k: int = 5):
        pa, pq = require_pyarrow()
        # as the Evaluator's top-k: a dataset of 2 to 4 classes has rows of C classes, and the schema says so
        self.pa, self.path, self.k = pa, Path(path), min(k, len(classnames))
        self.rows = split.rows()
        self.paths = split.paths()
        self.classnames = np.asarray(classnames, dtype=object)
        self.schema = pa.schema(
            [
                ("row", pa.int64()),
                ("path", pa.string()),
                ("label", pa.int64()),
                ("class_name", pa.string()),
                ("pred", pa.int64()),
                ("pred_name", pa.string()),
                ("correct", pa.bool_()),
                ("topk", pa.list_(pa.int32(), self.k)),
                ("topk_scores", pa.list_(pa.float32(), self.k)),
            ],
            metadata=dict([guard.PREDICTIONS_MARKER]),  # the guard's mark: --overwrite may replace this file
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = atomic.tmp_name(self.path)
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.done = 0

    def write(self, topk: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        pa, n = self.pa, len(labels)
        lo, hi = self.done, self.done + n
        if hi > len(self.rows):
            raise VlmcacheError(f"More predictions ({hi}) than rows in the split ({len(self.rows)}).")
        pred = topk[:, 0].astype(np.int64)
        columns = [
            self.rows[lo:hi].astype(np.int64),
            self.paths[lo:hi] if self.paths is not None else [None] * n,
            labels.astype(np.int64),
            self.classnames[labels].tolist(),
            pred,
            self.classnames[pred].tolist(),
            pred == labels,
            pa.FixedSizeListArray.from_arrays(pa.array(topk.astype(np.int32).reshape(-1)), self.k),
            pa.FixedSizeListArray.from_arrays(pa.array(scores.astype(np.float32).reshape(-1)), self.k),
        ]
        self.writer.write_table(pa.table(columns, schema=self.schema))
        self.done = hi

    def close(self) -> Path:
        self.writer.close()
        if self.done != len(self.rows):
            self.tmp.unlink(missing_ok=True)
            raise VlmcacheError(f"Predictions cover {self.done} of the split's {len(self.rows)} rows; none written.")
        atomic.publish(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)
