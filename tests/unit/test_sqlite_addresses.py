"""The embedded store's address fast paths give what the slow, general ones give."""

from __future__ import annotations

import json
import random
from email.utils import getaddresses

import pytest

from mailsvc.storage.sqlite import _addr_list, _addrs, _index_addresses


def _parsed(values: list[str]) -> set[str]:
    out = set()
    for value in values:
        out.add(value.strip().lower())
        out.update(addr.lower() for _, addr in getaddresses([value]) if addr)
    return out


@pytest.mark.parametrize(
    "alphabet",
    ["ab.@-_+%", "a.@", "abcXYZ019.@-_+[]!#$%&'*/=?^`{|}~@é", 'aB1.@-_ <>",;:()\\'],
)
def test_index_addresses_equals_parsing_every_value(alphabet: str) -> None:
    rng = random.Random(alphabet)
    for _ in range(5000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        assert _index_addresses([value]) == _parsed([value]), value


def test_index_addresses_of_usual_forms() -> None:
    assert _index_addresses(["Rcpt@Example.com"]) == {"rcpt@example.com"}
    assert _index_addresses(["Bob <b@x.y>"]) == {"bob <b@x.y>", "b@x.y"}


@pytest.mark.parametrize("values", [(), ("a@b.c",), ("Bob <b@x.y>", "é@x.y")])
def test_address_lists_round_trip(values: tuple[str, ...]) -> None:
    text = _addrs(values)
    assert json.loads(text) == list(values)
    assert _addr_list(text) == values
