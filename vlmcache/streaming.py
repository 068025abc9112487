"""The streaming baseline: the images behind a cached split, encoded again by the frozen tower on every batch.

This is what the seed paper's code does on every training step, and what `train-head --stream` measures the
cache against. It reads the very rows the cache holds (same order, same skipped images), with the extraction's
inference transform and no augmentation, and rounds the tower's outputs to float16 as the cache stores them,
so that for the same seed it trains on the same numbers and gives the same metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from vlmcache import cache, handover
from vlmcache.datasets import load_dataset
from vlmcache.encoders import Encoder, load_encoder
from vlmcache.errors import VlmcacheError
from vlmcache.extract import default_workers, probe_dims, use_decode
from vlmcache.features import view_choice
from vlmcache.image_rows import ImageRows, image_loader


def encoder_of(split: cache.SplitCache, device: str) -> Encoder:
    """The frozen encoder that wrote `split`, loaded again; refused if it would compute something else."""
    manifest = cache.read_manifest(split.dir)
    made = (manifest or {}).get("extract_config")
    if not made:
        raise VlmcacheError(f"'{split.dir}' does not record how it was extracted, so its images cannot be streamed.")
    want = split.fingerprint["encoder"]
    if want["precision"] != "fp32" and not torch.cuda.is_available():
        raise VlmcacheError(
            f"'{split.dir}' was extracted in {want['precision']} on a GPU; streaming it needs a GPU as well."
        )
    encoder = load_encoder(
        made["model"], made["pretrained"], device, want["precision"], made["preprocess_from"],
        preprocess_mode=made.get("preprocess", "model"),
    )  # fmt: skip
    if encoder.fingerprint != want:
        raise VlmcacheError(
            f"The encoder loaded now differs from the one that wrote '{split.dir}' "
            f"({cache.describe_diff(want, encoder.fingerprint)}); streaming would not reproduce the cache."
        )
    return encoder


class StreamedImages:
    """A cached split's rows as images, encoded on demand; `batches` and `chunks` as `features.Pooled` has them.

    Yields pooled embeddings (float32 holding float16 values) or token sequences (float16), as the cache does.
    """

    def __init__(
        self, split: cache.SplitCache, encoder: Encoder, tokens: bool, workers: int | None = None, root=None,
        augment: bool = False, prefix: int = 0,
    ):  # fmt: skip
        made = cache.read_manifest(split.dir)["extract_config"]
        dataset = load_dataset(
            made["dataset"], root or made["root"], made["split_files"], made["classnames_file"], made["holdout"],
            made["seed"], made.get("label_key", "cls"),
        )  # fmt: skip
        name = split.fingerprint["split"]
        if dataset.splits[name].sha256 != split.fingerprint["split_sha256"]:
            raise VlmcacheError(f"The {name} split file changed since '{split.dir}' was extracted; extract it again.")
        use_decode(dataset.splits[name].source, encoder, made.get("decode", "pil"))  # decoded as the cache was
        # --augment: each batch encodes augmented views made again from their seeds. A cache with K views gives
        # the same K to choose from (so the run equals the cached-views run); without, every epoch a fresh view.
        self._setup(
            dataset.splits[name].source, split.rows(), split.labels(), encoder, tokens, workers, augment, prefix,
            views=int(split.fingerprint.get("views") or 0), view_seed=int(split.fingerprint.get("view_seed") or 0),
            view_scale=tuple(split.fingerprint.get("view_scale") or (0.08, 1.0)),
        )  # fmt: skip
        self.unreadable, self.round_prefix = "was read at extraction but not now", True

    @classmethod
    def of_rows(
        cls, source, rows: np.ndarray, labels: np.ndarray, encoder: Encoder, workers: int | None, augment: bool,
        prefix: int, views: int = 0, view_seed: int = 0, view_scale: tuple[float, float] = (0.08, 1.0),
        round_prefix: bool = True,
    ) -> StreamedImages:  # fmt: skip
        """Rows of an image source with no cache behind them (`finetune --tail-blocks`): the views are drawn as
        `extract --views V --view-seed S` draws them, so such a run sees exactly the views a cache would hold;
        `round_prefix` False keeps the prefix in float32 instead of rounding it to float16 as the cache stores it."""
        self = cls.__new__(cls)
        self._setup(source, rows, labels, encoder, False, workers, augment, prefix, views, view_seed, view_scale)
        self.round_prefix = round_prefix
        self.unreadable = "could not be read"
        return self

    def _setup(self, source, rows, labels, encoder, tokens, workers, augment, prefix, views, view_seed, view_scale):
        self.source, self.encoder, self.tokens = source, encoder, tokens
        self.prefix = prefix  # K > 0: yield the prefix entering the tower's last K blocks (the tail head's input)
        self.workers = default_workers() if workers is None else workers
        self.rows = np.asarray(rows)
        self.y = torch.from_numpy(np.asarray(labels).astype(np.int64)).to(encoder.device)
        self.augment, self.choice = augment, None
        self.views_cached, self.view_seed = views, view_seed
        self.view_transform = encoder.train_transform(view_scale) if augment else None

    def set_epoch(self, seed: int, epoch: int) -> None:
        if not self.augment:
            return
        n = len(self.y)
        if self.views_cached:
            self.choice = view_choice(n, self.views_cached, seed, epoch).numpy()
        else:  # a view seed no other epoch uses: a fresh crop and flip on every pass, as the seed's code does
            self.choice = np.full(n, 1_000_000 + epoch)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def dim(self) -> int:
        if self.prefix:
            return probe_dims(self.encoder, False, self.prefix)["prefix"][1]
        pooled, tokens = probe_dims(self.encoder, self.tokens).values()
        return tokens[1] if self.tokens else pooled

    def _encode(self, order: np.ndarray, batch_size: int, augment: bool = False) -> Iterator[torch.Tensor]:
        views = self.choice[order] if augment and self.choice is not None else None
        # the workers hand over uint8 images, finished on the encoder's device as extraction's are
        transform, finish = handover.cut(self.encoder.preprocess)
        view_transform = None
        if views is not None:  # every image of the batch is a view
            view_transform, finish = handover.cut(self.view_transform)
        data = ImageRows(
            self.source, self.rows[order], transform, view_transform=view_transform, view_seed=self.view_seed,
            view_index=views,
        )  # fmt: skip
        for batch in image_loader(data, batch_size, self.workers, self.encoder.device.type == "cuda"):
            batch = handover.finished(batch, self.encoder.device, finish)
            if batch["bad"]:
                row, reason = batch["bad"][0]
                raise VlmcacheError(
                    f"'{self.source.describe(row)}' (row {row}) {self.unreadable}: {reason}. "
                    f"If the images moved, name their folder with --root."
                )
            if self.prefix:  # float16, as the cache stores it; cloned out of inference mode
                prefix = self.encoder.encode_with_prefix(batch["images"], False, self.prefix)[2]
                yield prefix.half().clone() if self.round_prefix else prefix.clone()
                continue
            pooled, tokens = self.encoder.encode_images(batch["images"], tokens=self.tokens)
            # float16, as the cache stores them; a clone leaves inference mode so autograd may use it
            yield tokens.half().clone() if self.tokens else pooled.half().float().clone()

    def batches(self, indices: torch.Tensor, batch_size: int, generator=None) -> Iterator[tuple]:
        idx = indices.cpu().numpy()
        for i, x in zip(range(0, len(idx), batch_size), self._encode(idx, batch_size, augment=True), strict=True):
            yield x, self.y[indices[i : i + batch_size]]

    def chunks(self, size: int = 256) -> Iterator[tuple]:
        for i, x in zip(range(0, len(self.y), size), self._encode(np.arange(len(self.y)), size), strict=True):
            yield x, self.y[i : i + size]
