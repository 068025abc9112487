"""Prompt tuning (CoOp, Zhou et al. 2022) on cached image features: only the text tower runs per step.

The class prompt is `[SOS] ctx_1 .. ctx_M classname . [EOS]`; the M context vectors are learned, shared by all
classes or one set per class (class-specific context, CSC). Logits are CLIP's: logit scale times the cosine of
the cached image embedding and each class's prompt embedding. With `ctx_init="a photo of a"` the head at step
0 *is* CLIP's zero-shot classifier for that one template.

Every step encodes every class's prompt. Done at once, the text tower's activations for C prompts stay alive
until backward: 6.7 MB per class for ViT-B-16's text tower with prompts of about 29 tokens (measured), so 55 GB
for iNaturalist's 8,142 classes, nearly three times that at the full 77 tokens (the failure the seed paper
names). So prompts go through the tower in chunks of `class_chunk` classes under
gradient checkpointing: the forward keeps only each chunk's (chunk, D) output, and backward recomputes one
chunk at a time, so memory is bounded by the chunk, not by the class count. The token ids are kept, not their
embeddings (C x L integers), and sequences are cut after the longest prompt's end token: the text tower is
causal and reads the end token, so what follows it never changes the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmcache.errors import VlmcacheError


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding open_clip's text transformer parts (the CLIP model itself, or its `text`)."""
    tower = getattr(model, "text", model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask")
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    if (
        not all(hasattr(tower, n) for n in needed)
        or getattr(tower, "cls_emb", None) is not None
        or getattr(tower, "use_pad_mask", False)
        or pool != "argmax"
        or tower.attn_mask is None
    ):
        raise VlmcacheError(
            f"Prompt tuning needs a causal CLIP text transformer pooled at the end token; "
            f"{type(tower).__name__} (pool '{pool}') is not one."
        )
    return tower


class CoOpHead(nn.Module):
    """Learnable prompt context; the classifier is the frozen text tower over the class prompts."""

    input = "pooled"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        n_ctx: int = 16,
        ctx_init: str = "",
        class_specific: bool = False,
        class_chunk: int = 256,
    ):
        super().__init__()
        if class_chunk < 0 or n_ctx < 1:
            raise VlmcacheError("CoOp needs n_ctx >= 1 and class_chunk >= 0 (0: all classes at once).")
        self.in_dim, self.num_classes = in_dim, num_classes
        self.n_ctx, self.ctx_init, self.class_specific, self.class_chunk = n_ctx, ctx_init, class_specific, class_chunk
        self.classifier = PromptClassifier(self)
        self._text: list = []  # the frozen tower, outside the state dict: head.pt keeps only the context

    def bind_text(self, model: nn.Module, tokenizer, classnames: list[str], logit_scale: float) -> None:
        """Attach the frozen text tower and tokenise the class prompts; creates the context on first call."""
        tower = text_tower(model).requires_grad_(False)
        self._text = [tower]
        words = self.ctx_init.strip()
        if words:
            n = int((tokenizer([words])[0] > 0).sum()) - 2  # without start and end tokens
            if self.n_ctx != n:
                raise VlmcacheError(f"ctx_init '{words}' is {n} tokens; set n_ctx={n} to use it.")
        prefix = words or " ".join(["X"] * self.n_ctx)
        tokens = tokenizer([f"{prefix} {c}." for c in classnames])
        if len(classnames) != self.num_classes:
            raise VlmcacheError(f"{len(classnames)} class names for a {self.num_classes}-class head.")
        end = tokens.argmax(dim=-1)  # the end token has the highest id
        if int(end.min()) < self.n_ctx + 2:
            raise VlmcacheError("A class prompt was cut by the tokenizer's context length; use a smaller n_ctx.")
        length = int(end.max()) + 1  # causal tower pooled at the end token: what follows cannot matter
        device = tower.positional_embedding.device
        self.register_buffer("tokens", tokens[:, :length].to(device), persistent=False)
        self.register_buffer("end", end.to(device), persistent=False)
        self.logit_scale = float(logit_scale)
        if not hasattr(self, "ctx"):
            with torch.no_grad():
                init = tower.token_embedding(self.tokens[0, 1 : 1 + self.n_ctx]).float()
            if not words:
                init = torch.randn(init.shape, device=device) * 0.02  # CoOp's random init
            if self.class_specific:
                init = init.expand(self.num_classes, -1, -1).clone()
            self.ctx = nn.Parameter(init)

    def _encode_chunk(self, ctx: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        tower = self._text[0]
        tok = self.tokens[lo:hi]
        length = tok.shape[1]
        x = tower.token_embedding(tok)
        ctx = ctx[lo:hi] if self.class_specific else ctx.expand(hi - lo, -1, -1)
        x = torch.cat([x[:, :1], ctx.to(x.dtype), x[:, 1 + self.n_ctx :]], dim=1)
        x = x + tower.positional_embedding[:length]
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = tower.ln_final(x)
        x = x[torch.arange(hi - lo, device=x.device), self.end[lo:hi]]
        proj = tower.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def class_embeddings(self) -> torch.Tensor:
        """(C, D) unit-norm prompt embeddings; chunked and checkpointed while gradients are on."""
        if not self._text:
            raise RuntimeError("CoOpHead.bind_text must be called before use")
        chunk = self.class_chunk or self.num_classes
        out = []
        for lo in range(0, self.num_classes, chunk):
            hi = min(lo + chunk, self.num_classes)
            if torch.is_grad_enabled() and self.class_chunk:
                # Reentrant: the chunk's forward runs without building its autograd graph, so all that stays
                # alive per chunk is its (chunk, D) output. The non-reentrant variant keeps every chunk's graph
                # nodes; on CPU these small objects pinned glibc's heap and the peak grew with the class count.
                out.append(checkpoint(self._encode_chunk, self.ctx, lo, hi, use_reentrant=True))
            else:
                out.append(self._encode_chunk(self.ctx, lo, hi))
        return F.normalize(torch.cat(out).float(), dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class PromptClassifier(nn.Module):
    """logits = CLIP's logit scale x cos(image, prompt embedding). Outside training the prompt embeddings are
    computed once and kept, since they do not change."""

    def __init__(self, head: CoOpHead):
        super().__init__()
        self._head = [head]  # not a submodule: the head owns the context
        self._frozen: torch.Tensor | None = None

    def train(self, mode: bool = True):
        self._frozen = None
        return super().train(mode)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        head = self._head[0]
        if self.training or torch.is_grad_enabled():
            w = head.class_embeddings()
        else:
            if self._frozen is None:
                self._frozen = head.class_embeddings()
            w = self._frozen
        return head.logit_scale * f @ w.T
