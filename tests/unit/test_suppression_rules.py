"""Suppression matching: case-insensitive on the address part, display names kept."""

from __future__ import annotations

import importlib

from mailsvc.addresses import Address, parse_addresses
from mailsvc.errors import FieldViolation
from mailsvc.suppression import (
    SuppressionReason,
    apply_suppressions,
    lookup_keys,
    normalize_address,
)


def _parsed(*values: str) -> tuple[Address, ...]:
    violations: list[FieldViolation] = []
    out = parse_addresses(values, "to", violations)
    assert violations == []
    return out


def test_suppressed_recipients_are_left_out_of_every_list() -> None:
    to = _parsed("Bob Builder <Bob@Example.org>", "carol@example.net")
    cc = _parsed("DAVE@example.org")
    bcc = _parsed("Eve <eve@example.org>", "bob@example.org")
    result = apply_suppressions(to, cc, bcc, {"bob@example.org", "dave@example.org"})

    assert result.to == (Address("", "carol@example.net"),)
    assert result.cc == ()
    assert result.bcc == (Address("Eve", "eve@example.org"),)  # display name kept
    assert result.suppressed == ("bob@example.org", "dave@example.org")  # each once, in order
    assert not result.nothing_left


def test_text_recipients_match_on_the_address_part() -> None:
    result = apply_suppressions(
        ["Bob <BOB@example.org>", "bob@example.org.evil.test", '"bob@example.org" <x@y.test>'],
        [],
        [" Carol@Example.NET "],
        {"bob@example.org", "carol@example.net"},
    )
    # a display name that looks like an address does not match; the address part does
    assert result.to == ("bob@example.org.evil.test", '"bob@example.org" <x@y.test>')
    assert result.bcc == ()
    assert result.suppressed == ("bob@example.org", "carol@example.net")


def test_nothing_left() -> None:
    result = apply_suppressions(
        _parsed("a@example.org"), (), _parsed("A@EXAMPLE.ORG"), {"a@example.org"}
    )
    assert result.nothing_left
    assert result.suppressed == ("a@example.org",)


def test_empty_list_keeps_everything_as_is() -> None:
    to = _parsed("Bob <bob@example.org>")
    result = apply_suppressions(to, (), (), set())
    assert (result.to, result.cc, result.bcc, result.suppressed) == (to, (), (), ())
    assert not result.nothing_left


def test_lookup_keys_are_distinct_and_lower_case() -> None:
    keys = lookup_keys(_parsed("Bob <Bob@Example.org>"), ["bob@example.org", "x@y.test"], [])
    assert keys == ["bob@example.org", "x@y.test"]
    assert normalize_address("Alice <ALICE@example.COM>") == "alice@example.com"


def test_reason_numbers_are_the_protos() -> None:
    # imported by name: the generated stub of this new proto does not pass mypy strict yet
    pb2 = importlib.import_module("mailsvc.v1.suppression_pb2")
    for reason in SuppressionReason:
        assert pb2.SuppressionReason.Value(f"SUPPRESSION_REASON_{reason.name}") == reason
    assert len(pb2.SuppressionReason.keys()) == len(SuppressionReason)
