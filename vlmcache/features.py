"""Stage 2's view of the cache: find it, hold pooled features in device memory, stream tokens in blocks."""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmcache import cache, guard, listing
from vlmcache.choices import DATASETS, USER_DATASETS
from vlmcache.encoders import RANDOM, SEED_PREPROCESS_SUFFIX
from vlmcache.errors import VlmcacheError
from vlmcache.heads import HEADS


def weights_label(pretrained: str | None, preprocess: str = "model") -> str:
    """The middle part of a cache key for a --pretrained value and --preprocess mode (mirrors Encoder.key)."""
    suffix = SEED_PREPROCESS_SUFFIX if preprocess == "seed" else ""
    if pretrained is None or pretrained.lower() in RANDOM:
        return "random" + suffix
    if Path(pretrained).is_file():
        from vlmcache.encoders import sha256_file

        return "file-" + sha256_file(pretrained)[:12] + suffix
    return pretrained + suffix


def find_cache(
    cache_dir: str | os.PathLike,
    dataset: str | None,
    model: str | None,
    pretrained: str | None,
    key: str | None = None,
    preprocess: str = "model",
) -> Path:
    """The `<dataset>/<key>` folder that `vlmcache extract` wrote. Dataset, model and weights may each be left
    out (None): the one cache that matches what is given is the answer; several or none is an error that
    lists the caches there are as ready-to-paste flags."""
    if key:
        return listing.resolve_cache(Path(cache_dir), f"{dataset}/{key}" if dataset and "/" not in key else key)
    caches = list(listing.iter_caches(Path(cache_dir)))
    found = [p for p in caches if _matches(p, dataset, model, pretrained, preprocess)]
    if len(found) == 1:
        return found[0]
    wanted = " ".join(
        f"{flag} {value}" for flag, value in (("-d", dataset), ("-m", model), ("-p", pretrained)) if value
    ) + (" --preprocess seed" if preprocess == "seed" else "")
    if found:
        raise VlmcacheError(
            f"Several caches under '{cache_dir}' match{' ' + wanted if wanted else ''}; choose one by adding its "
            f"flags: " + "; ".join(cache_flags(p) for p in found) + "."
        )
    have = f" Caches there: {'; '.join(cache_flags(p) for p in caches)}." if caches else ""
    if dataset is None:
        raise VlmcacheError(
            f"No cache under '{cache_dir}'{' matches ' + wanted if wanted else ''}.{have} Make one with "
            f"`vlmcache extract --dataset NAME ...` (or `vlmcache demo`), or point --cache-dir at yours."
        )
    if dataset not in DATASETS or dataset in USER_DATASETS:
        # the user's own images: extract filed the cache under --name or the --root folder's name, so the hint names
        # the flags that find it, not an extract command for a dataset that is not one
        raise VlmcacheError(
            f"No cache under '{cache_dir}' matches {wanted}.{have} A cache of your own images is filed under the "
            f"name extract gave it: pick it with -d NAME as listed, or with the flags extract was given "
            f"(--dataset imagefolder|split|wds --root DIR [--name NAME]); `vlmcache cache ls` lists them."
        )
    extract = (
        f"vlmcache extract --dataset {dataset} --model {model or 'ViT-B-16'} --pretrained {pretrained or 'openai'} "
        f"--cache-dir {cache_dir}" + (" --preprocess seed" if preprocess == "seed" else "")
    )
    raise VlmcacheError(f"No cache under '{cache_dir}' matches {wanted}.{have} Make it with: {extract}")


def cache_parts(model_dir: Path) -> tuple[str, str, str]:
    """(dataset, model, weights label) of a cache folder, from its name `<dataset>/<model>__<weights>__<hash>`."""
    m = listing.KEY_RE.match(model_dir.name)
    return model_dir.parent.name, m["model"], m["source"]


def cache_flags(model_dir: Path) -> str:
    """The flags that pick this cache: `-d digits_lt -m vlmcache-tiny -p random`, or with --cache-key for a weights
    file (its path is not in the name) and when the name alone does not tell it apart."""
    dataset, model, source = cache_parts(model_dir)
    seed = source.endswith(SEED_PREPROCESS_SUFFIX)
    weights = source.removesuffix(SEED_PREPROCESS_SUFFIX)
    if weights.startswith("file-") or _decode_of(model_dir) != "pil":
        return f"-d {dataset} --cache-key {model_dir.name}"
    return f"-d {dataset} -m {model} -p {weights}" + (" --preprocess seed" if seed else "")


