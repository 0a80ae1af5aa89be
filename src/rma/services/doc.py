"""`doc`: PDF and DOCX to text; scanned PDF pages go to the pool's `ocr` service."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from fastapi import FastAPI, Request

from rma.services._common import (
    Gateway,
    ServiceError,
    create_service_app,
    read_upload,
    require,
    run_sync,
)
from rma.services.settings import ServiceSettings


def sniff(data: bytes) -> str:
    """The document's format: pdf, docx or text; 415 for anything else."""
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                if "word/document.xml" in archive.namelist():
                    return "docx"
        except zipfile.BadZipFile:
            pass
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = "\0"
        if not any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
            return "text"
    raise ServiceError(415, "unsupported_media_type", "send a PDF, a DOCX or UTF-8 text")


def read_pdf(data: bytes) -> list[dict[str, Any]]:
    """Each page's text and its embedded images (PNG/JPEG bytes, for OCR)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ServiceError(422, "encrypted_document", "the PDF is encrypted")
        pages = []
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").strip()
            images = [image.data for image in page.images]
            pages.append({"page": number, "text": text, "images": images})
    except (PyPdfError, ValueError, KeyError, OSError) as exc:
        raise ServiceError(422, "invalid_document", f"not a readable PDF: {exc}") from exc
    return pages


def read_docx(data: bytes) -> str:
    """Paragraphs and table cells of a DOCX, in document order."""
    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ServiceError(422, "invalid_document", f"not a readable DOCX: {exc}") from exc
    parts = [p.text for p in document.paragraphs if p.text.strip()]
    for table in document.tables:
        for row in table.rows:
            cells = [cell.text.strip() for cell in row.cells if cell.text.strip()]
            if cells:
                parts.append("\t".join(cells))
    return "\n".join(parts)


def create_app(settings: ServiceSettings) -> FastAPI:
    """The doc service's app."""
    require("pypdf", "docx", "PIL", "multipart")
    gateway = Gateway(settings)
    app, _ = create_service_app("doc", settings, on_shutdown=gateway.aclose)

    async def ocr(image: bytes) -> str:
        result = await gateway.service(
            "ocr", "ocr", content=image, headers={"content-type": "application/octet-stream"}
        )
        return str(result.get("text", ""))

    @app.post("/extract")
    async def extract(request: Request) -> dict[str, Any]:
        """Body: the document (multipart field `file`, or raw bytes)."""
        data, filename, _ = await read_upload(request)
        kind = sniff(data)
        result: dict[str, Any] = {"filename": filename, "format": kind, "pages": None}
        if kind == "text":
            result["text"] = data.decode("utf-8")
        elif kind == "docx":
            result["text"] = await run_sync(read_docx, data)
        else:
            pages = await run_sync(read_pdf, data)
            out = []
            for page in pages:
                short = len(page["text"]) < settings.doc_ocr_min_chars
                scanned = bool(settings.doc_ocr and short and page["images"])
                if scanned:
                    texts = [await ocr(image) for image in page["images"]]
                    page["text"] = "\n".join(t.strip() for t in texts if t.strip())
                out.append({"page": page["page"], "text": page["text"], "ocr": scanned})
            result["pages"] = out
            result["text"] = "\n\n".join(p["text"] for p in out if p["text"])
            result["ocr_pages"] = sum(p["ocr"] for p in out)
        return result

    return app
