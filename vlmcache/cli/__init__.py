"""The `vlmcache` command: a thin layer that parses, validates and calls the library; nothing here that tests
cannot call directly. One module per family of commands:

- common: the app, consoles, error handling, and every shared option defined once
- extract: extract, datasets, cache ls / info / verify (stage 1)
- exchange: export, import (embeddings to and from parquet and clip-retrieval's layout)
- train: train-head, eval, zero-shot, knn (stage 2 on one cache)
- finetune: finetune (streams images)
- ablate: ablate, report (grids and their tables and plots)
- bench: bench, demo
"""

from __future__ import annotations

from vlmcache.cli.common import app

# isort: off
# each registers its commands; the order here is the order of `vlmcache --help`'s panels
from vlmcache.cli import bench, extract, exchange, train, finetune, ablate  # noqa: F401, E402
# isort: on


def main() -> None:
    app()


__all__ = ["app", "main"]
