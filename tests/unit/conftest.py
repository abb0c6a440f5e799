"""Fast unit tests: pure logic, no server process, no sockets; `pytest tests/unit` takes seconds.

Everything collected below this directory carries the `unit` marker, so `pytest -m unit` picks
these tests and `pytest -m "not unit"` the end-to-end ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
