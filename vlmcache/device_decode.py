"""`extract --decode gpu`: JPEGs decoded on the encoder's device in batches (torchvision.io.decode_jpeg: nvJPEG on
CUDA), then resized, cropped and normalised there as the encoder's own transform does on the CPU.

The loader's workers only read each file and look at its header (PIL's, which also refuses decompression bombs):
a JPEG is handed on as its bytes; any other format, a CMYK JPEG, or a JPEG the device cannot decode, is decoded
on the CPU as `--decode pil` would and joins the same device transform, and the run counts them. The numbers
differ a little from `--decode pil` (another JPEG decoder, torch's antialiased resize for PIL's): a cache key of
its own, like `draft`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmcache.errors import VlmcacheError
from vlmcache.images import BadImage, decode

# what open_clip's eval transform does, by the encoder's preprocess config (`resize_mode`)
SUPPORTED_RESIZE = ("shortest", "squash", "seed: resize 256, center crop 224")


class EncodedRows(torch.utils.data.Dataset):
    """Rows of a split as (row, payload, kind, reason): a JPEG's bytes (kind "jpeg"), or the image decoded on the
    CPU as a uint8 (3, H, W) tensor (kind "cpu"), or the reason it cannot be used."""

    def __init__(self, source, rows: np.ndarray):
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            if not hasattr(self.source, "read_bytes"):  # images held in memory (digits)
                return row, to_chw(self.source.load(row)), "cpu", None
            data = self.source.read_bytes(row)
            if _is_rgb_or_gray_jpeg(data):
                return row, torch.frombuffer(bytearray(data), dtype=torch.uint8), "jpeg", None
            return row, to_chw(decode(io.BytesIO(data))), "cpu", None
        except BadImage as e:
            return row, None, None, str(e)


def _is_rgb_or_gray_jpeg(data: bytes) -> bool:
    """A JPEG whose header PIL reads, within PIL's pixel limit (a decompression bomb is refused as `decode` refuses
    it), in a colour space the device decoder converts to RGB as PIL does (not CMYK)."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.format == "JPEG" and img.mode in ("RGB", "L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False  # decoded on the CPU, which gives the reason


def to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def collate_encoded(items) -> dict:
    good = [it for it in items if it[3] is None]
    return {
        "rows": torch.tensor([it[0] for it in good], dtype=torch.int64),
        "payloads": [it[1] for it in good],
        "kinds": [it[2] for it in good],
        "views": None,
        "bad": [(it[0], it[3]) for it in items if it[3] is not None],
    }


class DeviceDecoder:
    """Turns a batch of `EncodedRows` into the encoder's input on `device`: JPEGs decoded together, every image
    resized, cropped and normalised there. `cpu_decoded` counts the images that took the CPU's decoder."""

    def __init__(self, preprocess_cfg: dict, device: torch.device):
        from torchvision.transforms import InterpolationMode

        mode = preprocess_cfg.get("resize_mode", "shortest")
        size = preprocess_cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if mode not in SUPPORTED_RESIZE or (mode == "shortest" and size[0] != size[1]):
            raise VlmcacheError(
                f"--decode gpu resizes as open_clip's 'shortest' (square), 'squash' and --preprocess seed do; this "
                f"encoder's preprocessing is '{mode}' at {list(size)}. Use --decode pil or draft."
            )
        self.device = device
        self.crop = list(size)
        # the size Resize is given (one side: the shorter side to it; two: squashed to them), then a centre crop
        self.resize = list(size) if mode == "squash" else [256 if mode.startswith("seed") else size[0]]
        interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.interpolation = InterpolationMode(interpolation)
        self.mean = torch.tensor(preprocess_cfg["mean"], device=device).view(3, 1, 1)
        self.std = torch.tensor(preprocess_cfg["std"], device=device).view(3, 1, 1)
        self.cpu_decoded = 0

    def __call__(self, batch: dict) -> dict:
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[torch.Tensor | None] = [None] * len(batch["payloads"])
        jpeg = [i for i, k in enumerate(batch["kinds"]) if k == "jpeg"]
        if jpeg:
            datas = [batch["payloads"][i] for i in jpeg]
            try:
                decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
            except RuntimeError:  # one image the device cannot decode fails the batch: find it
                decoded = [self._one(d) for d in datas]
            for i, img in zip(jpeg, decoded, strict=True):
                images[i] = img
        bad = list(batch["bad"])
        keep, out = [], []
        for i, (row, payload) in enumerate(zip(batch["rows"].tolist(), batch["payloads"], strict=True)):
            img = images[i]
            if img is None and batch["kinds"][i] == "jpeg":  # the device's decoder refused it: the CPU's
                try:
                    img = to_chw(decode(io.BytesIO(payload.numpy().tobytes())))
                    self.cpu_decoded += 1
                except BadImage as e:
                    bad.append((row, str(e)))
                    continue
            elif img is None:
                img = payload
                self.cpu_decoded += 1
            out.append(self.transform(img.to(self.device, non_blocking=True)))
            keep.append(i)
        return {
            "rows": batch["rows"][keep] if keep else torch.zeros(0, dtype=torch.int64),
            "images": torch.stack(out) if out else None,
            "views": None,
            "bad": bad,
        }

    def _one(self, data: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError:
            return None

    def transform(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) on the device -> the encoder's float input, as open_clip's Resize (antialiased, on uint8
        as PIL resizes), CenterCrop, ToTensor and Normalize."""
        from torchvision.transforms.v2 import functional as F

        img = F.resize(img, self.resize, interpolation=self.interpolation, antialias=True)
        img = F.center_crop(img, self.crop)
        return (img.float().div_(255) - self.mean) / self.std
