"""`doc`: PDF and DOCX to text; scanned pages through the pool's `ocr` service."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest

EXTRA = "needs the `local` extra: pip install 'rma-pool[local]'"
pytest.importorskip("pypdf", reason=f"pypdf missing: {EXTRA}")
pytest.importorskip("docx", reason=f"python-docx missing: {EXTRA}")
fpdf = pytest.importorskip("fpdf", reason="fpdf2 missing: needs the `dev` extra")

from rma.services import build_app  # noqa: E402


def text_pdf(pages: list[str]) -> bytes:
    pdf = fpdf.FPDF()
    pdf.set_font("Helvetica", size=14)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    return bytes(pdf.output())


def scanned_pdf(text: str) -> bytes:
    """A one-page PDF whose only content is a picture of `text`."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (1200, 160), "white")
    ImageDraw.Draw(image).text((40, 50), text, fill="black", font=ImageFont.load_default(size=48))
    png = io.BytesIO()
    image.save(png, format="PNG")
    pdf = fpdf.FPDF()
    pdf.add_page()
    pdf.image(io.BytesIO(png.getvalue()), x=10, y=10, w=190)
    return bytes(pdf.output())


@pytest.fixture
def doc_url(make_settings, server) -> Iterator[str]:  # type: ignore[no-untyped-def]
    settings = make_settings(gateway_url="http://127.0.0.1:9", gateway_timeout=2)
    with server(build_app("doc", settings)) as url:
        yield url


def test_extracts_text_from_a_generated_pdf(doc_url: str) -> None:
    pdf = text_pdf(["The invoice total is 42 euros.", "Page two talks about llamas."])
    response = httpx.post(f"{doc_url}/extract", files={"file": ("a.pdf", pdf, "application/pdf")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["format"] == "pdf"
    assert result["filename"] == "a.pdf"
    assert [p["text"] for p in result["pages"]] == [
        "The invoice total is 42 euros.",
        "Page two talks about llamas.",
    ]
    assert result["ocr_pages"] == 0
    assert "42 euros" in result["text"]
    assert "llamas" in result["text"]


def test_extracts_paragraphs_and_tables_from_docx(doc_url: str) -> None:
    import docx

    document = docx.Document()
    document.add_paragraph("Minutes of the meeting")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "Owner"
    table.rows[0].cells[1].text = "Ada"
    out = io.BytesIO()
    document.save(out)
    response = httpx.post(f"{doc_url}/extract", content=out.getvalue())
    assert response.json()["format"] == "docx"
    assert response.json()["text"] == "Minutes of the meeting\nOwner\tAda"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", 415, "unsupported_media_type"),
        (b"%PDF-1.7 garbage", 422, "invalid_document"),
        (b"PK\x03\x04 not a zip", 415, "unsupported_media_type"),
        (b"", 400, "empty_body"),
    ],
)
def test_bad_documents_are_client_errors(
    doc_url: str, content: bytes, status: int, code: str
) -> None:
    response = httpx.post(f"{doc_url}/extract", content=content)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_scanned_page_without_an_ocr_service_is_503(doc_url: str) -> None:
    response = httpx.post(f"{doc_url}/extract", content=scanned_pdf("Hello"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "gateway_unreachable"


@pytest.mark.model
def test_scanned_pdf_is_read_through_the_pools_ocr(  # type: ignore[no-untyped-def]
    make_settings, server, test_gateway, ocr_url
) -> None:
    with (
        server(test_gateway({}, {"ocr": ocr_url}), health=None) as gw,
        server(build_app("doc", make_settings(gateway_url=gw))) as url,
    ):
        pdf = scanned_pdf("Scanned receipt number 7731")
        response = httpx.post(f"{url}/extract", content=pdf, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["pages"][0]["ocr"] is True
    assert result["ocr_pages"] == 1
    assert result["text"].strip() == "Scanned receipt number 7731"
