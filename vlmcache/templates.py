"""Prompt template sets for class-text embeddings, chosen by name."""

from __future__ import annotations

from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from vlmcache.choices import DEFAULT_TEMPLATE_SETS  # noqa: F401 (re-exported: extract's default)
from vlmcache.errors import unknown_choice


def _as_format(templates) -> list[str]:
    # open_clip keeps templates as lambdas; calling one with "{}" gives back its format string.
    return [t("{}") for t in templates]


TEMPLATE_SETS: dict[str, list[str]] = {
    "openai": _as_format(OPENAI_IMAGENET_TEMPLATES),  # the 80 prompts of CLIP's ImageNet evaluation
    "openai_simple": _as_format(SIMPLE_IMAGENET_TEMPLATES),  # CLIP's 7-prompt subset
    "photo": ["a photo of a {}."],
}


def get_templates(name: str) -> list[str]:
    if name not in TEMPLATE_SETS:
        raise unknown_choice("template set", name, TEMPLATE_SETS)
    return TEMPLATE_SETS[name]
