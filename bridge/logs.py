"""Logging for the entry points (CLI, Celery worker); nothing else configures it.

Text mode prints the integration guide's friendly lines followed by the structured fields
(`action`, `task_id`, `attempt`, ...) as key=value; JSON mode prints one object
per line. Pass fields with `extra={...}`. Keys and payload contents are never
logged at INFO. A text line is one line: control characters in its message and fields
(a newline in a user's prompt or in an exception's text) are escaped, so nothing a user
writes can forge a log line; a traceback keeps its lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from `extra=` and is a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message", "taskName",
    "data"}  # Celery's own structured copy of its message


# C0 and C1 control characters (newline, carriage return, escape, ...) and the Unicode
# line and paragraph separators, which some viewers also break lines at.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(value: object) -> str:
    """`str(value)` with its control characters as escapes (`\\n`, `\\x1b`, `\\u2028`):
    one printable line, whatever a user put in it."""
    return _CONTROLS.sub(lambda m: _NAMED.get(m[0]) or (
        f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}"), str(value))


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = escape_controls(record.getMessage())
        fields = fields_of(record)
        if fields:
            text += "  [" + " ".join(f"{k}={escape_controls(v)}" for k, v in fields.items()) + "]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' chatter stays at WARNING unless asked for.
    for noisy in ("httpx", "httpcore", "psycopg.pool", "kombu"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Celery's own line per job ("Task ... received", "... succeeded in ...") repeats
    # the worker's friendly lines and costs throughput: shown at DEBUG only. Errors and
    # warnings still come through.
    for per_job in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(per_job).setLevel(
            logging.DEBUG if root.level <= logging.DEBUG else max(logging.WARNING, root.level))
