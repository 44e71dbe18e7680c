"""Example prompts for the built-in models, in words their tokenizers know.

The reference models (``ref-*``) were trained on `accel.pipelines.ref.data` prompts, so a prompt outside
that vocabulary ("a cat on the moon") gives them nothing to follow; the tiny models (``tiny-*``) are
random weights over a small word list. Other models take any prompt: no examples, a generic hint.
"""

from __future__ import annotations

_REF_IMAGE = ("a big red circle on a white background",
              "a small blue square on the left on a gray background",
              "a small yellow star left of a small purple ring on a black background",
              "a big green triangle at the top on a white gradient background")
_REF_VIDEO = ("a big red circle moving right on a black background",
              "a big blue square bouncing on a white background",
              "a big yellow star rotating in place on a gray background",
              "a big circle changing colour from green to pink on a black background")
_TINY = ("a photo of a cat riding a horse on the moon",
         "a red fox in a snow forest at sunset, detailed",
         "a castle on a hill under a night sky with stars")
_TINY_VIDEO = ("a dog running on the beach at sunset, slow motion",
               "a boat on the ocean with waves, camera pan")
GENERIC = "a photo of a cat riding a horse on the moon"


def example_prompts(model: str, video: bool) -> list[str]:
    """Prompts that suit built-in model ``model`` (empty for other models)."""
    if model.startswith("ref-"):
        return list(_REF_VIDEO if video else _REF_IMAGE)
    if model.startswith("tiny-"):
        return list(_TINY_VIDEO + _TINY if video else _TINY)
    return []


def placeholder(model: str, video: bool) -> str:
    """The prompt box's placeholder: a hint to type (or pick) a prompt, quoting the first example, worded so
    that nobody mistakes it for a prompt already filled in."""
    first = next(iter(example_prompts(model, video)), GENERIC)
    pick = ", or pick an example below" if example_prompts(model, video) else ""
    return f"Type a prompt{pick}, e.g. “{first}”"