def _decode_of(model_dir: Path) -> str:
    """How the cache's images were decoded (`extract --decode`), from a split's manifest; pil when unsaid."""
    for manifest in model_dir.glob("*/" + cache.MANIFEST):
        try:
            return cache.read_manifest(manifest.parent)["fingerprint"]["encoder"].get("decode", "pil")
        except (VlmcacheError, KeyError, TypeError):
            continue
    return "pil"


def _matches(model_dir: Path, dataset: str | None, model: str | None, pretrained: str | None, preprocess: str) -> bool:
    ds, mdl, source = cache_parts(model_dir)
    if dataset is not None and ds != dataset:
        return False
    if model is not None and mdl != model:
        return False
    if pretrained is not None:
        return source == weights_label(pretrained, preprocess)
    return source.endswith(SEED_PREPROCESS_SUFFIX) == (preprocess == "seed")


def pretrained_of(model_dir: Path) -> str:
    """The --pretrained value a cache was found by: its tag, `random`, or `file-<sha12>` (a label that finds the
    cache again; re-encoding images, as --stream does, reads the weights' path from the manifest)."""
    return cache_parts(model_dir)[2].removesuffix(SEED_PREPROCESS_SUFFIX)


def default_eval_split(model_dir: Path) -> str:
    for name in ("test", "val"):
        if (model_dir / name / cache.MANIFEST).is_file():
            return name
    raise VlmcacheError(f"The cache '{model_dir}' has no test or val split to evaluate on; extract one.")


def open_split(model_dir: Path, split: str) -> cache.SplitCache:
    guard.check_name(split, "The split")  # the name rule: a split is one folder of its cache, never a path
    if not (model_dir / split).is_dir():
        have = ", ".join(sorted(p.name for p in model_dir.iterdir() if (p / cache.MANIFEST).is_file()))
        raise VlmcacheError(f"The cache '{model_dir}' has no '{split}' split (it has: {have}).")
    return cache.SplitCache(model_dir / split)


@dataclass
class Pooled:
    """Pooled features (N, D) and labels (N,) on the training device: minibatches are index lookups. The
    features are kept as the cache stores them (float16: half the memory of float32, an iNaturalist-sized
    train split 657 MB instead of 1,314 MB) and every minibatch and chunk is upcast to float32 as it is taken,
    which gives the same float32 values as upcasting the whole split."""

    x: torch.Tensor
    y: torch.Tensor
    views: torch.Tensor | None = None  # (N, K, D) float16 augmented views; training shows one per row per epoch
    choice: torch.Tensor | None = None  # (N,) the view each row shows in the current epoch

    @classmethod
    def load(cls, split: cache.SplitCache, device: torch.device, views: bool = False) -> Pooled:
        x = torch.from_numpy(split.load("pooled")).to(device)
        v = torch.from_numpy(split.load("views")).to(device) if views else None  # kept float16, upcast per batch
        return cls(x, torch.from_numpy(split.labels().astype(np.int64)).to(device), v)

    def set_epoch(self, seed: int, epoch: int) -> None:
        if self.views is not None:
            self.choice = view_choice(len(self.y), self.views.shape[1], seed, epoch).to(self.y.device)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def batches(self, indices: torch.Tensor, batch_size: int, generator=None) -> Iterator[tuple]:
        for i in range(0, len(indices), batch_size):
            j = indices[i : i + batch_size]
            if self.choice is not None:
                yield self.views[j, self.choice[j]].float(), self.y[j]
            else:
                yield self.x[j].float(), self.y[j]

    def chunks(self, size: int = 1024) -> Iterator[tuple]:
        """Every row's plain embedding in order (evaluation, input statistics, a second stage's features); 1,024
        rows keep an 8,142-class evaluation's logits at 33 MB a chunk."""
        for i in range(0, len(self.y), size):
            yield self.x[i : i + size].float(), self.y[i : i + size]


