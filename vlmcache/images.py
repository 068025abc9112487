"""Image sources and decoding: every file becomes 3-channel RGB, or a skipped row with a reason."""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class BadImage(Exception):
    """An image that cannot be used; the message is the reason stored in the manifest."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, keeping what a viewer would show.

    Transparent pixels are composited on white: dropping alpha exposes whatever colour the
    encoder left under them (often black), which is not what the image looks like.
    16- and 32-bit integer images are rescaled to 8 bit; `convert("RGB")` would clip them to white.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max(initial=1.0)), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode(fp, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode, apply EXIF orientation and convert to RGB; raise BadImage with a reason.

    `draft` (`--decode draft`): a JPEG is decoded at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that
    keeps both sides at least `draft`, so a photo at least twice the encoder's input size decodes in a fraction
    of the time; the numbers differ a little from a full decode (a separate cache, fingerprinted)."""
    try:
        with warnings.catch_warnings():
            # A DecompressionBombWarning (2-4x the pixel limit) becomes an error: skip, don't allocate.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", draft)
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as e:
        raise BadImage(f"cannot decode: {e}") from None


class FileSource:
    """Images stored as files under `root`, named by paths relative to it. Pickles cheaply for workers."""

    def __init__(self, root: str | os.PathLike, relpaths: Sequence[str]):
        self.root = str(root)
        self.relpaths = list(relpaths)
        self._real_root = None
        self.draft: tuple[int, int] | None = None  # --decode draft: the smallest size a JPEG may decode to

    def __len__(self) -> int:
        return len(self.relpaths)

    def describe(self, i: int) -> str:
        return self.relpaths[i]

    def _path(self, i: int) -> str:
        path = os.path.join(self.root, self.relpaths[i])
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        # split files cannot name paths outside --root (checked when read); symlinks must not lead out either
        real = os.path.realpath(path)
        if not real.startswith(self._real_root + os.sep):
            raise BadImage(f"refused: the path leads outside --root (to {real})")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        return path

    def load(self, i: int) -> Image.Image:
        return decode(self._path(i), self.draft)

    def read_bytes(self, i: int) -> bytes:
        """The file as stored (`--decode gpu` decodes it on the device)."""
        try:
            with open(self._path(i), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BadImage("file not found") from None
        except OSError as e:
            raise BadImage(f"cannot read: {e}") from None

    def first_missing(self, probe: int = 20) -> str | None:
        """The first of up to `probe` evenly spread paths, if none of them exist (a wrong --root)."""
        if not self.relpaths:
            return None
        picks = np.linspace(0, len(self.relpaths) - 1, num=min(probe, len(self.relpaths))).astype(int)
        paths = [Path(self.root, self.relpaths[i]) for i in picks]
        return None if any(p.exists() for p in paths) else str(paths[0])


class ArraySource:
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3), e.g. the built-in digits."""

    def __init__(self, images: np.ndarray, names: Sequence[str]):
        self.images = images
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return self.names[i]

    def load(self, i: int) -> Image.Image:
        return to_rgb(Image.fromarray(self.images[i]))


class TarSource:
    """Images inside webdataset tar shards, read by offset: row i is `members[i]` = (shard, key, offset, size),
    indexed once from the tar headers (the images themselves are not read until extracted). Each worker opens
    the shards itself; the source pickles without open files."""

    def __init__(self, root: str | os.PathLike, members: Sequence[tuple[str, str, int, int]]):
        self.root = str(root)
        self.members = list(members)  # (shard path relative to root, sample key, data offset, size)
        self._open: dict[str, object] = {}
        self.draft: tuple[int, int] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.members)

    def describe(self, i: int) -> str:
        shard, key, _, _ = self.members[i]
        return f"{shard}/{key}"

    def load(self, i: int) -> Image.Image:
        import io

        return decode(io.BytesIO(self.read_bytes(i)), self.draft)

    def read_bytes(self, i: int) -> bytes:
        from vlmcache.wds_index import skip_reason

        shard, _, offset, size = self.members[i]
        reason = skip_reason(offset, size)  # no image member, or one over the size cap: never read
        if reason:
            raise BadImage(reason)
        f = self._open.get(shard)
        if f is None:
            try:
                f = self._open[shard] = open(os.path.join(self.root, shard), "rb")  # noqa: SIM115 - kept per worker
            except OSError as e:
                raise BadImage(f"cannot open the shard: {e}") from None
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise BadImage(f"the shard ends early ({len(data)} of {size} bytes)")
        if size == 0:
            raise BadImage("empty file (0 bytes)")
        return data

    def first_missing(self, probe: int = 20) -> str | None:
        for shard in dict.fromkeys(m[0] for m in self.members[:1]):
            if not os.path.isfile(os.path.join(self.root, shard)):
                return shard
        return None
