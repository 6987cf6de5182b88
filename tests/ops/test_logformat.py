"""fastgate/ops/logformat.py: one JSON object per line, nothing a logged value can break."""

from __future__ import annotations

import io
import logging

import orjson
import pytest

from fastgate.ops.logformat import JsonFormatter, formatter


def _emit(fmt: logging.Formatter, msg: str, *args: object, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.getLogger("fastgate.test.logformat")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        if exc:
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception(msg, *args)
        else:
            logger.warning(msg, *args)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_line_fields_and_injection() -> None:
    out = _emit(JsonFormatter(3), "kid=%s bad", "x\r\n{\"level\":\"info\"}\udcff")
    assert out.count("\n") == 1  # CR/LF in a value cannot start a second line
    record = orjson.loads(out)
    assert record["level"] == "warning" and record["worker"] == 3
    assert record["logger"] == "fastgate.test.logformat"
    assert record["message"].startswith("kid=x\r\n{")  # escaped in JSON, intact when read
    assert "\\udcff" in record["message"]  # a lone surrogate is shown, never a crash


def test_json_exception_is_one_field() -> None:
    record = orjson.loads(_emit(JsonFormatter(None), "failed", exc=True))
    assert record["worker"] is None and "RuntimeError: boom" in record["exception"]


def test_text_and_unknown_formats() -> None:
    assert " worker 2 WARNING fastgate.test.logformat: hi" in _emit(formatter("text", 2), "hi")
    with pytest.raises(ValueError, match="text, json"):
        formatter("xml", None)
