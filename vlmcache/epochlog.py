"""`--log tensorboard|csv`: a run's per-epoch curves where researchers look at them.

Each epoch logs the mean training loss, the learning rate at its end, samples/s and, when a split scores
the epochs (`--select-on`), that split's accuracy. While the run trains the log is written inside the run's own
staging folder, `RUNS/<run>.tmp-<pid>.<random>/logs/` (point TensorBoard at RUNS to watch it); the finished run
holds it in `<run>/logs/`. Nothing outside the run is made or removed.
TensorBoard event files need the `tensorboard` package (`pip install 'vlmcache[tensorboard]'`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from vlmcache.errors import VlmcacheError

LOGS = ("tensorboard", "csv")
CSV_FIELDS = ("epoch", "step", "loss", "lr", "samples_per_s", "seconds", "select_score")


class EpochLog:
    """Called with each epoch's history row; `close()` returns the finished folder."""

    def __init__(self, kind: str, folder: Path, select_split: str | None = None):
        if kind not in LOGS:
            from vlmcache.errors import unknown_choice

            raise unknown_choice("--log", kind, LOGS)
        self.kind, self.folder, self.select_split = kind, Path(folder), select_split or "selection"
        self.folder.mkdir(parents=True)  # a new folder in the run's new staging folder: never one that exists
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise VlmcacheError(
                    "--log tensorboard needs the tensorboard package: pip install 'vlmcache[tensorboard]' "
                    "(or --log csv)."
                ) from None
            self.writer = SummaryWriter(log_dir=str(self.folder))
        else:
            self.file = open(self.folder / "epochs.csv", "w", newline="")  # noqa: SIM115 - closed by close()
            self.writer = csv.DictWriter(self.file, CSV_FIELDS, extrasaction="ignore")
            self.writer.writeheader()

    def __call__(self, row: dict) -> None:
        if self.kind == "tensorboard":
            step = row["step"]
            self.writer.add_scalar("train/loss", row["loss"], step)
            self.writer.add_scalar("train/lr", row["lr"], step)
            self.writer.add_scalar("train/samples_per_s", row["samples_per_s"], step)
            if "select_score" in row:
                self.writer.add_scalar(f"{self.select_split}/accuracy", row["select_score"], step)
            self.writer.flush()
        else:
            self.writer.writerow(row)
            self.file.flush()

    def close(self) -> Path:
        (self.writer if self.kind == "tensorboard" else self.file).close()
        return self.folder
