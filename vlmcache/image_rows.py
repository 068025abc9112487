"""The image rows of a split as tensors, their seeded augmented views, and the loader that batches them."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlmcache.images import BadImage


class ImageRows(torch.utils.data.Dataset):
    """Rows of a split as tensors; an undecodable image comes back as its reason instead."""

    def __init__(
        self, source, rows: np.ndarray, transform, views: int = 0, view_transform=None, view_seed: int = 0,
        view_index: np.ndarray | None = None,
    ):  # fmt: skip
        self.source, self.rows, self.transform = source, rows, transform
        self.views, self.view_transform, self.view_seed = views, view_transform, view_seed
        self.view_index = view_index  # per item: the one augmented view to give instead of the image (streaming)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            img = self.source.load(row)
        except BadImage as e:
            return row, None, None, str(e)
        return row, *self.tensors(i, row, img), None

    def tensors(self, i: int, row: int, img) -> tuple:
        """The image as the encoder takes it, and its augmented views (or None)."""
        if self.view_index is not None:
            return seeded_view(self.view_transform, img, self.view_seed, row, int(self.view_index[i])), None
        views = None
        if self.views:
            views = torch.stack(
                [seeded_view(self.view_transform, img, self.view_seed, row, k) for k in range(self.views)]
            )
        return self.transform(img), views


def seeded_view(transform, img, view_seed: int, row: int, k: int) -> torch.Tensor:
    """View k of a row: its crop and flip are drawn from (view_seed, row, k) alone, so a resumed or re-sharded
    extraction draws the same views, and streaming can make any cached view again."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([view_seed, row, k]).generate_state(1)[0]))
        return transform(img)


def collate(items):
    """A batch of ImageRows items. The images (and views) are stacked by torch's default_collate, which in a
    loader worker stacks straight into shared memory: torch.stack would make the batch in the worker's memory,
    and the loader copy it into shared memory to hand it over (for 224 px images 0.1 ms of CPU per image)."""
    good = [it for it in items if it[3] is None]
    stack = torch.utils.data.default_collate
    return {
        "rows": torch.tensor([it[0] for it in good], dtype=torch.int64),
        "images": stack([it[1] for it in good]) if good else None,
        "views": stack([it[2] for it in good]) if good and good[0][2] is not None else None,
        "bad": [(it[0], it[3]) for it in items if it[3] is not None],
    }


def image_loader(
    data, batch_size: int | None, workers: int, pin: bool = False, collate_fn=collate, batch_sampler=None,
    persistent: bool = False,
) -> DataLoader:  # fmt: skip
    """Batches of `data` in order (`collate`'s dicts; or those of `batch_sampler`), decoded by `workers` processes
    ahead of use; `persistent` keeps the workers from one pass over the loader to the next."""
    return DataLoader(
        data,
        batch_size=1 if batch_sampler is not None else batch_size,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
        persistent_workers=persistent and workers > 0,
    )
