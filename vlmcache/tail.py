"""Tail tuning: the image tower's last K blocks (with AdaptFormer adapters, LoRA, or the blocks themselves) trained on
a cached prefix, the residual stream that enters those blocks.

Blocks 0..L-K-1 of a ViT never change when only the last K train, so their output for an image view is as cacheable
as the final tokens: `vlmcache extract --tail-blocks K` stores it (the `prefix` of each row, `view_prefix` of its
views), and the `tail` head runs only the last K blocks, the final norm, the projection and a classifier per step.
The cache is an optimisation, never another method: the same run with the prefix recomputed from images
(`train-head --stream`) gives the same numbers.

The idea of one tuner object holding every trainable piece comes from LIFT (Shi et al., ICML 2024, GitHub
`shijxcs/LIFT`, models/peft_vit.py `ViT_Tuner`); the code here is our own, over open_clip's blocks.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmcache.errors import VlmcacheError, unknown_choice

PREFIX_TAP = "input of visual.transformer.resblocks[L-K]: after ln_pre, all tokens (class token first), (N, T, W)"
TUNES = {
    "adapter": "AdaptFormer: a parallel bottleneck on each tail block's MLP branch, zero-initialised (LIFT's)",
    "lora": "LoRA on each tail block's attention queries and values (LIFT's)",
    "full": "the K tail blocks themselves",
    "none": "nothing in the tower: the frozen tail (a check, and a baseline)",
}
FEATURES = {
    "proj": "the projected embedding, as CLIP compares it with text (what the cache's `pooled` holds)",
    "ln_post": "the class token after ln_post, before the projection (LIFT's choice: peft_vit.py keeps proj unused)",
}
NORMALIZE = ("l2", "none")


# --------------------------------------------------------------------------- the tower's tail


def tower_blocks(visual: nn.Module, model: str) -> nn.ModuleList:
    """The transformer blocks of an open_clip ViT tower whose tail we can run; refused, with the reason, for others."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "ln_post") or not hasattr(visual, "class_embedding"):
        raise VlmcacheError(
            f"--tail-blocks needs an open_clip ViT image tower (transformer blocks to cut); {model} has "
            f"{type(visual).__name__}. Pick a ViT model, or train on pooled features."
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise VlmcacheError(
            f"--tail-blocks: {model}'s tower pools with attention (attn_pool), which the tail head does not run."
        )
    kinds = {type(b).__name__ for b in blocks if not isinstance(b, ResidualAttentionBlock)}
    if kinds:
        raise VlmcacheError(
            f"--tail-blocks runs open_clip's ResidualAttentionBlock; {model}'s tower has {', '.join(sorted(kinds))}."
        )
    return blocks


def check_tail_blocks(visual: nn.Module, k: int, model: str) -> int:
    """K checked against the tower: 1 <= K <= L. Returns L."""
    n = len(tower_blocks(visual, model))
    if not 1 <= k <= n:
        raise VlmcacheError(f"--tail-blocks must be between 1 and {n} ({model}'s tower has {n} blocks), got {k}.")
    return n


@contextlib.contextmanager
def prefix_tap(visual: nn.Module, k: int, model: str = "the model"):
    """Within the block, every forward of `visual` appends to the yielded list the exact tensor block L-K receives,
    as (B, T, W) (open_clip keeps LND layout inside the transformer when batch_first is False: transposed back)."""
    blocks = tower_blocks(visual, model)
    check_tail_blocks(visual, k, model)
    batch_first = getattr(visual.transformer, "batch_first", True)
    tapped: list[torch.Tensor] = []

    def hook(module, args):
        x = args[0]
        tapped.append(x if batch_first else x.transpose(0, 1))

    handle = blocks[len(blocks) - k].register_forward_pre_hook(hook)
    try:
        yield tapped
    finally:
        handle.remove()


# --------------------------------------------------------------------------- what trains


class AdaptFormer(nn.Module):
    """AdaptFormer (Chen et al., NeurIPS 2022) as LIFT builds it (peft_modules.py `AdaptFormer`): LayerNorm, a
    down-projection, ReLU, an up-projection initialised to zero and a learnable scale starting at 1, added to
    the MLP branch; at step 0 it adds nothing."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.ln(x)))) * self.scale


class LoRA(nn.Module):
    """A low-rank update x A B / r (Hu et al., ICLR 2022) as LIFT builds it (peft_modules.py `LoRA`): A (W, r)
    Kaiming-uniform, B (r, W) zero, scaling 1 / r; at step 0 it adds nothing."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.a = nn.Parameter(torch.empty(width, rank))
        self.b = nn.Parameter(torch.zeros(rank, width))
        self.scaling = 1.0 / rank
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a @ self.b) * self.scaling


