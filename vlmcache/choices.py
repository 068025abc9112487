"""The names users choose from on the command line, importable without torch or open_clip so that `--help`
answers at once. The registries that implement them (losses.LOSSES, heads.HEADS, samplers.SAMPLERS,
stage2.STAGE2, templates.TEMPLATE_SETS, datasets.DATASETS, recipe.PROTOCOLS) are the truth; tests/test_cli.py
checks that each holds exactly these names, in this order."""

from __future__ import annotations

import os

DATASETS = ("imagenet_lt", "places_lt", "inat18", "imagefolder", "split", "wds", "digits_lt")
USER_DATASETS = ("imagefolder", "split", "wds")  # the user's own images: their caches are named by --name
LOSSES = ("ce", "focal", "cbw", "cb", "balanced_softmax", "grw", "lade", "ldam", "logit_adjust")
SAMPLERS = ("instance", "class_balanced", "sqrt")
HEADS = ("linear", "cosine", "decoder", "coop", "tail")
STAGE2 = ("crt", "lws", "disalign", "marc")
TEMPLATE_SETS = ("openai", "openai_simple", "photo")
DEFAULT_TEMPLATE_SETS = ("openai", "photo")
PROTOCOLS = ("default", "seed", "lift")
TAIL_TUNE = ("adapter", "lora", "full", "none")  # train-head --head tail --tune: tail.TUNES
TUNE = {
    "all": "every parameter of the image tower",
    "last": "the last --last-k transformer blocks, the final norm and the projection",
    "norms": "norm layers' weights and every bias (BitFit-style)",
}


def default_workers() -> int:
    """Image-loading processes when none are asked for: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)
