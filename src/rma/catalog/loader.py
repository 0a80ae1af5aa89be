"""Loading and merging catalog TOML files."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rma.schemas.api import ServiceSpec


class CatalogError(ValueError):
    """The operator's catalog file is missing or malformed."""


class Catalog(Mapping[str, ServiceSpec]):
    """An immutable name -> :class:`ServiceSpec` mapping with a model index."""

    def __init__(self, services: Mapping[str, ServiceSpec]) -> None:
        self._services = dict(sorted(services.items()))
        self._by_model: dict[str, list[str]] = {}
        for spec in self._services.values():
            for model in spec.models:
                self._by_model.setdefault(model, []).append(spec.name)
        self._with_endpoints = [spec for spec in self._services.values() if spec.endpoints]

    def __getitem__(self, name: str) -> ServiceSpec:
        return self._services[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._services)

    def __len__(self) -> int:
        return len(self._services)

    def service_for_model(self, model: str) -> str | None:
        """The first service (by name) answering to an OpenAI ``model`` name, if any."""
        names = self._by_model.get(model)
        return names[0] if names else None

    def services_for_model(self, model: str) -> list[str]:
        """Every service answering to an OpenAI ``model`` name, by name (several may list it)."""
        return list(self._by_model.get(model, ()))

    def vision_models(self) -> list[str]:
        """Every model that some service declares takes image input, sorted."""
        return sorted({m for spec in self._services.values() for m in spec.vision})

    def services_for_endpoint(self, path: str) -> list[str]:
        """Every service whose ``endpoints`` cover the request path ``path``, by name."""
        return [spec.name for spec in self._with_endpoints if spec.serves_endpoint(path)]

    def endpoints(self) -> dict[str, list[str]]:
        """Every declared endpoint -> the services declaring it, by name."""
        out: dict[str, list[str]] = {}
        for spec in self._with_endpoints:
            for endpoint in spec.endpoints:
                out.setdefault(endpoint, []).append(spec.name)
        return dict(sorted(out.items()))


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(text: str, origin: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{origin}: not valid TOML: {exc}") from None
    services = data.get("services", {})
    if not isinstance(services, dict):
        raise CatalogError(f"{origin}: [services] must be a table")
    return services


def load_catalog(path: Path | None = None) -> Catalog:
    """The built-in catalog, extended and overridden by the operator's file at ``path``."""
    builtin = resources.files("rma.catalog").joinpath("builtin.toml").read_text()
    raw = _read(builtin, "built-in catalog")
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {path}: {exc.strerror}") from None
        for name, entry in _read(text, str(path)).items():
            if not isinstance(entry, dict):
                raise CatalogError(f"{path}: [services.{name}] must be a table")
            raw[name] = _merge(raw.get(name, {}), entry)
    services: dict[str, ServiceSpec] = {}
    for name, entry in raw.items():
        try:
            services[name] = ServiceSpec.model_validate({**entry, "name": name})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CatalogError(f"service {name!r}: {where}: {first['msg']}") from None
    return Catalog(services)
