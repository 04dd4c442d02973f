"""The default request check: `{"prompt": "non-empty string", "context": {...}?}`, and
the size of a response as JSON."""

from __future__ import annotations

import json
from typing import Any

from tasks.errors import InvalidPayload

_EXAMPLE = 'send {"prompt": "your question", "context": {}}'


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def json_size(value: Any) -> int:
    """Bytes of `value` as JSON text (UTF-8), counted piece by piece, never built
    whole. Raises TypeError or ValueError when it is not JSON (an object, NaN)."""
    encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=True)
    return sum(len(piece.encode("utf-8", "surrogatepass")) for piece in encoder.iterencode(value))


def validate_default(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise InvalidPayload(f"request_payload must be an object, got {json_type(payload)}: "
                             f"{_EXAMPLE}")
    if "prompt" not in payload:
        raise InvalidPayload(f"request_payload.prompt is missing: {_EXAMPLE}")
    prompt = payload["prompt"]
    if not isinstance(prompt, str):
        raise InvalidPayload(f"request_payload.prompt must be a string, got {json_type(prompt)}")
    if not prompt.strip():
        raise InvalidPayload("request_payload.prompt is empty")
    context = payload.get("context")
    if context is not None and not isinstance(context, dict):
        raise InvalidPayload(
            f"request_payload.context must be an object, got {json_type(context)}")