def view_choice(n: int, k: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of its k views each of n rows shows in an epoch, drawn from (seed, epoch) alone: the cached run and
    the streamed one (`--stream --augment`) draw the same."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randint(k, (n,), generator=g)


def block_order(n_blocks: int, epoch: int) -> np.ndarray:
    """The order in which an epoch of token streaming visits the cache's blocks: drawn from the epoch alone."""
    return np.random.default_rng(np.random.SeedSequence([epoch, n_blocks, 0x70CE5])).permutation(n_blocks)


class BlockReader:
    """Whole blocks of token rows read from the cache, shared by the runs of a group: with `keep` > 0 the last
    `keep` blocks read stay in memory, so runs that visit the blocks in the same order read each from disk once
    (and a block being read by one run's thread is waited for by another, not read twice). With `keep` 0 a block
    is read into the caller's buffer (`out`, from `buffer()`). `bytes_read` counts what came from disk."""

    def __init__(self, split: cache.SplitCache, block_rows: int, name: str = "tokens", keep: int = 0):
        self.split, self.block_rows, self.name, self.keep = split, block_rows, name, keep
        self.bytes_read = 0
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self._reading: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def buffer(self) -> np.ndarray | None:
        """A buffer that `get` can read a block into; None when blocks are kept (each is an array of its own)."""
        if self.keep:
            return None
        shape = row_shape(self.split, self.name.removeprefix("view_"))
        if self.name.startswith("view_"):
            shape = (int(self.split.fingerprint["views"]), *shape)
        return np.empty((self.block_rows, *shape), np.float16)

    def get(self, b: int, out: np.ndarray | None = None) -> np.ndarray:
        if not self.keep:
            return self._read(b, out)
        while True:
            with self._lock:
                if b in self._kept:
                    self._kept.move_to_end(b)
                    return self._kept[b]
                pending = self._reading.get(b)
                if pending is None:
                    event = self._reading[b] = threading.Event()
                    break
            pending.wait()  # another run's thread is reading it: use its read (or, if it failed, try again)
        try:
            block = self._read(b, None)
            with self._lock:
                self._kept[b] = block
                while len(self._kept) > self.keep:
                    self._kept.popitem(last=False)
            return block
        finally:
            with self._lock:
                del self._reading[b]
            event.set()

    def _read(self, b: int, out: np.ndarray | None) -> np.ndarray:
        lo = b * self.block_rows
        hi = min(lo + self.block_rows, len(self.split))
        block = self.split.read_tokens(lo, hi, self.name, out=out)
        with self._lock:
            self.bytes_read += block.nbytes
        return block

    def ahead(self, order: list[int], depth: int = 2) -> Iterator[np.ndarray]:
        """The blocks of `order`, read in a thread of their own up to `depth` blocks ahead of the one in use
        (depth + 1 buffers, taken in turn): the disk's reads and the caller's gather overlap, and a gather that
        runs long does not leave the reader idle. A block stays valid until the next is asked for."""
        buffers = [self.buffer() for _ in range(depth + 1)]
        with ThreadPoolExecutor(1, thread_name_prefix="vlmcache-blocks") as reader:
            pending = deque(reader.submit(self.get, b, buffers[k]) for k, b in enumerate(order[:depth]))
            for k in range(len(order)):
                block = pending.popleft().result()
                if k + depth < len(order):  # into the buffer of block k - 1, which its caller is done with
                    pending.append(reader.submit(self.get, order[k + depth], buffers[(k + depth) % (depth + 1)]))
                yield block


def row_shape(split: cache.SplitCache, name: str) -> tuple[int, int]:
    """(T, W) of one row of `tokens` (the final block's output) or `prefix` (what enters the tail blocks)."""
    return split.prefix_shape() if name == "prefix" else split.token_shape()


class Tokens:
    """Token rows (N, T, W) float16: the final tokens, or (`name="prefix"`) the prefix entering the tail blocks.
    Held in memory when they fit, else read in contiguous blocks.

    Streaming visits an epoch's sampled indices grouped by block: a window of `window_blocks` random blocks
    is read (each block one contiguous HDF5 slice, in a background thread), the sampled rows that fall in
    it are shuffled together and cut into minibatches. Every sampled index is used exactly once per epoch;
    only the order is local to the window. Never row-by-row fancy indexing.
    """

    def __init__(
        self,
        split: cache.SplitCache,
        device: torch.device,
        in_memory: bool,
        block_rows: int = 256,
        window_blocks: int = 16,
        views: bool = False,
        name: str = "tokens",
    ):
        self.split, self.device, self.name = split, device, name
        self.y = torch.from_numpy(split.labels().astype(np.int64)).to(device)
        self.block_rows, self.window_blocks = block_rows, window_blocks
        self.data = torch.from_numpy(split.read_tokens(0, len(split), name)).to(device) if in_memory else None
        # the augmented views' tokens (N, K, T, W): training shows one view per row and epoch (set_epoch)
        self.views, self.choice = views, None
        self.epoch = 0  # set_epoch's; the order in which streaming visits blocks depends on it alone
        self.view_data = None
        if views and in_memory:
            self.view_data = torch.from_numpy(split.read_tokens(0, len(split), "view_" + name)).to(device)
        self.blocks = BlockReader(split, block_rows, "view_" + name if views else name)

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.epoch = epoch
        if self.views:
            self.choice = view_choice(len(self.y), int(self.split.fingerprint["views"]), seed, epoch)  # CPU: blocks
            self.choice_on_device = self.choice.to(self.device)  # in memory: indexed per batch on the device

    def __len__(self) -> int:
        return len(self.y)

    @property
    def dim(self) -> int:
        return row_shape(self.split, self.name)[1]

    @staticmethod
    def fits_in_memory(split: cache.SplitCache, fraction: float = 0.4, views: bool = False, name="tokens") -> bool:
        t, w = row_shape(split, name)
        need = len(split) * t * w * 2 * (1 + (int(split.fingerprint.get("views") or 0) if views else 0))
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return need <= fraction * total

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(arr).to(self.device, non_blocking=True)

    def batches(self, indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
        if self.data is not None:
            for i in range(0, len(indices), batch_size):
                j = indices[i : i + batch_size]
                if self.choice is not None:
                    yield self.view_data[j, self.choice_on_device[j]], self.y[j]
                else:
                    yield self.data[j], self.y[j]
            return
        # One numpy generator per epoch, drawn from the torch one, so the same seed gives the same order of rows.
        # The order of blocks depends on the epoch alone, so that the runs of a group (`group.train_group`), each
        # with its own seed and sampler, read the same block at about the same time and share the read.
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device)))
        idx = indices.cpu().numpy()
        blocks = idx // self.block_rows
        order = block_order(-(-len(self.y) // self.block_rows), self.epoch)
        order = order[np.isin(order, np.unique(blocks))]
        windows = [order[i : i + self.window_blocks] for i in range(0, len(order), self.window_blocks)]
        by_block = {int(b): idx[blocks == b] for b in order}
        labels = self.y.cpu().numpy()
        # A window's rows arrive shuffled (see _read_window); minibatches are consecutive slices of the windows
        # laid end to end, so only a minibatch that spans two windows is copied.
        carry_x, carry_y = None, None
        for x_win, y_win in self._prefetch(windows, by_block, labels, rng):
            start = 0
            if carry_x is not None:
                start = min(batch_size - len(carry_y), len(y_win))
                carry_x = np.concatenate([carry_x, x_win[:start]])
                carry_y = np.concatenate([carry_y, y_win[:start]])
                if len(carry_y) < batch_size:
                    continue
                yield self._to_device(carry_x), self._to_device(carry_y)
                carry_x, carry_y = None, None
            full = start + (len(y_win) - start) // batch_size * batch_size
            for i in range(start, full, batch_size):
                yield self._to_device(x_win[i : i + batch_size]), self._to_device(y_win[i : i + batch_size])
            if full < len(y_win):
                carry_x, carry_y = x_win[full:], y_win[full:]
        if carry_y is not None and len(carry_y):
            yield self._to_device(carry_x), self._to_device(carry_y)

    def _read_window(self, window: list[int], blocks: Iterator, by_block: dict, labels: np.ndarray, rng) -> tuple:
        """The sampled rows of a window's blocks (the next ones from `blocks`), shuffled together: (tokens
        (S, T, W), labels (S,)): the rows in block order, permuted by `rng.permutation(S)`. Each block's sampled
        rows are gathered and put straight into their shuffled places, with no concatenation or second
        permutation of the window; the blocks come in file order, each to its place in the window's order."""
        sels = [by_block[int(b)] for b in window]
        sel = np.concatenate(sels)
        perm = rng.permutation(len(sel))
        place = np.empty_like(perm)
        place[perm] = np.arange(len(perm))  # row k of the blocks' rows goes to place[k]
        x = np.empty((len(sel), *row_shape(self.split, self.name)), np.float16)
        starts = np.cumsum([0] + [len(r) for r in sels])  # where each block's rows begin among the window's
        for i in np.argsort(window, kind="stable"):  # the blocks in file order (as `blocks` reads them)
            b, rows_sel = window[i], sels[i]
            block = next(blocks)  # the whole block b: a group's runs sample different rows of it
            rows = rows_sel - int(b) * self.block_rows
            to = place[starts[i] : starts[i + 1]]
            if self.choice is not None:  # each sampled row's view of this epoch
                x[to] = block[rows, self.choice.numpy()[rows_sel]]
                continue
            by = np.argsort(rows)
            if len(rows) == len(block) and np.array_equal(rows[by], np.arange(len(block))):
                x[to[by]] = block  # every row of the block once (the instance sampler): one copy, from the block
            else:
                x[to] = block[rows]  # block[rows] is a copy of its own, then scattered: two passes
        return x, labels[sel[perm]]

    def _prefetch(self, windows: list[list[int]], by_block: dict, labels: np.ndarray, rng) -> Iterator[tuple]:
        """The windows, made in a background thread while the current one trains; under it a second thread
        reads the next block while this one gathers the last (BlockReader.ahead). Closing the iterator early (an
        iteration budget that ends mid-epoch) stops both threads rather than leaving them blocked."""
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        failure: list[BaseException] = []

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                # within a window the blocks are read in file order (the disk's readahead carries on from one to
                # the next); which rows go where does not depend on it
                blocks = self.blocks.ahead([int(b) for w in windows for b in sorted(w)])
                try:
                    for w in windows:
                        if not put(self._read_window(w, blocks, by_block, labels, rng)):
                            return
                finally:
                    blocks.close()  # waits for a read in flight
            except BaseException as e:  # handed to the consumer, never swallowed
                failure.append(e)
            finally:
                put(None)

        thread = threading.Thread(target=work, daemon=True, name="vlmcache-windows")
        thread.start()
        try:
            while (item := q.get()) is not None:
                yield item
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]

    def chunks(self, size: int = 1024) -> Iterator[tuple]:
        for i in range(0, len(self.y), size):
            j = min(i + size, len(self.y))
            x = self.data[i:j] if self.data is not None else self._to_device(self.split.read_tokens(i, j, self.name))
            yield x, self.y[i:j]


def load_inputs(split: cache.SplitCache, head_name: str, device: torch.device, stream: bool, views: bool = False):
    """What a head reads from a split: pooled features (and their augmented views) in device memory, or tokens."""
    if HEADS[head_name].input == "pooled":
        return Pooled.load(split, device, views)
    if HEADS[head_name].input == "prefix":
        if not split.fingerprint.get("tail_blocks"):
            fp = split.fingerprint
            raise VlmcacheError(
                f"The {head_name} head reads the prefix entering the tower's last blocks, and the cache "
                f"'{split.dir.parent}' holds none. Extract it: vlmcache extract --dataset {fp['dataset']} "
                f"--model {fp['encoder']['model']} --tail-blocks 1 ... (same --root and --pretrained)."
            )
        fits = Tokens.fits_in_memory(split, views=views, name="prefix")
        return Tokens(split, device, in_memory=not stream and fits, views=views, name="prefix")
    if not split.fingerprint.get("tokens"):
        fp = split.fingerprint
        raise VlmcacheError(
            f"The {head_name} head reads token sequences, and the cache '{split.dir.parent}' holds pooled "
            f"features only. Extract tokens: vlmcache extract --dataset {fp['dataset']} "
            f"--model {fp['encoder']['model']} --tokens --overwrite ... (same --root and --pretrained)."
        )
    return Tokens(split, device, in_memory=not stream and Tokens.fits_in_memory(split, views=views), views=views)


class TokenBlocks(torch.utils.data.Dataset):
    """Contiguous blocks of token rows for a DataLoader with workers (spawn or fork): item b is rows
    [b * block_rows, (b + 1) * block_rows) as (tokens (n, T, W) float16, labels (n,)). Each worker opens
    the HDF5 files itself; the dataset pickles without open handles."""

    def __init__(self, split: cache.SplitCache, block_rows: int = 256):
        self.split, self.block_rows = split, block_rows
        self.labels = split.labels()

    def __len__(self) -> int:
        return -(-len(self.split) // self.block_rows)

    def __getitem__(self, b: int):
        lo, hi = b * self.block_rows, min((b + 1) * self.block_rows, len(self.split))
        return torch.from_numpy(self.split.read_tokens(lo, hi)), torch.from_numpy(self.labels[lo:hi])
