"""Built-in reference services, run by `rma service run NAME`.

Each module has `create_app(settings) -> FastAPI`; heavy libraries load inside it, never here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from rma.services.settings import ServiceSettings

BUILTIN: dict[str, str] = {
    "llm": "rma.services.llm",
    "embeddings": "rma.services.embeddings",
    "ner": "rma.services.ner",
    "ocr": "rma.services.ocr",
    "doc": "rma.services.doc",
    "rag": "rma.services.rag",
    "notes": "rma.services.notes",
}


def build_app(name: str, settings: ServiceSettings | None = None) -> FastAPI:
    """The ASGI app of built-in service `name`."""
    if name not in BUILTIN:
        known = ", ".join(sorted(BUILTIN))
        raise ValueError(f"unknown built-in service {name!r}; the built-in services are: {known}")
    from rma.services.settings import ServiceSettings

    module = importlib.import_module(BUILTIN[name])
    app: FastAPI = module.create_app(settings or ServiceSettings())
    return app


def run_service(name: str, host: str, port: int) -> None:
    """Build service `name` and serve it with uvicorn until interrupted."""
    app = build_app(name)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
