"""Logging setup for ``ehlo serve``: one line per record on stderr, text or JSON.

This module owns the log line formats. Code that logs uses the standard
:mod:`logging` API (``logging.getLogger("ehlo.session")``) and passes
structured fields with ``extra={"event": ..., "client_ip": ...}``:

* ``text``: ``2026-11-28T13:41:17.753Z INFO message 06H2... accepted ...``
  (UTC timestamp with milliseconds, level, the formatted message). In
  session records (``ehlo.session``, where client text lands) every text
  argument of the message is written logfmt-style: as it is when it is
  one plain token, else in double quotes with backslash escapes (for a
  backslash, a quote, CR, LF, tab and, as ``u`` and four hex digits, any
  other non-printing character), so that text a client chose (a greeting name, an
  address) can neither add ``key=value`` fields nor break the line;
* ``json``: one object per line with ``ts``, ``level``, ``logger``, ``msg``
  and every ``extra`` field; values JSON cannot encode are written with
  ``str()``, so a record never fails to log.

Formatting is on the hot path of a busy server, so both formatters avoid
``logging.Formatter``'s general machinery and cache the timestamp's
seconds part.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any, Literal, TextIO

__all__ = ["JSONFormatter", "TextFormatter", "configure_logging", "logfmt_value"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Clock:
    """UTC ISO 8601 timestamps with milliseconds, the seconds part cached."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        millis = int((created - second) * 1000)
        return f"{self._prefix}.{millis:03d}Z"


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, never raising on a bad format string."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg!s} {record.args!r}"


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    known = _ESCAPES.get(ch)
    if known is not None:
        return known
    if ch == " " or ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def logfmt_value(text: str) -> str:
    """``text`` as one logfmt value: unchanged when plain, else quoted and escaped.

    Plain: printable ASCII without space, quote, "=" or backslash (str
    methods, not a regular expression: this runs for every logged text).
    """
    if (
        text
        and text.isascii()
        and text.isprintable()
        and not (" " in text or '"' in text or "=" in text or "\\" in text)
    ):
        return text
    return '"' + "".join(map(_escape, text)) + '"'


# Loggers whose messages carry text a client chose (greeting names, addresses,
# user names): their text arguments are quoted. Other loggers write the
# operator's own text (addresses listened on, paths), left as it is.
_CLIENT_TEXT = "ehlo.session"


def _quoted_message(record: logging.LogRecord) -> str:
    """The message with each text argument as a logfmt value (see module docstring)."""
    args = record.args
    if not args or not isinstance(args, tuple) or not (record.name or "").startswith(_CLIENT_TEXT):
        return _message(record)
    try:
        return str(record.msg) % tuple([logfmt_value(a) if isinstance(a, str) else a for a in args])
    except Exception:
        return _message(record)


def _exception_text(record: logging.LogRecord) -> str | None:
    if record.exc_info and record.exc_info[0] is not None:
        return "".join(traceback.format_exception(*record.exc_info)).rstrip()
    if record.exc_text:
        return record.exc_text
    return None


def _plain(value: Any) -> Any:
    """``value`` if JSON can encode it alone, else its ``str()``."""
    try:
        json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)
    return value


class TextFormatter(logging.Formatter):
    """``TIMESTAMP LEVEL message`` (extra fields are not repeated: the message has them)."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self._clock.stamp(record.created)} {record.levelname} {_quoted_message(record)}"
        error = _exception_text(record)
        if error is not None:
            line = f"{line}\n{error}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, extra fields."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._clock.stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in out:
                out[key] = value
        error = _exception_text(record)
        if error is not None:
            out["exc"] = error
        try:
            return json.dumps(out, default=str)
        except (TypeError, ValueError):  # odd keys, circular references
            return json.dumps({str(k): _plain(v) for k, v in out.items()}, default=str)


class _Handler(logging.StreamHandler[TextIO]):
    """A stream handler that drops a line it cannot write (closed stderr)
    instead of printing a "--- Logging error ---" traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


_handler: logging.Handler | None = None


def configure_logging(
    fmt: Literal["text", "json"] | str = "text",
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record at ``level`` or above to stderr in ``fmt``.

    Installs one handler on the root logger (replacing the one a previous call
    installed) so asyncio's and other libraries' records share the format.
    Raises ``ValueError`` for an unknown format or level.
    """
    global _handler
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (expected text or json)")
    name = level.upper()
    if name not in _LEVELS:
        raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(_LEVELS)})")
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(name)
    _handler = handler
    return handler
