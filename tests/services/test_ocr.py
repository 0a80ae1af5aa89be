"""`ocr`: tesseract reads back text rendered into a PNG."""

from __future__ import annotations

import io

import httpx
import pytest

pytestmark = pytest.mark.model


def render(text: str) -> bytes:
    """A PNG of `text`, black on white, large enough for tesseract."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=40)
    image = Image.new("RGB", (900, 120), "white")
    ImageDraw.Draw(image).text((30, 30), text, fill="black", font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_reads_back_rendered_text_with_boxes(ocr_url: str) -> None:
    png = render("Hello pool from rma")
    response = httpx.post(f"{ocr_url}/ocr", files={"file": ("t.png", png, "image/png")}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["text"].strip() == "Hello pool from rma"
    assert [w["text"] for w in result["words"]] == ["Hello", "pool", "from", "rma"]
    for word in result["words"]:
        assert word["confidence"] > 50
        assert word["width"] > 0
        assert word["height"] > 0
        assert 0 <= word["left"] < 900
        assert 0 <= word["top"] < 120
    assert (result["width"], result["height"]) == (900, 120)


def test_raw_body_upload(ocr_url: str) -> None:
    png = render("Raw bytes work")
    response = httpx.post(
        f"{ocr_url}/ocr", content=png, headers={"content-type": "image/png"}, timeout=60
    )
    assert response.json()["text"].strip() == "Raw bytes work"


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"not an image"}, 422, "invalid_image"),
        ({"content": b""}, 400, "empty_body"),
        ({"content": b"x", "params": {"lang": "../etc"}}, 422, "invalid_request"),
        ({"params": {"lang": "xx"}}, 422, "ocr_failed"),
    ],
)
def test_bad_input_is_a_client_error(ocr_url: str, kwargs: dict, status: int, code: str) -> None:
    kwargs.setdefault("content", render("x"))
    response = httpx.post(f"{ocr_url}/ocr", **kwargs, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
