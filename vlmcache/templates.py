"""Prompt template sets for class-text embeddings, chosen by name."""

from __future__ import annotations

import functools

from vlmcache.choices import DEFAULT_TEMPLATE_SETS  # noqa: F401 (re-exported: extract's default)
from vlmcache.errors import unknown_choice


def _as_format(templates) -> list[str]:
    # open_clip keeps templates as lambdas; calling one with "{}" gives back its format string.
    return [t("{}") for t in templates]


@functools.cache
def template_sets() -> dict[str, list[str]]:
    """The template sets by name; open_clip (which holds CLIP's) is imported on first use, not by training."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return {
        "openai": _as_format(OPENAI_IMAGENET_TEMPLATES),  # the 80 prompts of CLIP's ImageNet evaluation
        "openai_simple": _as_format(SIMPLE_IMAGENET_TEMPLATES),  # CLIP's 7-prompt subset
        "photo": ["a photo of a {}."],
    }


def __getattr__(name: str):
    if name == "TEMPLATE_SETS":  # template_sets(), built when first asked for
        return template_sets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_templates(name: str) -> list[str]:
    if name not in template_sets():
        raise unknown_choice("template set", name, template_sets())
    return template_sets()[name]
