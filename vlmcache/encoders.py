"""Frozen open_clip encoders: loading (tags, local files, random weights), preprocessing and the token tap."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from vlmcache.errors import VlmcacheError, unknown_choice

TINY_MODEL = "vlmcache-tiny"
RANDOM = ("none", "random")  # --pretrained values meaning "random weights"
RANDOM_INIT_SEED = 0  # random weights are seeded so that a resumed extraction sees the same encoder
PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@functools.cache
def openclip():
    """open_clip, imported on first use (225 MB of resident memory with timm and torchvision: a head trained on a
    cache never needs it), with the package's own model configs registered."""
    import open_clip

    open_clip.add_model_config(Path(str(resources.files("vlmcache") / "model_configs")))
    return open_clip


def list_models() -> list[str]:
    return openclip().list_models()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _tag_preprocess(model: str, tag: str) -> dict:
    cfg = openclip().get_pretrained_cfg(model, tag)
    keys = ("mean", "std", "interpolation", "resize_mode")
    out = {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in keys if k in cfg}
    out["quick_gelu"] = bool(cfg.get("quick_gelu", False))
    return out


def describe_tag_settings(cfg: dict) -> str:
    """What a pretrained tag sets for a weights file, in a few words: QuickGELU, mean and std, resizing."""
    parts = [f"QuickGELU {'on' if cfg.get('quick_gelu') else 'off'}"]
    for key in ("mean", "std"):
        if key in cfg:
            parts.append(f"{key} ({', '.join(f'{v:.3g}' for v in cfg[key])})")
    parts += [f"{k.replace('_mode', '')} {cfg[k]}" for k in ("interpolation", "resize_mode") if k in cfg]
    return ", ".join(parts)


def tag_choices(model: str, tags: list[str]) -> str:
    """The tags of a model grouped by what each sets: '[QuickGELU on, mean (...), ...] openai, laion400m_e31; ...'."""
    groups: dict[str, list[str]] = {}
    for t in tags:
        groups.setdefault(describe_tag_settings(_tag_preprocess(model, t)), []).append(t)
    return "; ".join(f"[{settings}] {', '.join(names)}" for settings, names in groups.items())


def resolve_weights(model: str, pretrained: str | None, preprocess_from: str | None = None) -> dict:
    """Decide where the weights come from and which pretrained config gives their preprocessing.

    A local weights file carries no preprocessing, and open_clip then falls back to OpenAI's mean
    and std and bicubic resizing, which is wrong for many checkpoints. So a file takes its
    preprocessing (and QuickGELU, which also changes the numbers) from a pretrained tag: the one
    named by `preprocess_from`, else the tag whose published sha256 matches the file, else the
    one setting shared by all of the model's tags; if the tags disagree, the user must choose.
    """
    if model not in openclip().list_models():
        raise unknown_choice("model", model, openclip().list_models())
    tags = openclip().list_pretrained_tags_by_model(model)
    if preprocess_from is not None and preprocess_from not in tags:
        raise unknown_choice(f"pretrained tag for --preprocess-from of {model}", preprocess_from, tags or ["(none)"])

    if pretrained is None or pretrained.lower() in RANDOM:
        cfg = _tag_preprocess(model, preprocess_from) if preprocess_from else {"quick_gelu": False}
        return {"pretrained": "random", "init_seed": RANDOM_INIT_SEED, "tag_cfg": cfg, "file": None}
    if pretrained in tags:
        if preprocess_from not in (None, pretrained):
            raise VlmcacheError("--preprocess-from is for local weights files; a pretrained tag brings its own.")
        return {"pretrained": pretrained, "tag_cfg": _tag_preprocess(model, pretrained), "file": None}
    if not Path(pretrained).is_file():
        choices = ", ".join(tags) if tags else "(this model has no published tags)"
        raise VlmcacheError(
            f"--pretrained '{pretrained}' is neither a pretrained tag of {model} nor an existing file. "
            f"Tags: {choices}; or 'none' for random weights."
        )
    digest = sha256_file(pretrained)
    if preprocess_from is None:
        matching = [t for t in tags if digest in (openclip().get_pretrained_url(model, t) or "")]
        settings = {repr(_tag_preprocess(model, t)): t for t in tags}
        if matching:
            preprocess_from = matching[0]
        elif len(settings) == 1:
            preprocess_from = tags[0]
        elif len(settings) > 1:
            raise VlmcacheError(
                f"The weights file '{pretrained}' does not say how it was trained, and the pretrained tags of "
                f"{model} differ in that. Name the tag it was trained as with --preprocess-from, which sets its "
                f"activation (QuickGELU) as well as its preprocessing; the tags and what each sets: "
                f"{tag_choices(model, tags)}."
            )
        how = "its published sha256 matches" if matching else "every tag of the model sets the same"
    else:
        how = "--preprocess-from"
    cfg = _tag_preprocess(model, preprocess_from) if preprocess_from else {"quick_gelu": False}
    note = (
        f"the weights file is loaded as the tag '{preprocess_from}' sets it ({how}): {describe_tag_settings(cfg)}"
        if preprocess_from
        else f"the weights file is loaded with {model}'s own settings (it has no pretrained tags): QuickGELU off"
    )
    return {
        "pretrained": "file",
        "weights_sha256": digest,
        "preprocess_from": preprocess_from,
        "tag_cfg": cfg,
        "file": str(pretrained),
        "note": note,
    }


