"""`ner`: named entities with spaCy; text in, entities with character offsets out."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from rma.services._common import ServiceError, create_service_app, require, run_sync
from rma.services.settings import ServiceSettings


class NerRequest(BaseModel):
    """One text, or several."""

    text: Annotated[str | None, Field(description="The text to analyse.")] = None
    texts: Annotated[list[str] | None, Field(description="Several texts, answered in order.")] = (
        None
    )
    labels: Annotated[
        list[str] | None, Field(description="Keep only these entity labels, e.g. ORG, GPE.")
    ] = None


class Entity(BaseModel):
    """One entity: its text, label and [start, end) character offsets."""

    text: str
    label: str
    start: int
    end: int


class Tagger:
    """A spaCy pipeline, loaded once, run under a lock."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._nlp: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        import spacy

        self._nlp = spacy.load(self.model)

    @property
    def name(self) -> str:
        meta = self._nlp.meta if self._nlp is not None else {}
        return f"{meta.get('lang', '?')}_{meta.get('name', self.model)}-{meta.get('version', '?')}"

    def entities(self, texts: list[str]) -> list[list[Entity]]:
        with self._lock:
            docs = list(self._nlp.pipe(texts))
        return [
            [
                Entity(text=e.text, label=e.label_, start=e.start_char, end=e.end_char)
                for e in doc.ents
            ]
            for doc in docs
        ]


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ner service's app."""
    require("spacy")
    if "/" not in settings.ner_model and "\\" not in settings.ner_model:
        require(settings.ner_model)
    tagger = Tagger(settings.ner_model)
    app, readiness = create_service_app("ner", settings, load=tagger.load)

    @app.post("/ner")
    async def ner(body: NerRequest) -> dict[str, Any]:
        if (body.text is None) == (body.texts is None):
            raise ServiceError(422, "invalid_request", "send exactly one of `text` or `texts`")
        texts = [body.text] if body.text is not None else list(body.texts or [])
        if sum(len(t) for t in texts) > settings.max_text_chars:
            raise ServiceError(413, "too_large", f"text over {settings.max_text_chars} characters")
        readiness.check()
        found = await run_sync(tagger.entities, texts)
        if body.labels:
            wanted = {label.upper() for label in body.labels}
            found = [[e for e in ents if e.label in wanted] for ents in found]
        if body.text is not None:
            return {"model": tagger.name, "entities": found[0]}
        return {"model": tagger.name, "results": [{"entities": ents} for ents in found]}

    return app
