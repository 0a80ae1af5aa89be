"""Image input in chat requests: only models that declare vision (the catalog's ``vision``) get it.

An OpenAI chat message carries images as content parts, ``{"type": "image_url", ...}`` (and the
Responses API's ``input_image``). A model without vision would ignore them or fail in its own
way; the gateway refuses such a request up front with 400 ``model_lacks_vision`` naming the
models that take images.
"""

from __future__ import annotations

from typing import Any

IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def has_image_input(data: dict[str, Any]) -> bool:
    """Whether a parsed chat body's messages carry an image part."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                return True
    return False