PREPROCESS_MODES = ("model", "seed")
SEED_PREPROCESS_SUFFIX = "+seedprep"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _seed_preprocess(model: str, cfg: dict):
    """The seed study's evaluation transform for every dataset: Resize 256 (bilinear), CenterCrop 224 and ImageNet
    statistics (its datasets' `get_data_transform`), in place of the weights' own. The model must take 224 px."""
    from torchvision import transforms as T

    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    if size != 224:
        raise VlmcacheError(f"--preprocess seed crops 224 px images; {model} takes {size} px.")
    transform = T.Compose(
        [T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToTensor(),
         T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )  # fmt: skip
    seed_cfg = {
        **cfg, "size": [224, 224], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear",
        "resize_mode": "seed: resize 256, center crop 224",
    }  # fmt: skip
    return transform, seed_cfg


def model_config_sha256(model: str) -> str:
    """A hash of the model's open_clip config (its architecture), so that editing a config changes the key."""
    cfg = openclip().get_model_config(model) or {}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def math_mode(device: torch.device) -> dict:
    """What decides the last bits of the encoder's output besides its inputs: the device and, on CUDA, TF32."""
    if device.type != "cuda":
        return {"device": device.type, "tf32": None}
    return {
        "device": f"cuda ({torch.cuda.get_device_name(device)})",
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
    }


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VlmcacheError(f"--device '{device}' is not a torch device (auto, cpu, cuda, cuda:1, ...).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VlmcacheError(f"--device {device} was asked for, but torch sees no CUDA device.")
    return dev


def pick_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS)
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise VlmcacheError(f"--precision {precision} needs a GPU; on {device.type} vlmcache computes in fp32.")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


@dataclass
class Encoder:
    """A frozen open_clip model with its inference transform and the fingerprint of what it computes."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    preprocess: object  # PIL image -> (3, H, W) tensor
    preprocess_cfg: dict
    device: torch.device
    precision: str
    fingerprint: dict
    label: str  # where the weights came from, for the cache key: a tag, "random" or "file-<stem>"
    note: str = ""  # for a weights file: which tag set its QuickGELU and preprocessing, and why that tag

    @property
    def key(self) -> str:
        """Readable name plus a short hash of the fingerprint, e.g. `ViT-B-16__openai__3f9a2c1e`."""
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}__{self.label}__{digest}"

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @property
    def supports_tokens(self) -> bool:
        visual = self.model.visual
        return hasattr(visual, "transformer") and hasattr(visual, "ln_post") and hasattr(visual, "class_embedding")

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, tokens: bool = False):
        """Pooled projected embeddings (B, D) float32, and the final block's tokens (B, T, W) if asked."""
        images = images.to(self.device, non_blocking=True)
        tapped = []
        handle = None
        if tokens:
            if not self.supports_tokens:
                raise VlmcacheError(
                    f"--tokens needs a ViT image tower; {self.name} has {type(self.model.visual).__name__}."
                )
            # The tap is the transformer's output, before ln_post: the seed paper's decoder input.
            handle = self.model.visual.transformer.register_forward_hook(lambda m, i, o: tapped.append(o))
        try:
            with self.autocast():
                pooled = self.model.encode_image(images)
        finally:
            if handle is not None:
                handle.remove()
        return pooled.float(), (tapped[0].float() if tokens else None)

    @torch.inference_mode()
    def encode_with_prefix(self, images: torch.Tensor, tokens: bool, k: int):
        """`encode_images`' outputs and the prefix (B, T, W) float32: the residual stream entering the tower's last k
        blocks (vlmcache/tail.py taps it), from the same forward pass."""
        from vlmcache.tail import prefix_tap

        with prefix_tap(self.model.visual, k, self.name) as tapped:
            pooled, tok = self.encode_images(images, tokens=tokens)
        return pooled, tok, tapped[0].float()

    @torch.inference_mode()
    def encode_classnames(self, classnames: list[str], templates: list[str], batch_prompts: int = 1024):
        """Class-text embeddings (C, D), float32, unit norm: open_clip's own zero-shot classifier builder."""
        from open_clip.zero_shot_classifier import build_zero_shot_classifier

        with self.autocast():
            weights = build_zero_shot_classifier(
                self.model,
                self.tokenizer,
                classnames,
                templates,
                num_classes_per_batch=max(1, batch_prompts // len(templates)),
                device=self.device,
            )
        return weights.T.float()  # (D, C) -> (C, D)

    def train_transform(self, scale: tuple[float, float] = (0.08, 1.0)):
        """Random resized crop (with the tag's interpolation) and a horizontal flip, then the tag's normalisation.

        Built here rather than with open_clip's training transform, which only crops, and always bicubic."""
        from torchvision import transforms as T

        cfg = self.preprocess_cfg
        size = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else tuple(cfg["size"])
        interpolation = T.InterpolationMode(cfg["interpolation"])
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(cfg["mean"], cfg["std"]),
            ]
        )


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_encoder(
    model: str,
    pretrained: str | None = "openai",
    device: str = "auto",
    precision: str = "auto",
    preprocess_from: str | None = None,
    cache_dir: str | None = None,
    preprocess_mode: str = "model",
) -> Encoder:
    """Build a frozen open_clip model whose preprocessing matches its weights (`preprocess_mode="model"`), or the
    seed study's (`"seed"`: ImageNet mean and std, Resize 256 + CenterCrop 224, whatever the weights)."""
    if preprocess_mode not in PREPROCESS_MODES:
        raise unknown_choice("--preprocess", preprocess_mode, PREPROCESS_MODES)
    weights = resolve_weights(model, pretrained, preprocess_from)
    dev = pick_device(device)
    prec = pick_precision(precision, dev)
    tag_cfg = dict(weights["tag_cfg"])
    quick_gelu = tag_cfg.pop("quick_gelu")
    source = {"random": None, "file": weights["file"]}.get(weights["pretrained"], weights["pretrained"])
    try:
        # open_clip logs "initialized randomly" on the root logger; we state it in our own summary.
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(RANDOM_INIT_SEED)
            net, _, preprocess = openclip().create_model_and_transforms(
                model,
                pretrained=source,
                device="cpu",
                force_quick_gelu=quick_gelu,
                cache_dir=cache_dir,
                image_mean=tag_cfg.get("mean"),
                image_std=tag_cfg.get("std"),
                image_interpolation=tag_cfg.get("interpolation"),
                image_resize_mode=tag_cfg.get("resize_mode"),
            )
    except Exception as e:
        if weights["file"]:  # whatever torch.load or load_state_dict says, it is about the user's file
            raise VlmcacheError(
                f"Could not load the weights file '{weights['file']}' into {model}: {type(e).__name__}: {e}"
            ) from None
        if isinstance(e, RuntimeError) and "download" in str(e).lower():
            raise VlmcacheError(
                f"Could not download the {model} '{pretrained}' weights ({e}). Without internet, pass a local "
                f"weights file: --pretrained PATH (with --preprocess-from TAG if asked)."
            ) from None
        raise
    net = net.to(dev).eval().requires_grad_(False)
    pcfg = openclip().get_model_preprocess_cfg(net)
    preprocess_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items() if k in PREPROCESS_KEYS}
    if preprocess_mode == "seed":
        preprocess, preprocess_cfg = _seed_preprocess(model, preprocess_cfg)
    fingerprint = {
        "model": model,
        "pretrained": weights["pretrained"],
        "weights_sha256": weights.get("weights_sha256"),  # the file's content, not its path
        # not the --preprocess-from tag's name: the settings it resolves to are below, and they are what counts
        "init_seed": weights.get("init_seed"),
        "model_config_sha256": model_config_sha256(model),  # an edited registered config is another model
        "quick_gelu": quick_gelu,
        "preprocess": preprocess_cfg,
        "precision": prec,
        "open_clip": openclip().__version__,
        "torch": torch.__version__,
    }
    label = weights["pretrained"]
    if label == "file":  # the content, not the name: a renamed file is the same cache
        label = "file-" + weights["weights_sha256"][:12]
    if preprocess_mode == "seed":  # its own cache beside the weights' own preprocessing, found by this name
        label += SEED_PREPROCESS_SUFFIX
    tokenizer = openclip().get_tokenizer(model)
    return Encoder(
        model, net, tokenizer, preprocess, preprocess_cfg, dev, prec, fingerprint, label, weights.get("note", "")
    )
