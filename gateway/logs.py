"""Structured logs: JSON lines with the call's request id, model, variant, backend, code.

Every record logged while a call is being served carries that call's fields (a context
variable the servicer sets), so `grep <request id>` finds all of a call's lines. The request id
is the caller's `x-request-id` when it sends a usable one, else generated; it goes back in the
trailers. A sampled access log (logger `tensorgate.access`) writes one line per call; admin
changes are also written to the logger `tensorgate.audit`. Payloads and credentials are never
put in a record: the fields are names, codes and durations, and caller strings are quoted
short (gateway.errors.shown).
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass

from tensorgate.config.v1 import config_pb2

REQUEST_ID = "x-request-id"
_USABLE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
DEFAULT_FILE_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_FILE_BACKUPS = 5

access_log = logging.getLogger("tensorgate.access")
audit_log = logging.getLogger("tensorgate.audit")


@dataclass(slots=True)
class CallFields:
    request_id: str
    model: str
    variant: str = ""
    backend: str = ""
    code: str = ""
    duration_ms: float | None = None


current: contextvars.ContextVar[CallFields | None] = contextvars.ContextVar("tg_call", default=None)
_sample = 0.0


def request_id(sent: str | None) -> str:
    """The caller's id if it is a short printable token (it is echoed into logs and trailers),
    else a new one."""
    if sent and _USABLE_ID.match(sent):
        return sent
    return uuid.uuid4().hex


def sampled() -> bool:
    return _sample > 0 and (_sample >= 1 or random.random() < _sample)


def access(fields: CallFields) -> None:
    access_log.info("ModelInfer %s", fields.code)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        call = current.get()
        if call is not None:
            entry["request_id"] = call.request_id
            entry["model"] = call.model
            for key in ("variant", "backend", "code"):
                value = getattr(call, key)
                if value:
                    entry[key] = value
            if call.duration_ms is not None:
                entry["duration_ms"] = round(call.duration_ms, 3)
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(config: config_pb2.Logging, level: str = "INFO") -> None:
    """Replace the root logger's handlers: stderr (JSON by default), plus a size-rotated file."""
    global _sample
    _sample = min(max(config.access_log_sample, 0.0), 1.0)
    if config.format == config_pb2.Logging.FORMAT_TEXT:
        formatter: logging.Formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    else:
        formatter = JsonFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.file:
        handlers.append(
            logging.handlers.RotatingFileHandler(
                config.file,
                maxBytes=config.file_max_bytes or DEFAULT_FILE_MAX_BYTES,
                backupCount=config.file_backups or DEFAULT_FILE_BACKUPS,
                encoding="utf-8",
            )
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
