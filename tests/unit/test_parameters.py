"""Template parameters: JSON values (as google.protobuf.Struct gives them) to the model types."""

from __future__ import annotations

from typing import Any

import pytest

from mailsvc.templates import _WRONG, convert_parameter

CASES = [
    ("string", "Alice", "Alice"),
    ("string", "", ""),
    ("string", 3.0, _WRONG),
    ("string", None, _WRONG),
    # Struct numbers are floats: whole ones become ints for integer and long.
    ("integer", 3.0, 3),
    ("integer", 3, 3),
    ("long", 1e15, 10**15),
    ("integer", 3.5, _WRONG),
    ("integer", True, _WRONG),
    ("integer", "3", _WRONG),
    ("float", 3.0, 3.0),
    ("double", 2, 2.0),
    ("float", False, _WRONG),
    ("float", "1.5", _WRONG),
    ("boolean", True, True),
    ("boolean", False, False),
    ("boolean", 1.0, _WRONG),
    ("boolean", "true", _WRONG),
    ("object", {"n": 2.0, "x": 1.5, "l": [1.0]}, {"n": 2, "x": 1.5, "l": [1]}),
    ("object", [], _WRONG),
    ("array", [1.0, "a", {"k": 4.0}], [1, "a", {"k": 4}]),
    ("array", [], []),
    ("array", {"a": 1}, _WRONG),
    ("unknown-type", "x", _WRONG),
]


@pytest.mark.parametrize(("kind", "value", "expected"), CASES)
def test_convert_parameter(kind: str, value: Any, expected: Any) -> None:
    result = convert_parameter(kind, value)
    if expected is _WRONG:
        assert result is _WRONG
    else:
        assert result == expected
        assert type(result) is type(expected)


def test_integers_render_without_a_fraction() -> None:
    assert str(convert_parameter("integer", 3.0)) == "3"
    assert str(convert_parameter("object", {"n": 3.0})) == "{'n': 3}"
