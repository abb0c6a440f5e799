"""Behaviour every Storage must have, written against the interface only.

tests/test_storage.py imports these and provides the `storage` fixture (an opened store,
parametrized by implementation); a new implementation adds its parameter there.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from mailsvc.storage.base import (
    Event,
    Finish,
    ListQuery,
    NewMessage,
    Status,
    Storage,
    Suppression,
)

pytestmark = pytest.mark.anyio

T0 = 1_750_000_000.0


def new(
    id: str,
    *,
    caller: str = "alice",
    status: Status = Status.QUEUED,
    t: float = T0,
    send_time: float | None = None,
    to: tuple[str, ...] = ("bob@example.org",),
    cc: tuple[str, ...] = (),
    bcc: tuple[str, ...] = (),
    payload: bytes | None = b"payload",
    header: str = "",
    message_id: str = "",
) -> NewMessage:
    pending = status in (Status.QUEUED, Status.SCHEDULED)
    return NewMessage(
        id=id,
        caller=caller,
        status=status,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=f"subject {id}",
        create_time=t,
        send_time=send_time if send_time is not None else t,
        payload=payload if pending else None,
        header_message_id=header or f"<{id}@example.org>",
        message_id=message_id,
        transport="" if pending else "smtp",
        detail="accepted",
    )


async def test_insert_then_get_returns_the_record_with_its_first_event(storage: Storage) -> None:
    await storage.insert(
        [new("m1", to=("Bob <Bob@Example.org>",), cc=("c@example.org",), bcc=("d@example.org",))]
    )
    record = await storage.get("m1")
    assert record is not None
    assert record.id == "m1" and record.caller == "alice"
    assert record.status is Status.QUEUED
    assert record.to == ("Bob <Bob@Example.org>",)
    assert record.cc == ("c@example.org",) and record.bcc == ("d@example.org",)
    assert record.subject == "subject m1"
    assert record.create_time == T0 and record.send_time == T0 and record.update_time == T0
    assert record.attempts == 0
    assert [(e.status, e.detail) for e in record.events] == [(Status.QUEUED, "accepted")]
    assert await storage.get("missing") is None


async def test_insert_is_all_or_nothing(storage: Storage) -> None:
    await storage.insert([new("dup")])
    with pytest.raises(Exception):  # noqa: B017 - any error: the interface names none for this
        await storage.insert([new("fresh"), new("dup")])
    assert await storage.get("fresh") is None


async def test_a_failing_insert_does_not_take_concurrent_ones_down(storage: Storage) -> None:
    await storage.insert([new("dup")])
    results = await asyncio.gather(
        storage.insert([new("keyed")], idempotency=("alice", "k", "fp", b"resp")),
        *(storage.insert([new(f"ok{i}")]) for i in range(20)),
        storage.insert([new("dup")]),
        return_exceptions=True,
    )
    assert isinstance(results[-1], Exception)
    assert results[:-1] == [None] * 21
    for id in ["keyed", *(f"ok{i}" for i in range(20))]:
        assert await storage.get(id) is not None


async def test_concurrent_inserts_keep_each_message_whole(storage: Storage) -> None:
    # Inserts made together may share statements (the embedded store writes a batch's
    # rows with a few multi-row INSERTs): each message keeps its own recipients, payload
    # and event, whatever the sizes, with history and a keyed insert in between.
    watch = storage.events()
    sizes = [1, 3, 70, 2, 1, 130, 5]
    groups = [
        [
            new(f"g{g}m{i:03d}", to=(f"r{g}-{i}@example.org",), payload=f"p{g}-{i}".encode())
            for i in range(n)
        ]
        for g, n in enumerate(sizes)
    ]
    history = [new(f"h{i}", status=Status.SENT, to=(f"h{i}@example.org",)) for i in range(4)]
    await asyncio.gather(
        *(storage.insert(group) for group in groups[:3]),
        storage.insert_history(history),
        storage.insert([new("keyed")], idempotency=("alice", "k", "fp", b"resp")),
        *(storage.insert(group) for group in groups[3:]),
    )
    queued = [m for group in groups for m in group]
    for m in [*queued, *history]:
        listed = await storage.list_messages(ListQuery(page_size=5, recipient=m.to[0]))
        assert [r.id for r in listed] == [m.id]
    claimed = await storage.claim(now=T0 + 100, limit=1000, lease=60, owner="w")
    assert {c.id: c.payload for c in claimed} == {m.id: m.payload for m in queued} | {
        "keyed": b"payload"
    }
    got = [await asyncio.wait_for(anext(watch), 5) for _ in range(len(queued) + 5)]
    assert sorted((e.message_id, e.status, e.caller) for e in got) == sorted(
        [(m.id, Status.QUEUED, "alice") for m in [*queued, new("keyed")]]
        + [(m.id, Status.SENT, "alice") for m in history]
    )
    # Each insert's own events come in its order.
    for group in groups:
        mine = [e.message_id for e in got if e.message_id in {m.id for m in group}]
        assert mine == [m.id for m in group]
    await watch.aclose()  # type: ignore[attr-defined]


async def test_history_is_seen_by_every_later_read_and_watch(storage: Storage) -> None:
    watch = storage.events()
    await storage.insert_history([new(f"h{i}", status=Status.SENT) for i in range(3)])
    record = await storage.get("h2")  # no wait in between: ordered after the records
    assert record is not None and record.status is Status.SENT
    listed = await storage.list_messages(ListQuery(page_size=10))
    assert [r.id for r in listed] == ["h2", "h1", "h0"]
    got = [await asyncio.wait_for(anext(watch), 5) for _ in range(3)]
    assert [(e.message_id, e.status) for e in got] == [
        ("h0", Status.SENT),
        ("h1", Status.SENT),
        ("h2", Status.SENT),
    ]
    await watch.aclose()  # type: ignore[attr-defined]


async def test_history_takes_only_mails_already_handed_over(storage: Storage) -> None:
    with pytest.raises(ValueError):
        await storage.insert_history([new("q")])
    assert await storage.get("q") is None


async def test_list_pages_cover_every_record_once_newest_first(storage: Storage) -> None:
    rng = random.Random(7)
    # Several records share a create_time: the id breaks the tie.
    messages = [new(f"m{i:04d}", t=T0 + rng.randrange(60)) for i in range(300)]
    await asyncio.gather(*(storage.insert(messages[i : i + 25]) for i in range(0, 300, 25)))
    seen: list[tuple[float, str]] = []
    after = None
    while True:
        page = await storage.list_messages(ListQuery(page_size=37, after=after))
        seen += [(r.create_time, r.id) for r in page]
        if len(page) < 37:
            break
        after = (page[-1].create_time, page[-1].id)
    assert seen == sorted(((m.create_time, m.id) for m in messages), reverse=True)


async def test_list_filters_by_status_caller_and_recipient(storage: Storage) -> None:
    await storage.insert(
        [
            new("a1", caller="alice", to=("Bob <BOB@example.org>",), t=T0 + 1),
            new(
                "a2", caller="alice", to=("carol@example.org",), bcc=("bob@example.org",), t=T0 + 2
            ),
            new("b1", caller="bert", to=("carol@example.org",), t=T0 + 3),
            new("b2", caller="bert", status=Status.SENT, cc=("bob@example.org",), t=T0 + 4),
        ]
    )

    async def ids(**kw: object) -> list[str]:
        return [r.id for r in await storage.list_messages(ListQuery(page_size=10, **kw))]  # type: ignore[arg-type]

    assert await ids() == ["b2", "b1", "a2", "a1"]
    assert await ids(caller="alice") == ["a2", "a1"]
    assert await ids(status=Status.SENT) == ["b2"]
    assert await ids(recipient="bob@example.org") == ["b2", "a2", "a1"]
    assert await ids(recipient="bob@example.org", caller="bert") == ["b2"]
    assert await ids(recipient="bob@example.org", status=Status.QUEUED) == ["a2", "a1"]
    assert await ids(recipient="nobody@example.org") == []
    assert await ids(recipient="bob@example.org", after=(T0 + 2, "a2")) == ["a1"]


async def test_claim_takes_due_messages_oldest_first_and_leases_them(storage: Storage) -> None:
    await storage.insert(
        [
            new("later", t=T0, send_time=T0 + 50, status=Status.SCHEDULED),
            new("second", t=T0 + 2),
            new("first", t=T0 + 1),
        ]
    )
    assert await storage.next_due() == T0 + 1
    claimed = await storage.claim(now=T0 + 10, limit=10, lease=60, owner="w1")
    assert [c.id for c in claimed] == ["first", "second"]
    assert claimed[0].payload == b"payload"
    assert claimed[0].attempts == 1 and claimed[0].lease_until == T0 + 70
    assert claimed[0].header_message_id == "<first@example.org>"
    record = await storage.get("first")
    assert record is not None and record.status is Status.SENDING and record.attempts == 1
    # Leased: nobody else gets them before the lease ends, the scheduled one is not due.
    assert await storage.claim(now=T0 + 49, limit=10, lease=60, owner="w2") == []
    later = await storage.claim(now=T0 + 69, limit=10, lease=60, owner="w2")
    assert [c.id for c in later] == ["later"]


async def test_concurrent_claims_never_share_a_message(storage: Storage) -> None:
    await storage.insert([new(f"m{i:03d}", t=T0 + i) for i in range(200)])
    batches = await asyncio.gather(
        *(storage.claim(now=T0 + 1000, limit=7, lease=60, owner=f"w{i}") for i in range(40))
    )
    ids = [c.id for batch in batches for c in batch]
    assert len(ids) == len(set(ids)) == 200


async def test_an_expired_lease_is_claimed_again_and_the_old_owner_cannot_finish(
    storage: Storage,
) -> None:
    await storage.insert([new("m")])
    await storage.claim(now=T0, limit=1, lease=30, owner="dead")
    assert await storage.next_due() == T0 + 30
    [again] = await storage.claim(now=T0 + 31, limit=1, lease=30, owner="alive")
    assert again.id == "m" and again.attempts == 2
    lost = await storage.finish("m", Finish(status=Status.SENT), owner="dead", now=T0 + 32)
    assert lost is None
    ok = await storage.finish(
        "m",
        Finish(status=Status.SENT, transport="smtp", message_id="<x@y>"),
        owner="alive",
        now=T0 + 33,
    )
    assert ok is not None and ok.status is Status.SENT


async def test_finish_sent_records_the_handover_and_drops_the_payload(storage: Storage) -> None:
    await storage.insert([new("m")])
    await storage.claim(now=T0, limit=1, lease=60, owner="w")
    event = await storage.finish(
        "m",
        Finish(status=Status.SENT, transport="smtp", message_id="<id@x>", detail="handed over"),
        owner="w",
        now=T0 + 5,
    )
    assert event == Event(
        message_id="m", time=T0 + 5, status=Status.SENT, detail="handed over", caller="alice"
    )
    record = await storage.get("m")
    assert record is not None
    assert (record.status, record.transport, record.message_id) == (Status.SENT, "smtp", "<id@x>")
    assert record.update_time == T0 + 5 and record.next_attempt_time is None
    assert [e.status for e in record.events] == [Status.QUEUED, Status.SENDING, Status.SENT]
    # Nothing left to send: never claimed again, whatever the time.
    assert await storage.claim(now=T0 + 10**6, limit=10, lease=60, owner="w") == []
    assert await storage.next_due() is None


async def test_finish_rescheduled_waits_for_its_next_attempt(storage: Storage) -> None:
    await storage.insert([new("m")])
    await storage.claim(now=T0, limit=1, lease=60, owner="w")
    await storage.finish(
        "m",
        Finish(
            status=Status.QUEUED,
            error="the SMTP server answered 451",
            reason="SMTP_UNAVAILABLE",
            detail="smtp: 451; next attempt at ...",
            next_attempt_time=T0 + 30,
        ),
        owner="w",
        now=T0 + 1,
    )
    record = await storage.get("m")
    assert record is not None and record.status is Status.QUEUED
    assert record.next_attempt_time == T0 + 30 and record.last_error_reason == "SMTP_UNAVAILABLE"
    assert record.last_error == "the SMTP server answered 451"
    assert await storage.claim(now=T0 + 29, limit=1, lease=60, owner="w") == []
    [again] = await storage.claim(now=T0 + 30, limit=1, lease=60, owner="w")
    assert again.attempts == 2 and again.payload == b"payload"


async def test_finish_failed_is_final(storage: Storage) -> None:
    await storage.insert([new("m")])
    await storage.claim(now=T0, limit=1, lease=60, owner="w")
    await storage.finish(
        "m",
        Finish(status=Status.FAILED, error="rejected", reason="SMTP_REJECTED", detail="550"),
        owner="w",
        now=T0 + 1,
    )
    record = await storage.get("m")
    assert record is not None and record.status is Status.FAILED
    assert record.last_error_reason == "SMTP_REJECTED"
    assert await storage.claim(now=T0 + 10**6, limit=1, lease=60, owner="w") == []


async def test_cancel_only_what_is_waiting(storage: Storage) -> None:
    await storage.insert(
        [
            new("queued"),
            new("scheduled", status=Status.SCHEDULED, send_time=T0 + 3600),
            new("sending", t=T0 - 1),
            new("sent", status=Status.SENT),
        ]
    )
    [claimed] = await storage.claim(now=T0 - 1, limit=1, lease=60, owner="w")
    assert claimed.id == "sending"
    for id in ("queued", "scheduled"):
        record, event = await storage.cancel(id, now=T0 + 1)
        assert record is not None and record.status is Status.CANCELLED
        assert event is not None and event.status is Status.CANCELLED
        assert record.events[-1].status is Status.CANCELLED
    for id, status in (
        ("sending", Status.SENDING),
        ("sent", Status.SENT),
        ("queued", Status.CANCELLED),
    ):
        record, event = await storage.cancel(id, now=T0 + 2)
        assert record is not None and record.status is status and event is None
    assert await storage.cancel("missing", now=T0) == (None, None)
    due = await storage.claim(now=T0 + 10**6, limit=10, lease=60, owner="w2")
    assert all(c.id == "sending" for c in due)  # the cancelled ones are never sent


async def test_events_are_fanned_out_in_order(storage: Storage) -> None:
    first = storage.events()
    second = storage.events()
    await storage.insert([new("m")])
    await storage.claim(now=T0, limit=1, lease=60, owner="w")
    await storage.finish("m", Finish(status=Status.SENT, detail="ok"), owner="w", now=T0 + 1)
    for sub in (first, second):
        got = [await asyncio.wait_for(anext(sub), 5) for _ in range(3)]
        assert [(e.message_id, e.status) for e in got] == [
            ("m", Status.QUEUED),
            ("m", Status.SENDING),
            ("m", Status.SENT),
        ]
        assert got[0].caller == "alice"
        assert [type(e.time) for e in got] == [float] * 3 and got[0].time == T0
    await first.aclose()  # type: ignore[attr-defined]
    await second.aclose()  # type: ignore[attr-defined]


async def test_an_event_too_large_to_announce_reaches_watchers_whole(storage: Storage) -> None:
    # PostgreSQL's NOTIFY takes 8000 bytes: such an event is announced by its seq, read back.
    watch = storage.events()
    await storage.insert([new("m")])
    await storage.claim(now=T0, limit=1, lease=60, owner="w")
    detail = "é" * 6000  # 12,000 bytes of UTF-8
    error = Finish(status=Status.FAILED, error="refused", reason="X", detail=detail)
    await storage.finish("m", error, owner="w", now=T0 + 1)
    got = [await asyncio.wait_for(anext(watch), 5) for _ in range(3)]
    assert [(e.message_id, e.status) for e in got] == [
        ("m", Status.QUEUED),
        ("m", Status.SENDING),
        ("m", Status.FAILED),
    ]
    assert got[2].detail == detail and got[2].caller == "alice"
    await watch.aclose()  # type: ignore[attr-defined]


async def test_add_event_matches_the_transport_id_or_the_message_id_header(
    storage: Storage,
) -> None:
    await storage.insert(
        [
            new("m1", status=Status.SENT, message_id="<20250101.abc@mg.example.org>"),
            new("m2", status=Status.SENT, header="<h2@example.org>"),
        ]
    )
    event = await storage.add_event(
        "20250101.abc@mg.example.org", Status.DELIVERED, "delivered", now=T0 + 5
    )
    assert event is not None and event.message_id == "m1" and event.status is Status.DELIVERED
    event = await storage.add_event("<h2@example.org>", None, "temporary failure", now=T0 + 6)
    assert event is not None and event.message_id == "m2" and event.status is Status.SENT
    assert await storage.add_event("unknown@x", Status.BOUNCED, "", now=T0) is None
    record = await storage.get("m1")
    assert record is not None and record.status is Status.DELIVERED
    assert record.events[-1].detail == "delivered"


async def test_queue_stats_and_oldest_due(storage: Storage) -> None:
    await storage.insert(
        [
            new("q1", t=T0),
            new("q2", t=T0 + 5),
            new("s1", status=Status.SCHEDULED, send_time=T0 + 100),
            new("done", status=Status.SENT),
        ]
    )
    stats = await storage.queue_stats(now=T0 + 10)
    assert stats.get(Status.QUEUED) == 2 and stats.get(Status.SCHEDULED) == 1
    assert stats.get(Status.SENT) == 1
    assert await storage.oldest_due(now=T0 + 10) == T0
    assert await storage.oldest_due(now=T0 - 10) is None


async def test_purge_forgets_old_final_records_only(storage: Storage) -> None:
    await storage.insert(
        [
            new("old-sent", status=Status.SENT, t=T0),
            new("old-queued", t=T0, send_time=T0 + 10**6, status=Status.SCHEDULED),
            new("new-sent", status=Status.SENT, t=T0 + 1000),
        ]
    )
    assert await storage.purge(before=T0 + 500, now=T0 + 1000) == 1
    assert await storage.get("old-sent") is None
    assert await storage.get("old-queued") is not None
    assert await storage.get("new-sent") is not None
    assert [
        r.id
        for r in await storage.list_messages(ListQuery(page_size=10, recipient="bob@example.org"))
    ] == [
        "new-sent",
        "old-queued",
    ]


async def test_idempotency_reserve_complete_release(storage: Storage) -> None:
    reserve = storage.idempotency_reserve
    assert await reserve("alice", "k", "fp1", now=T0, lease_until=T0 + 100) is None
    entry = await reserve("alice", "k", "fp1", now=T0 + 1, lease_until=T0 + 101)
    assert entry is not None and entry.fingerprint == "fp1" and entry.response is None
    # Another caller's key of the same name is another key.
    assert await reserve("bert", "k", "fp9", now=T0, lease_until=T0 + 100) is None
    await storage.idempotency_complete("alice", "k", b"response", now=T0 + 1)
    entry = await reserve("alice", "k", "fp2", now=T0 + 2, lease_until=T0 + 102)
    assert entry is not None and entry.fingerprint == "fp1" and entry.response == b"response"
    # Released: the next request runs itself.
    await storage.idempotency_release("bert", "k", lease_until=T0 + 100)
    assert await reserve("bert", "k", "fp3", now=T0 + 3, lease_until=T0 + 103) is None
    # A stored response is kept 24 hours from its completion, past the reservation's lease...
    entry = await reserve("alice", "k", "fp4", now=T0 + 86000, lease_until=T0 + 86100)
    assert entry is not None and entry.response == b"response"
    # ...and then the key is free again.
    assert await reserve("alice", "k", "fp4", now=T0 + 86401, lease_until=T0 + 86501) is None


async def test_concurrent_reservations_let_exactly_one_through(storage: Storage) -> None:
    results = await asyncio.gather(
        *(
            storage.idempotency_reserve("c", "key", "fp", now=T0, lease_until=T0 + 100)
            for _ in range(20)
        )
    )
    assert sum(r is None for r in results) == 1


async def test_insert_with_idempotency_stores_the_response(storage: Storage) -> None:
    reserve = storage.idempotency_reserve
    assert await reserve("alice", "k", "fp", now=T0, lease_until=T0 + 100) is None
    await storage.insert([new("m")], idempotency=("alice", "k", "fp", b"resp"))
    # Kept past the reservation's lease, for 24 hours.
    entry = await reserve("alice", "k", "fp", now=T0 + 3600, lease_until=T0 + 3700)
    assert entry is not None and entry.response == b"resp"
    # Without a reservation first, too.
    await storage.insert([new("m2")], idempotency=("alice", "k2", "fp", b"resp2"))
    entry = await reserve("alice", "k2", "fp", now=T0 + 1, lease_until=T0 + 101)
    assert entry is not None and entry.response == b"resp2"


async def test_idempotency_keys_expire_in_purge(storage: Storage) -> None:
    assert await storage.idempotency_reserve("a", "k", "fp", now=T0, lease_until=T0 + 10) is None
    await storage.idempotency_complete("a", "k", b"r", now=T0)
    await storage.purge(before=T0, now=T0 + 86401)
    assert (
        await storage.idempotency_reserve("a", "k", "fp", now=T0 + 5, lease_until=T0 + 15) is None
    )


async def test_an_idempotency_reservation_past_its_lease_is_taken_over_by_one(
    storage: Storage,
) -> None:
    assert await storage.idempotency_reserve("a", "k", "fp", now=T0, lease_until=T0 + 10) is None
    # Live: every repeat waits.
    live = await asyncio.gather(
        *(
            storage.idempotency_reserve("a", "k", "fp", now=T0 + 9, lease_until=T0 + 19)
            for _ in range(10)
        )
    )
    assert all(e is not None and e.response is None for e in live)
    # Over: of concurrent repeats exactly one takes the key, the others wait for it.
    taken = await asyncio.gather(
        *(
            storage.idempotency_reserve("a", "k", "fp", now=T0 + 10, lease_until=T0 + 20 + i)
            for i in range(10)
        )
    )
    assert sum(e is None for e in taken) == 1
    assert all(e is None or e.response is None for e in taken)
    # The first holder's late release leaves the taker's reservation alone.
    await storage.idempotency_release("a", "k", lease_until=T0 + 10)
    winner = T0 + 20 + [e is None for e in taken].index(True)
    entry = await storage.idempotency_reserve("a", "k", "fp", now=T0 + 11, lease_until=T0 + 21)
    assert entry is not None and entry.response is None
    # The taker's own release frees it.
    await storage.idempotency_release("a", "k", lease_until=winner)
    assert (
        await storage.idempotency_reserve("a", "k", "fp", now=T0 + 11, lease_until=T0 + 21) is None
    )


async def test_a_renewed_idempotency_reservation_is_not_taken_over(storage: Storage) -> None:
    reserve = storage.idempotency_reserve
    assert await reserve("a", "k", "fp", now=T0, lease_until=T0 + 10) is None
    assert await storage.idempotency_renew("a", "k", lease_until=T0 + 10, new_until=T0 + 15)
    entry = await reserve("a", "k", "fp", now=T0 + 12, lease_until=T0 + 22)
    assert entry is not None and entry.response is None
    # Once past the renewed lease, a repeat takes it; the old holder's renewal then fails.
    assert await reserve("a", "k", "fp", now=T0 + 15, lease_until=T0 + 25) is None
    renew = storage.idempotency_renew
    assert not await renew("a", "k", lease_until=T0 + 15, new_until=T0 + 30)
    # A completed key has no lease left to renew.
    await storage.idempotency_complete("a", "k", b"r", now=T0 + 16)
    assert not await renew("a", "k", lease_until=T0 + 25, new_until=T0 + 30)
    entry = await reserve("a", "k", "fp", now=T0 + 40, lease_until=T0 + 50)
    assert entry is not None and entry.response == b"r"


async def test_suppressions_are_case_insensitive_and_paged(storage: Storage) -> None:
    added = await storage.add_suppression(
        Suppression(address="Bob@Example.org", reason=1, create_time=T0, detail="bounced")
    )
    assert added.address == "bob@example.org" and added.reason == 1
    again = await storage.add_suppression(
        Suppression(address="BOB@example.org", reason=2, create_time=T0 + 5, detail="complained")
    )
    assert again.reason == 2 and again.create_time == T0
    for i in range(5):
        await storage.add_suppression(Suppression(address=f"u{i}@x.org", reason=4, create_time=T0))
    assert await storage.suppressed(["bob@example.org", "u1@x.org", "free@x.org"]) == {
        "bob@example.org",
        "u1@x.org",
    }
    assert await storage.suppressed(["BOB@EXAMPLE.ORG"]) == {"bob@example.org"}
    page1 = await storage.list_suppressions(page_size=4)
    page2 = await storage.list_suppressions(page_size=4, after=page1[-1].address)
    assert [s.address for s in page1 + page2] == ["bob@example.org"] + [
        f"u{i}@x.org" for i in range(5)
    ]
    assert await storage.delete_suppression("Bob@example.ORG") is True
    assert await storage.delete_suppression("bob@example.org") is False
    assert await storage.suppressed(["bob@example.org"]) == set()


async def test_quota_per_minute_is_rolling(storage: Storage) -> None:
    async def take(n: int, t: float) -> tuple[bool, float | None]:
        r = await storage.consume_quota("alice", n, now=t, per_minute=10, per_day=0)
        return r.allowed, r.retry_after

    assert await take(4, T0) == (True, None)
    assert await take(6, T0 + 30) == (True, None)
    allowed, retry = await take(1, T0 + 40)
    assert not allowed and retry == pytest.approx(20)  # the 4 of T0 leave at T0 + 60
    assert (await take(4, T0 + 60))[0]
    assert not (await take(1, T0 + 61))[0]
    # Other callers have their own count; a batch over the limit never fits.
    assert (await storage.consume_quota("bert", 10, now=T0, per_minute=10, per_day=0)).allowed
    never = await storage.consume_quota("carl", 11, now=T0, per_minute=10, per_day=0)
    assert not never.allowed and never.retry_after is None


async def test_quota_per_day_is_per_utc_day_and_refusals_count_nothing(storage: Storage) -> None:
    day = 86400 * 20000.0
    r = await storage.consume_quota("a", 3, now=day + 10, per_minute=0, per_day=5)
    assert r.allowed and r.day_count == 3
    r = await storage.consume_quota("a", 3, now=day + 20, per_minute=0, per_day=5)
    assert not r.allowed and r.day_count == 3
    assert r.retry_after == pytest.approx(86400 - 20)
    r = await storage.consume_quota("a", 2, now=day + 30, per_minute=0, per_day=5)
    assert r.allowed and r.day_count == 5
    r = await storage.consume_quota("a", 5, now=day + 86400, per_minute=0, per_day=5)
    assert r.allowed and r.day_count == 5


async def test_concurrent_quota_never_overshoots(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.consume_quota("a", 1, now=T0, per_minute=7, per_day=0) for _ in range(30))
    )
    assert sum(r.allowed for r in results) == 7


async def test_webhook_tokens_are_remembered_until_they_expire(storage: Storage) -> None:
    assert await storage.remember_token("t1", now=T0, ttl=600) is True
    assert await storage.remember_token("t1", now=T0 + 10, ttl=600) is False
    assert await storage.remember_token("t2", now=T0 + 10, ttl=600) is True
    assert await storage.remember_token("t1", now=T0 + 601, ttl=600) is True


async def test_webhook_event_is_one_transaction_keyed_by_its_token(storage: Storage) -> None:
    await storage.insert([new("m1", status=Status.SENT, message_id="<mg-1@mg.example.org>")])
    bounce = Suppression(address="Bob@Example.org", reason=1, create_time=T0, detail="bounced")
    fresh, event = await storage.webhook_event(
        "tok-1",
        ttl=600,
        header_message_id="mg-1@mg.example.org",
        status=Status.BOUNCED,
        detail="bounced",
        suppression=bounce,
        now=T0 + 5,
    )
    assert fresh and event is not None and event.message_id == "m1"
    assert event.status is Status.BOUNCED
    assert await storage.suppressed(["bob@example.org"]) == {"bob@example.org"}
    # the same token again: refused, nothing written
    await storage.delete_suppression("bob@example.org")
    again = await storage.webhook_event(
        "tok-1",
        ttl=600,
        header_message_id="mg-1@mg.example.org",
        status=Status.COMPLAINED,
        detail="complained",
        suppression=bounce,
        now=T0 + 6,
    )
    assert again == (False, None)
    record = await storage.get("m1")
    assert record is not None and record.status is Status.BOUNCED
    assert [e.detail for e in record.events][-1] == "bounced"
    assert await storage.suppressed(["bob@example.org"]) == set()
    # an unknown message: the token is kept, nobody is suppressed
    unknown = await storage.webhook_event(
        "tok-2",
        ttl=600,
        header_message_id="other@elsewhere",
        status=Status.BOUNCED,
        detail="x",
        suppression=bounce,
        now=T0 + 7,
    )
    assert unknown == (True, None)
    assert await storage.suppressed(["bob@example.org"]) == set()
    assert await storage.remember_token("tok-2", now=T0 + 8, ttl=600) is False


async def test_a_failed_webhook_event_leaves_nothing_not_even_its_token(storage: Storage) -> None:
    await storage.insert([new("m1", status=Status.SENT, message_id="<mg-1@mg.example.org>")])
    broken = Suppression(address=None, reason=1, create_time=T0)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - whatever the store raises
        await storage.webhook_event(
            "tok-1",
            ttl=600,
            header_message_id="mg-1@mg.example.org",
            status=Status.BOUNCED,
            detail="bounced",
            suppression=broken,
            now=T0 + 5,
        )
    record = await storage.get("m1")
    assert record is not None and record.status is Status.SENT
    assert [e.status for e in record.events] == [Status.SENT]
    # the provider's retry with the same token is taken
    assert await storage.remember_token("tok-1", now=T0 + 6, ttl=600) is True
