"""Logging setup: plain text or one JSON object per line."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "mailsvc.access"
FLUSH_BYTES = 32 * 1024
FLUSH_SECONDS = 0.2
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class _TimeOnce(logging.Formatter):
    """formatTime as logging's, with the date and time text made once per second."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:  # under the handler's lock: one thread at a time
            self._text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        msec_format = self.default_msec_format
        return msec_format % (self._text, record.msecs) if msec_format else self._text


class TextFormatter(_TimeOnce):
    """One record, one line: control characters in any logged value (a caller's name, say)
    are escaped, so no value can start a forged line. Tracebacks stay multi-line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line if line.isprintable() else _CONTROL.sub(_escape, line)


class HoldingHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that holds access lines and writes them in batches: a write (a system
    call) per RPC cost about a tenth of SendMail's server CPU. Held lines go out when they pass
    `max_bytes`, `interval` seconds after the first was held, with any other record (so the
    order is kept and warnings and errors appear at once) and at exit (logging.shutdown)."""

    def __init__(
        self, stream: TextIO, *, max_bytes: int = FLUSH_BYTES, interval: float = FLUSH_SECONDS
    ) -> None:
        super().__init__(stream)
        self._max_bytes = max_bytes
        self._interval = interval
        self._held: list[str] = []
        self._size = 0
        self._pending = threading.Event()
        self._timer: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle).
        try:
            line = self.format(record) + self.terminator
            self._held.append(line)
            self._size += len(line)
            if (
                record.name != ACCESS_LOGGER
                or record.levelno >= logging.WARNING
                or self._size >= self._max_bytes
            ):
                self._write()
            elif not self._pending.is_set():
                if self._timer is None:
                    self._timer = threading.Thread(target=self._run, name="log-flush", daemon=True)
                    self._timer.start()
                self._pending.set()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        if self._held:
            text = "".join(self._held)
            self._held.clear()
            self._size = 0
            self.stream.write(text)
        self.stream.flush()

    def _run(self) -> None:
        while True:
            self._pending.wait()
            time.sleep(self._interval)
            with self.lock:  # type: ignore[union-attr]
                self._pending.clear()
                try:
                    self._write()
                except Exception:  # stderr gone: nothing to tell it to
                    self._held.clear()
                    self._size = 0


class _JsonFormatter(_TimeOnce, JsonFormatter):
    pass


def configure(log_format: str, level: int = logging.INFO) -> None:
    # Neither format shows them, and finding them out costs a system call per record.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    # Nor where the call was made: no walk up the stack per record (the logging HOWTO's
    # "Optimization" names this switch).
    logging._srcfile = None
    handler = HoldingHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            _JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
