"""Heads trained on cached features. Each is `classifier(features(x))`, so second stages can swap the classifier.

- `linear`: a linear layer on the pooled embedding, standardised with the training split's statistics by default
  (as linear probes do; `normalize=l2` for unit norm).
- `cosine`: cosine similarity to class weights times a temperature; initialised from the cached class-text
  embeddings and CLIP's logit scale it *is* the zero-shot classifier at step 0.
- `decoder`: the seed paper's light transformer over the cached tokens (3 blocks, 4 heads, MLP ratio 0.5);
  its class token goes into the classifier.
- `coop`: prompt tuning (vlmcache/prompts.py); the classifier is the frozen text tower over learned prompts.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.errors import VlmcacheError, checked_params, unknown_choice
from vlmcache.prompts import CoOpHead
from vlmcache.tail import TailHead


class CosineClassifier(nn.Module):
    """logits = scale * cos(features, w_c); the scale is learnable unless fixed."""

    def __init__(self, in_dim: int, num_classes: int, scale: float = 1 / 0.07, learn_scale: bool = True):
        super().__init__()
        self.init_scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)
        self.log_scale.fill_(math.log(self.init_scale))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).T

    def weight_norms(self) -> torch.Tensor:
        return torch.ones(self.weight.shape[0], device=self.weight.device)

    @torch.no_grad()
    def init_from_text(self, text_embeddings: torch.Tensor, logit_scale: float) -> None:
        self.weight.copy_(text_embeddings)
        self.log_scale.fill_(math.log(logit_scale))


class LinearClassifier(nn.Linear):
    def weight_norms(self) -> torch.Tensor:
        return self.weight.norm(dim=1)


def make_classifier(kind: str, in_dim: int, num_classes: int, **kw) -> nn.Module:
    if kind == "linear":
        return LinearClassifier(in_dim, num_classes)
    if kind == "cosine":
        return CosineClassifier(in_dim, num_classes, **kw)
    raise unknown_choice("classifier", kind, ["linear", "cosine"])


INPUT_NORMS = ("l2", "center_l2", "standardize", "none")


class PooledHead(nn.Module):
    """`classifier(features(x))` on the pooled embedding, after an input normalisation `normalize`:
    `l2` (unit norm, as CLIP compares embeddings), `center_l2` (subtract the training mean, then unit norm),
    `standardize` (per-dimension z-score with training statistics, as linear probes do), or `none`."""

    input = "pooled"

    def __init__(self, in_dim: int, normalize: str):
        super().__init__()
        if normalize not in INPUT_NORMS:
            raise unknown_choice("input normalisation (normalize)", normalize, INPUT_NORMS)
        self.normalize = normalize
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))

    @property
    def needs_input_stats(self) -> bool:
        return self.normalize in ("center_l2", "standardize")

    @torch.no_grad()
    def fit_input(self, chunks) -> None:
        """Training-split statistics for `center_l2` and `standardize` (a no-op for the others), from the rows
        in chunks (an iterable of (n, D) tensors: the split is never upcast whole): the mean, and the standard
        deviation with Bessel's correction, accumulated in float64."""
        if not self.needs_input_stats:
            return
        n, total, squares = 0, 0.0, 0.0
        for x in chunks:
            x = x.double()
            n, total, squares = n + len(x), total + x.sum(0), squares + (x * x).sum(0)
        mean = total / n
        self.shift.copy_(mean)
        if self.normalize == "standardize":
            var = (squares - n * mean * mean) / max(n - 1, 1)
            self.scale.copy_(var.clamp(min=0).sqrt().clamp(min=1e-6))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "none":
            return x
        x = (x - self.shift) / self.scale
        return x if self.normalize == "standardize" else F.normalize(x, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LinearHead(PooledHead):
    """A linear classifier on the pooled embedding after an input normalisation (PooledHead's). The default,
    `standardize`, is what linear probes use: it trains at one learning rate on CLIP's embeddings and on
    features of any scale or offset, where a unit-norm input (`l2`) gives logits too small to learn from at
    the default learning rate when the embeddings share a direction (as a random tower's do)."""

    def __init__(self, in_dim: int, num_classes: int, normalize: str = "standardize"):
        super().__init__(in_dim, normalize)
        self.classifier = make_classifier("linear", in_dim, num_classes)


class CosineHead(PooledHead):
    """Cosine similarity to class weights times a learnable temperature, after an input normalisation
    (PooledHead's; the cosine itself unit-normalises). train-head picks `standardize`, or `none` with --text-init
    so that the text-initialised head is the zero-shot classifier at step 0."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        scale: float = 1 / 0.07,
        learn_scale: bool = True,
        normalize: str = "none",
    ):
        super().__init__(in_dim, normalize)
        self.classifier = make_classifier("cosine", in_dim, num_classes, scale=scale, learn_scale=learn_scale)


# how the decoder's new weights start: "torch" (nn.TransformerEncoderLayer's own init, qkv xavier-uniform and
# non-zero MLP and classifier biases) or "seed" (the seed's: Hugging Face's _init_weights over timm Blocks)
DECODER_INITS = ("torch", "seed")


class DecoderHead(nn.Module):
    """Transformer blocks over the frozen tower's final tokens (B, T, W); the class token is classified."""

    input = "tokens"

    def __init__(
        self,
        width: int,
        num_classes: int,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: float = 0.5,
        classifier: str = "linear",
        final_norm: bool = True,
        init: str = "torch",
    ):
        super().__init__()
        if init not in DECODER_INITS:
            raise unknown_choice("decoder init", init, DECODER_INITS)
        if depth < 1 or heads < 1 or not mlp_ratio > 0:
            raise VlmcacheError(
                f"The decoder needs depth >= 1, heads >= 1 and mlp_ratio > 0; got {depth}, {heads}, {mlp_ratio}."
            )
        if width % heads:
            raise VlmcacheError(f"The decoder's heads ({heads}) must divide the token width ({width}).")
        block = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=max(1, int(width * mlp_ratio)),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, num_layers=depth, enable_nested_tensor=False)
        # a pre-norm transformer's output is normalised before a head reads it (ViT, open_clip's ln_post); the
        # seed's decoder feeds its last block's class token to the classifier as it is (final_norm=False)
        self.norm = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.classifier = make_classifier(classifier, width, num_classes)
        if init == "seed":
            self._seed_init()

    @torch.no_grad()
    def _seed_init(self) -> None:
        """The seed's start (imblearn/nets/clip/clip.py L26-33): timm Blocks and an nn.Linear classifier, new
        modules of a Hugging Face `from_pretrained` model, which runs `CLIPPreTrainedModel._init_weights` on them:
        every Linear bias zero and LayerNorms at (1, 0); Linear weights keep nn.Linear's default
        (kaiming-uniform, a = sqrt(5), bound 1 / sqrt(fan_in)). PyTorch's encoder layer instead starts its fused
        qkv projection xavier-uniform (1.22x wider) and its MLP biases non-zero, and nn.TransformerEncoder
        deep-copies one layer, so its blocks start equal; the seed's blocks are drawn one by one."""
        for block in self.blocks.layers:
            attn = block.self_attn
            # timm's qkv is one nn.Linear(W, 3W): the same fan-in, so the same bound as MHA's fused weight
            nn.init.kaiming_uniform_(attn.in_proj_weight, a=math.sqrt(5))
            for linear in (attn.out_proj, block.linear1, block.linear2):
                linear.reset_parameters()  # nn.Linear's default, drawn for this block
            for bias in (attn.in_proj_bias, attn.out_proj.bias, block.linear1.bias, block.linear2.bias):
                bias.zero_()
        if getattr(self.classifier, "bias", None) is not None:
            self.classifier.bias.zero_()

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(tokens.float())[:, 0])  # (B, T, W) -> class token (B, W)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(tokens))