def lift_bottleneck(num_classes: int, n_blocks: int) -> int:
    """LIFT's default adapter and LoRA width, 2^floor(log2(C / 2L)) and at least 1 (peft_vit.py line 95); L is the
    tower's block count, whatever the number of tuned blocks."""
    return 2 ** max(0, int(math.log2(num_classes / (n_blocks * 2))))


class TailTuner(nn.Module):
    """The tower's last K blocks, its final norm and projection (copies: the tower itself is left as it is), and every
    piece that trains on them. `tune` says which: the adapters, the LoRA pairs, the blocks (full) or nothing; all
    else is frozen by construction, so an optimiser over `parameters()` that require grad takes exactly those."""

    def __init__(
        self, visual: nn.Module, k: int, tune: str, features: str, num_classes: int, bottleneck: int = 0,
        model: str = "the model",
    ):  # fmt: skip
        super().__init__()
        blocks = tower_blocks(visual, model)
        n = check_tail_blocks(visual, k, model)
        if tune not in TUNES:
            raise unknown_choice("tail tuning (tune)", tune, TUNES)
        if features not in FEATURES:
            raise unknown_choice("tail features (features)", features, FEATURES)
        if bottleneck < 0:
            raise VlmcacheError(f"The tail head's bottleneck must be 0 (LIFT's default) or more, got {bottleneck}.")
        self.k, self.tune, self.features = k, tune, features
        self.blocks = copy.deepcopy(blocks[n - k :]).requires_grad_(False)
        self.ln_post = copy.deepcopy(visual.ln_post).requires_grad_(False)
        proj = getattr(visual, "proj", None)
        if features == "proj" and proj is None:
            raise VlmcacheError(f"{model}'s tower has no projection; use the tail head's features=ln_post.")
        # kept with features=ln_post too: class texts reach the classifier through it (init_from_text)
        self.register_buffer("proj", proj.detach().clone() if proj is not None else None)
        self.pool_type = getattr(visual, "pool_type", "tok")
        if self.pool_type not in ("tok", "avg"):
            raise VlmcacheError(f"--tail-blocks: {model}'s tower pools with '{self.pool_type}', not tok or avg.")
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))
        width = self.ln_post.weight.shape[0]
        self.bottleneck = bottleneck or lift_bottleneck(num_classes, n)
        self.adapters = (
            nn.ModuleList(AdaptFormer(width, self.bottleneck) for _ in range(k)) if tune == "adapter" else None
        )
        self.lora = (
            nn.ModuleList(nn.ModuleDict({"q": LoRA(width, self.bottleneck), "v": LoRA(width, self.bottleneck)})
                          for _ in range(k))
            if tune == "lora" else None
        )  # fmt: skip
        if tune == "full":
            self.blocks.requires_grad_(True)
        self.width = width
        self.out_dim = proj.shape[1] if features == "proj" else width

    def _block(self, i: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """open_clip's ResidualAttentionBlock (no attention mask: a ViT's tokens all see each other), written out so
        that LoRA reaches the queries and values, as LIFT's Peft_ViT.forward writes CLIP's blocks out."""
        attn = blk.attn
        h = blk.ln_1(x)
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (B, T, W) each
        if self.lora is not None:
            q = q + self.lora[i]["q"](h)
            v = v + self.lora[i]["v"](h)
        b, t, w = q.shape
        heads = attn.num_heads
        q, k, v = (z.reshape(b, t, heads, w // heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, W/H)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w)
        x = x + blk.ls_1(attn.out_proj(a))
        m = blk.ls_2(blk.mlp(blk.ln_2(x)))
        if self.adapters is not None:  # parallel to the MLP branch, on its input before ln_2 (LIFT's AdaptFormer)
            m = m + self.adapters[i](x)
        return x + m

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        """(B, T, W) prefix -> (B, out_dim) features: the tower's own pooling, norm and projection."""
        x = prefix.float()
        for i, blk in enumerate(self.blocks):
            x = self._block(i, blk, x)
        if self.final_ln_after_pool:
            pooled = self.ln_post(self._pool(x))
        else:
            pooled = self._pool(self.ln_post(x))
        return pooled @ self.proj if self.features == "proj" else pooled

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool_type == "tok" else x[:, 1:].mean(dim=1)  # (B, T, W) -> (B, W)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class TailHead(nn.Module):
    """`classifier(features(prefix))` with `features` the tower's tail (TailTuner). Built empty and bound to the
    tower of the encoder that wrote the cache (`bind_tower`), as the prompt-tuning head is bound to the text tower:
    the cache's fingerprint names the weights, and train-head loads them again."""

    input = "prefix"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        tune: str = "adapter",
        classifier: str = "cosine",
        features: str = "proj",
        bottleneck: int = 0,
        normalize: str = "l2",
        scale: float = 0.0,
        learn_scale: bool = True,
    ):
        super().__init__()
        if tune not in TUNES:
            raise unknown_choice("tail tuning (--tune)", tune, TUNES)
        if features not in FEATURES:
            raise unknown_choice("tail features (features)", features, FEATURES)
        if classifier not in ("linear", "cosine"):
            raise unknown_choice("tail classifier (classifier)", classifier, ["linear", "cosine"])
        if normalize not in NORMALIZE:
            raise unknown_choice("tail input normalisation (normalize)", normalize, NORMALIZE)
        self.in_dim, self.num_classes = in_dim, num_classes
        if not (scale >= 0 and math.isfinite(scale)):
            raise VlmcacheError(f"The tail head's cosine scale must be 0 (1/0.07, learnable) or positive, got {scale}.")
        self.settings = dict(tune=tune, classifier=classifier, features=features, bottleneck=bottleneck)
        self.scale, self.learn_scale = scale, learn_scale
        self.normalize = normalize
        self.tuner: TailTuner | None = None
        self.classifier: nn.Module | None = None

    def bind_tower(self, visual: nn.Module, k: int, model: str = "the model") -> TailHead:
        """Copy the tower's last `k` blocks (and norm, projection) into the tuner, then make the classifier."""
        from vlmcache.heads import make_classifier  # heads.py lists this head: imported here, not at the top

        s = self.settings
        self.tuner = TailTuner(visual, k, s["tune"], s["features"], self.num_classes, s["bottleneck"], model)
        if self.tuner.width != self.in_dim:
            raise VlmcacheError(f"The prefix has width {self.in_dim}; {model}'s tail blocks take {self.tuner.width}.")
        kw = {}
        if s["classifier"] == "cosine":
            kw = {"scale": self.scale or 1 / 0.07, "learn_scale": self.learn_scale}
        self.classifier = make_classifier(s["classifier"], self.tuner.out_dim, self.num_classes, **kw)
        return self

    def _bound(self) -> TailTuner:
        if self.tuner is None:
            raise RuntimeError("the tail head is used before bind_tower")
        return self.tuner

    def features(self, prefix: torch.Tensor) -> torch.Tensor:
        f = self._bound()(prefix)
        return F.normalize(f, dim=-1) if self.normalize == "l2" else f

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(prefix))

    @torch.no_grad()
    def init_from_text(self, text: torch.Tensor, logit_scale: float) -> None:
        """The classifier from class-text embeddings (C, D); before the projection (features=ln_post) they are
        mapped back by proj^T and unit-normalised, as LIFT's init_head_text_feat does (trainer.py lines 350-351).
        The scale becomes CLIP's logit scale (step 0 is zero-shot) unless the head's `scale` is set (LIFT: 25)."""
        if self.settings["features"] == "ln_post":
            text = F.normalize(text @ self._bound().proj.T, dim=-1)  # (C, D) -> (C, W)
        if self.scale:
            self.classifier.weight.copy_(text)
        else:
            self.classifier.init_from_text(text, logit_scale)
