"""The ``model`` of a request body: a JSON field, or a form field (multipart or urlencoded).

``/v1/audio/transcriptions`` and its kind upload a file as ``multipart/form-data`` with the model
in a form field; only the part headers are read (never the file's bytes), and the body is
forwarded untouched.
"""

from __future__ import annotations

import json
from email.message import Message
from urllib.parse import parse_qs

from rma.coordinator.errors import APIError

#: A form field's value is a model name: longer is not one (and is not read further).
_MAX_VALUE = 1024


def _params(value: str) -> tuple[str, Message]:
    msg = Message()
    msg["content-type"] = value
    return msg.get_content_type(), msg


def _multipart_field(body: bytes, boundary: str, name: str) -> str | None:
    delimiter = b"--" + boundary.encode("latin-1")
    pos = body.find(delimiter)
    while pos != -1:
        start = pos + len(delimiter)
        if body.startswith(b"--", start):
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", start)
        if head_end == -1:
            return None
        nxt = body.find(b"\r\n" + delimiter, head_end)
        head = body[start:head_end].decode("latin-1")
        for line in head.split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() != "content-disposition":
                continue
            _, disposition = _params(value.strip())  # form-data; name="model"
            if disposition.get_param("name") != name:
                break
            if disposition.get_param("filename") is not None:
                break  # a file, not the field
            end = nxt if nxt != -1 else len(body)
            raw = body[head_end + 4 : min(end, head_end + 4 + _MAX_VALUE)]
            try:
                return raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                return None
        pos = nxt + 2 if nxt != -1 else -1
    return None


def body_model(content_type: str | None, body: bytes, *, strict: bool) -> tuple[str | None, object]:
    """The request's ``model`` (``None`` when it names none) and its parsed JSON (or ``None``).

    ``strict``: a body that claims to be JSON (or claims nothing) and is not is a 400
    ``invalid_json``; otherwise it simply names no model.
    """
    ctype, params = _params(content_type or "application/json")
    model: object = None
    data: object = None
    if ctype == "multipart/form-data":
        boundary = params.get_param("boundary")
        if isinstance(boundary, str) and boundary:
            model = _multipart_field(body, boundary, "model")
    elif ctype == "application/x-www-form-urlencoded":
        try:
            values = parse_qs(body.decode("utf-8"), max_num_fields=1000).get("model")
        except (UnicodeDecodeError, ValueError):
            values = None
        model = values[0] if values else None
    else:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # also invalid UTF-8, nesting past the stack
            if strict:
                raise APIError(400, "the request body is not valid JSON", "invalid_json") from None
            return None, None
        model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        return None, data
    return model, data
