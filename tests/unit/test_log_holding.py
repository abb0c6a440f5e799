"""The holding log handler: access lines batched, order kept, other records written at once."""

from __future__ import annotations

import io
import logging
import time

from mailsvc.logs import ACCESS_LOGGER, TEXT_FORMAT, HoldingHandler, TextFormatter


def _logger(name: str, handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"holding-test.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def _handler(stream: io.StringIO, *, interval: float, max_bytes: int = 32768) -> HoldingHandler:
    handler = HoldingHandler(stream, interval=interval, max_bytes=max_bytes)
    handler.setFormatter(TextFormatter("%(levelname)s %(name)s %(message)s"))
    return handler


def test_access_lines_are_held_then_written_in_order_before_any_other_record() -> None:
    out = io.StringIO()
    handler = _handler(out, interval=60)
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, "rpc 1"))
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, "rpc 2"))
    assert out.getvalue() == ""
    handler.handle(_record("mailsvc.server", logging.INFO, "shutting down"))
    assert out.getvalue().splitlines() == [
        f"INFO {ACCESS_LOGGER} rpc 1",
        f"INFO {ACCESS_LOGGER} rpc 2",
        "INFO mailsvc.server shutting down",
    ]


def test_a_warning_of_the_access_logger_is_written_at_once() -> None:
    out = io.StringIO()
    handler = _handler(out, interval=60)
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, "rpc 1"))
    handler.handle(_record(ACCESS_LOGGER, logging.ERROR, "refusing"))
    assert out.getvalue().splitlines() == [
        f"INFO {ACCESS_LOGGER} rpc 1",
        f"ERROR {ACCESS_LOGGER} refusing",
    ]


def test_held_lines_go_out_when_they_pass_the_size_limit() -> None:
    out = io.StringIO()
    handler = _handler(out, interval=60, max_bytes=100)
    line = "x" * 40
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, line))
    assert out.getvalue() == ""
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, line))
    assert out.getvalue().count(line) == 2


def test_held_lines_go_out_after_the_interval_and_at_flush() -> None:
    out = io.StringIO()
    handler = _handler(out, interval=0.05)
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, "rpc 1"))
    deadline = time.monotonic() + 5
    while "rpc 1" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out.getvalue() == f"INFO {ACCESS_LOGGER} rpc 1\n"
    handler.handle(_record(ACCESS_LOGGER, logging.INFO, "rpc 2"))
    handler.flush()  # what logging.shutdown does at exit
    assert out.getvalue().endswith("rpc 2\n")


def test_a_logger_sees_the_same_lines_as_through_logging() -> None:
    out = io.StringIO()
    handler = _handler(out, interval=60)
    _logger("plain", handler).info("caller=%s", "evil\nline")
    assert out.getvalue() == "INFO holding-test.plain caller=evil\\nline\n"


def test_the_time_is_written_as_logging_writes_it() -> None:
    # The date and time text is made once per second; each record still gets its own.
    ours = TextFormatter(TEXT_FORMAT)
    stdlib = logging.Formatter(TEXT_FORMAT)
    for created in (1_750_000_000.001, 1_750_000_000.999, 1_750_000_001.0, 1_700_000_000.5):
        record = _record("t", logging.INFO, "m")
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == stdlib.format(record)