@dataclass(frozen=True)
class HeadInfo:
    cls: type[nn.Module]
    input: str  # "pooled", "tokens" or "prefix" (what enters the tower's last K blocks: vlmcache/tail.py)
    description: str


HEADS: dict[str, HeadInfo] = {
    "linear": HeadInfo(LinearHead, "pooled", "linear layer on the standardised pooled embedding"),
    "cosine": HeadInfo(CosineHead, "pooled", "cosine classifier, optionally initialised from the class texts"),
    "decoder": HeadInfo(DecoderHead, "tokens", "the seed's transformer decoder over the cached tokens"),
    "coop": HeadInfo(CoOpHead, "pooled", "CoOp prompt tuning: learned prompt context through the frozen text tower"),
    "tail": HeadInfo(TailHead, "prefix", "the tower's last K blocks (adapter, lora, full or none) on a cached prefix"),
}


def head_params(name: str) -> dict[str, object]:
    """A head's settings with their defaults, e.g. {'depth': 3, 'heads': 4, ...} for the decoder."""
    if name not in HEADS:
        raise unknown_choice("head", name, HEADS)
    sig = inspect.signature(HEADS[name].cls.__init__)
    return {k: p.default for k, p in list(sig.parameters.items())[3:]}  # after self, in_dim, num_classes


def full_head_params(name: str, params: dict) -> dict:
    """Every setting of the head, the given ones over the defaults: what head.pt records, so that a later
    change of a default cannot change how a saved head is rebuilt."""
    return {**head_params(name), **checked_params(f"{name} head", params, head_params(name))}


# head.pt files written before they recorded every setting hold only the user's; these are the defaults then
_LEGACY_NORMALIZE = {"linear": "l2", "cosine": "none"}


def upgrade_head_file(saved: dict) -> dict:
    """A head.pt from before the pooled heads' `normalize` default became `standardize` (linear) and the
    cosine head gained an input normalisation: its settings as they were when it was trained."""
    name = saved["head"]
    if name not in _LEGACY_NORMALIZE or "normalize" in saved["head_params"]:
        return saved
    state = dict(saved["head_state"])
    weight = state["classifier.weight"]
    state.setdefault("shift", weight.new_zeros(weight.shape[1]))
    state.setdefault("scale", weight.new_ones(weight.shape[1]))
    params = {**saved["head_params"], "normalize": _LEGACY_NORMALIZE[name]}
    return {**saved, "head_params": params, "head_state": state}


def build_head(name: str, in_dim: int, num_classes: int, **params) -> nn.Module:
    return HEADS[name].cls(in_dim, num_classes, **checked_params(f"{name} head", params, head_params(name)))
