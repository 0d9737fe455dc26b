"""Structured logs: JSON lines with the call's request id, model, variant, backend, code.

Every record logged while a call is being served carries that call's fields (a context
variable the servicer sets), so `grep <request id>` finds all of a call's lines. The request id
is the caller's `x-request-id` when it sends a usable one, else generated; it goes back in the
trailers. A sampled access log (logger `tensorgate.access`) writes one line per call; admin
changes are also written to the logger `tensorgate.audit`. Payloads and credentials are never
put in a record: the fields are names, codes and durations, and caller strings are quoted
short (gateway.errors.shown).

Whatever a call site passes, a written line is bounded (the formatters, not each call site,
enforce it, so a caller's 8 MiB model name or 3 MB xDS node id cannot become an 8 MiB line): a
string field is cut at MAX_VALUE_CHARS, the message at MAX_MESSAGE_CHARS, a traceback at
MAX_EXCEPTION_CHARS, each cut saying so with the original length, and no line is longer than
MAX_LINE_BYTES bytes of UTF-8 (fields are cut further, and at last only time, level, logger
and the start of the message are kept, with `line_cut`: the size the line would have had).
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import random
import re
import sys
import time
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
    caller: str = ""  # the caller's id (gateway/dataplane/identity.py), never its credential


current: contextvars.ContextVar[CallFields | None] = contextvars.ContextVar("tg_call", default=None)
_sample = 0.0


def request_id(sent: str | None) -> str:
    """The caller's id if it is a short printable token (it is echoed into logs and trailers),
    else a new one."""
    if sent and _USABLE_ID.match(sent):
        return sent
    return os.urandom(16).hex()  # uuid4's randomness in its hex form, at a fifth of its cost


def sampled() -> bool:
    return _sample > 0 and (_sample >= 1 or random.random() < _sample)


def access(fields: CallFields) -> None:
    access_log.info("ModelInfer %s", fields.code)


# The bounds of a written line (docs/observability.md#logs). Every name the gateway accepts
# (model, variant, backend: 256 bytes, gateway.dataplane.layers.validation; a caller id: 256
# chars, gateway.dataplane.identity) fits in MAX_VALUE_CHARS, so only what a call was refused for
# is ever cut.
MAX_LINE_BYTES = 8192
MAX_VALUE_CHARS = 256
MAX_MESSAGE_CHARS = 2048
MAX_EXCEPTION_CHARS = 4096
# Second try when a line is still over MAX_LINE_BYTES (characters that JSON escapes or UTF-8
# writes in several bytes): (message, exception, other strings).
_TIGHT = (512, 1024, 64)
_ITEMS = 32  # of a list or dict in a record's extra fields
_DEPTH = 4


def cut(value: str, limit: int, length: int = 0) -> str:
    """`value` if it has at most `limit` characters, else its start, marked as cut with its
    length (or `length`: what it had before parts of it were cut already)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...(cut: {max(length, len(value))} chars)"


def _bounded(value, limit: int, depth: int = 0):
    """A JSON-ready copy of an extra field with every string cut at `limit`; anything else is
    written as its (cut) str, so an odd value can neither break nor swell the line."""
    if type(value) is str:
        return cut(value, limit)
    if value is None or type(value) in (int, float, bool):
        return value
    if depth < _DEPTH:
        if isinstance(value, dict):
            items = list(value.items())
            out = {cut(str(k), limit): _bounded(v, limit, depth + 1) for k, v in items[:_ITEMS]}
            if len(items) > _ITEMS:
                out["..."] = f"cut: {len(items)} items"
            return out
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
            out = [_bounded(v, limit, depth + 1) for v in items[:_ITEMS]]
            if len(items) > _ITEMS:
                out.append(f"...(cut: {len(items)} items)")
            return out
    return cut(str(value), limit)


def _message(record: logging.LogRecord, limit: int) -> str:
    """record.getMessage(), with string arguments cut before they are formatted in (an 8 MiB
    argument is never copied into the message), then the message cut; never raises."""
    removed = 0
    try:
        msg = str(record.msg)
        args = record.args
        if args:
            if type(args) is tuple:
                shortened = tuple(cut(a, limit) if type(a) is str else a for a in args)
                for arg, short in zip(args, shortened, strict=True):
                    if arg is not short:
                        removed += len(arg) - len(short)
                args = shortened
            msg = msg % args
    except Exception:  # a bad format string must not lose the line (nor print its args)
        msg = f"unformattable log message {cut(str(record.msg), limit)!r}"
    return cut(msg, limit, len(msg) + removed)


def _size(line: str) -> int:
    """Bytes `line` is written as (exact once it may be over MAX_LINE_BYTES)."""
    if len(line) * 4 <= MAX_LINE_BYTES:  # UTF-8 takes at most 4 bytes a character
        return len(line)
    return len(line.encode("utf-8", "backslashreplace"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        limits = (MAX_MESSAGE_CHARS, MAX_EXCEPTION_CHARS, MAX_VALUE_CHARS)
        line = self._line(record, exception, *limits)
        size = _size(line)
        if size <= MAX_LINE_BYTES:
            return line
        line = self._line(record, exception, *_TIGHT)
        if _size(line) <= MAX_LINE_BYTES:
            return line
        return json.dumps(
            {
                **self._head(record),
                "message": _message(record, _TIGHT[2]),
                "line_cut": size,
            },
            ensure_ascii=False,
        )

    def _head(self, record: logging.LogRecord) -> dict:
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": cut(record.name, MAX_VALUE_CHARS),
        }

    def _line(self, record, exception: str | None, message: int, trace: int, value: int) -> str:
        entry = self._head(record)
        entry["message"] = _message(record, message)
        call = current.get()
        if call is not None:
            entry["request_id"] = cut(call.request_id, value)
            entry["model"] = cut(call.model, value)
            for key in ("variant", "backend", "code", "caller"):
                field = getattr(call, key)
                if field:
                    entry[key] = cut(field, value)
            if call.duration_ms is not None:
                entry["duration_ms"] = round(call.duration_ms, 3)
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(_bounded(extra, value))
        if exception is not None:
            entry["exception"] = cut(exception, trace)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """FORMAT_TEXT, with the same bounds: the message and traceback cut, a record (which a
    traceback spreads over several lines) at most MAX_LINE_BYTES."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        bounded = logging.makeLogRecord(record.__dict__)
        bounded.msg, bounded.args = _message(record, MAX_MESSAGE_CHARS), None
        if record.exc_info:
            bounded.exc_info = None
            bounded.exc_text = cut(self.formatException(record.exc_info), MAX_EXCEPTION_CHARS)
        text = super().format(bounded)
        raw = text.encode("utf-8", "backslashreplace")
        if len(raw) <= MAX_LINE_BYTES:
            return text
        marker = f"...(cut: {len(raw)} bytes)"
        return raw[: MAX_LINE_BYTES - len(marker)].decode("utf-8", "ignore") + marker


def setup(config: config_pb2.Logging, level: str = "INFO") -> None:
    """Replace the root logger's handlers: stderr (JSON by default), plus a size-rotated file."""
    global _sample
    _sample = min(max(config.access_log_sample, 0.0), 1.0)
    if config.format == config_pb2.Logging.FORMAT_TEXT:
        formatter: logging.Formatter = TextFormatter()
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
                # as stderr does: a lone surrogate is escaped, not a logging error (whose report
                # would print the record's arguments uncut)
                errors="backslashreplace",
            )
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
