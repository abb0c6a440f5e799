"""The embedded store's row fast paths give what the general ones give."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from mailsvc.storage.base import Event, MessageRecord, Status
from mailsvc.storage.sqlite import _addr_list, _addrs, _record


@pytest.mark.parametrize("alphabet", ["ab.@", 'a"\\\u00e9\n\x01\x7f\u2028 <>,[]'])
def test_address_lists_read_as_json_reads_them(alphabet: str) -> None:
    rng = random.Random(alphabet)
    for _ in range(3000):
        values = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
            for _ in range(rng.randint(0, 3))
        )
        text = _addrs(values)
        assert text == json.dumps(list(values), ensure_ascii=False, separators=(",", ":"))
        assert _addr_list(text) == tuple(json.loads(text)) == values, text


def test_record_from_a_row_equals_the_constructed_one() -> None:
    events = (Event(message_id="m1", time=1.5, status=Status.SENT, detail="d", caller="c"),)
    row = (
        7, "m1", "c", int(Status.QUEUED), '["a@x.y"]', "[]", '["b@x.y","Bob <c@x.y>"]', "subj",
        "tpl", "smtp", "<id@x>", "<hid@x>", 1.0, 2.0, 3.0, 4.0, 2, "err", "REASON", '["s@x.y"]',
    )  # fmt: skip
    expected = MessageRecord(
        id="m1",
        caller="c",
        status=Status.QUEUED,
        to=("a@x.y",),
        cc=(),
        bcc=("b@x.y", "Bob <c@x.y>"),
        subject="subj",
        template_name="tpl",
        transport="smtp",
        message_id="<id@x>",
        create_time=1.0,
        send_time=2.0,
        update_time=3.0,
        next_attempt_time=4.0,
        attempts=2,
        last_error="err",
        last_error_reason="REASON",
        suppressed=("s@x.y",),
        events=events,
    )
    record = _record(row, events)
    assert record == expected
    assert record.status is Status.QUEUED
    assert hash(record) == hash(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.subject = "changed"  # type: ignore[misc]
