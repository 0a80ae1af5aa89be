"""`ocr`: tesseract through pytesseract; image in, text with word boxes and confidences out."""

from __future__ import annotations

import io
import re
import shutil
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request

from rma.services._common import (
    ServiceError,
    create_service_app,
    read_upload,
    require,
    run_sync,
)
from rma.services.settings import ServiceSettings

_LANG = re.compile(r"^[A-Za-z_]+(\+[A-Za-z_]+)*$")


def recognize(data: bytes, lang: str, tesseract_cmd: str | None) -> dict[str, Any]:
    """OCR of one image: full text, and each word with its box and confidence (0-100)."""
    import pytesseract
    from PIL import Image, UnidentifiedImageError

    if tesseract_cmd:
        pytesseract.pytesseract.tesseract_cmd = tesseract_cmd
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:
        raise ServiceError(413, "too_large", f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ServiceError(422, "invalid_image", f"not a readable image: {exc}") from exc
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    try:
        table = pytesseract.image_to_data(image, lang=lang, output_type=pytesseract.Output.DICT)
    except pytesseract.TesseractError as exc:
        raise ServiceError(422, "ocr_failed", f"tesseract refused the request: {exc}") from exc
    words: list[dict[str, Any]] = []
    lines: dict[tuple[int, int, int], list[str]] = {}
    for i, word in enumerate(table["text"]):
        if not str(word).strip():
            continue
        key = (table["block_num"][i], table["par_num"][i], table["line_num"][i])
        lines.setdefault(key, []).append(str(word))
        words.append(
            {
                "text": str(word),
                "confidence": round(float(table["conf"][i]), 2),
                "left": int(table["left"][i]),
                "top": int(table["top"][i]),
                "width": int(table["width"][i]),
                "height": int(table["height"][i]),
                "block": int(key[0]),
                "line": int(key[2]),
            }
        )
    text = "\n".join(" ".join(ws) for ws in lines.values())
    mean = sum(w["confidence"] for w in words) / len(words) if words else 0.0
    return {
        "text": text,
        "words": words,
        "confidence": round(mean, 2),
        "width": image.width,
        "height": image.height,
        "lang": lang,
    }


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ocr service's app."""
    require("pytesseract", "PIL", "multipart")
    if not shutil.which(settings.tesseract_cmd or "tesseract"):
        raise FileNotFoundError(
            "no tesseract binary: install tesseract-ocr or set RMA_TESSERACT_CMD"
        )

    def load() -> None:
        import pytesseract

        if settings.tesseract_cmd:
            pytesseract.pytesseract.tesseract_cmd = settings.tesseract_cmd
        pytesseract.get_tesseract_version()

    app, readiness = create_service_app("ocr", settings, load=load)

    @app.post("/ocr")
    async def ocr(
        request: Request,
        lang: Annotated[
            str | None, Query(description="tesseract language(s), e.g. eng+deu")
        ] = None,
    ) -> dict[str, Any]:
        """Body: the image (multipart field `file`, or raw bytes)."""
        language = lang or settings.ocr_lang
        if not _LANG.match(language):
            raise ServiceError(422, "invalid_request", f"bad language {language!r}")
        data, _, _ = await read_upload(request)
        readiness.check()
        result: dict[str, Any] = await run_sync(recognize, data, language, settings.tesseract_cmd)
        return result

    return app
