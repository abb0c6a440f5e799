"""The lifecycle rules, without a store or a server."""

from __future__ import annotations

import random

import pytest

from mailsvc import lifecycle
from mailsvc.auth import Principal
from mailsvc.errors import (
    DeadlineExceeded,
    DeliveryUncertain,
    FailedPrecondition,
    InvalidArgument,
    MailsvcError,
    RateLimited,
    ResourceExhausted,
    Unavailable,
)
from mailsvc.lifecycle import Kind, PageTokens, RetryPolicy
from mailsvc.storage.base import Event, Status

NOW = 1_750_000_000.0
POLICY = RetryPolicy(initial=30, maximum=1800, max_age=86400)


def uncertain_unavailable() -> DeliveryUncertain:
    # What the transports raise when the connection drops during DATA.
    return DeliveryUncertain("lost during DATA")


# --- send_at


def test_without_queue_or_send_at_the_send_is_synchronous() -> None:
    assert lifecycle.plan(now=NOW, queue=False, send_at=None) is None


def test_queue_is_due_now() -> None:
    assert lifecycle.plan(now=NOW, queue=True, send_at=None) == lifecycle.Plan(Status.QUEUED, NOW)


@pytest.mark.parametrize("offset", [-3600, 0, 0.5, 1.0])
def test_send_at_in_the_past_or_within_a_second_is_queued_now(offset: float) -> None:
    plan = lifecycle.plan(now=NOW, queue=False, send_at=NOW + offset)
    assert plan == lifecycle.Plan(Status.QUEUED, NOW)


@pytest.mark.parametrize("offset", [1.5, 3600, 7 * 86400])
def test_send_at_ahead_is_scheduled(offset: float) -> None:
    plan = lifecycle.plan(now=NOW, queue=False, send_at=NOW + offset)
    assert plan == lifecycle.Plan(Status.SCHEDULED, NOW + offset)


def test_send_at_more_than_7_days_ahead_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        lifecycle.plan(now=NOW, queue=True, send_at=NOW + 7 * 86400 + 1)
    assert [v.field for v in info.value.violations] == ["send_at"]


# --- classification and retries


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (Unavailable("451", reason="SMTP_UNAVAILABLE"), Kind.TRANSIENT),
        (RateLimited("429", reason="MAILGUN_RATE_LIMITED"), Kind.TRANSIENT),
        (FailedPrecondition("none", reason="NO_TRANSPORT"), Kind.TRANSIENT),
        (FailedPrecondition("535", reason="SMTP_AUTH_FAILED"), Kind.TRANSIENT),
        (FailedPrecondition("401", reason="MAILGUN_AUTH_FAILED"), Kind.TRANSIENT),
        (FailedPrecondition("550", reason="SMTP_REJECTED"), Kind.PERMANENT),
        (FailedPrecondition("400", reason="MAILGUN_REJECTED"), Kind.PERMANENT),
        (ResourceExhausted("552", reason="MESSAGE_TOO_LARGE"), Kind.PERMANENT),
        (uncertain_unavailable(), Kind.UNCERTAIN),
        (DeadlineExceeded("timed out mid-send"), Kind.UNCERTAIN),
    ],
)
def test_classify(error: MailsvcError, kind: Kind) -> None:
    assert lifecycle.classify(error) is kind


def test_retry_delay_doubles_from_initial_and_is_capped() -> None:
    no_jitter = RetryPolicy(initial=30, maximum=1800)

    class Mid(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return (a + b) / 2

    delays = [lifecycle.retry_delay(n, no_jitter, Mid()) for n in range(1, 10)]
    assert delays == [30, 60, 120, 240, 480, 960, 1800, 1800, 1800]
    assert lifecycle.retry_delay(10_000, no_jitter, Mid()) == 1800


def test_retry_delay_is_jittered_within_20_percent_and_never_over_the_cap() -> None:
    rng = random.Random(1)
    first = [lifecycle.retry_delay(1, POLICY, rng) for _ in range(500)]
    assert min(first) >= 24 and max(first) <= 36
    assert len({round(d, 3) for d in first}) > 100  # spread, not one value
    capped = [lifecycle.retry_delay(20, POLICY, rng) for _ in range(500)]
    assert max(capped) <= 1800 and min(capped) >= 1440


def test_transient_failure_is_rescheduled_with_the_reason_and_next_time() -> None:
    error = Unavailable("the SMTP server answered 451 (temporary)", reason="SMTP_UNAVAILABLE")
    finish = lifecycle.after_failure(
        error, now=NOW, send_time=NOW, attempt=1, policy=POLICY, rng=random.Random(3)
    )
    assert finish.status is Status.QUEUED
    assert finish.reason == "SMTP_UNAVAILABLE" and finish.error == error.message
    assert finish.next_attempt_time is not None and 24 <= finish.next_attempt_time - NOW <= 36
    assert "451" in finish.detail and "next attempt at 20" in finish.detail


def test_permanent_failure_fails_at_once() -> None:
    error = FailedPrecondition("the SMTP server rejected the message (550)", reason="SMTP_REJECTED")
    finish = lifecycle.after_failure(error, now=NOW, send_time=NOW, attempt=1, policy=POLICY)
    assert finish.status is Status.FAILED and finish.reason == "SMTP_REJECTED"
    assert finish.next_attempt_time is None


def test_uncertain_failure_fails_as_delivery_uncertain() -> None:
    finish = lifecycle.after_failure(
        uncertain_unavailable(), now=NOW, send_time=NOW, attempt=1, policy=POLICY
    )
    assert finish.status is Status.FAILED and finish.reason == "DELIVERY_UNCERTAIN"


def test_a_retry_that_would_start_after_the_max_age_fails_instead() -> None:
    error = Unavailable("451", reason="SMTP_UNAVAILABLE")
    late = NOW + 86400 - 100  # the next attempt, at least 24 s away... at 1440 s or more
    finish = lifecycle.after_failure(error, now=late, send_time=NOW, attempt=20, policy=POLICY)
    assert finish.status is Status.FAILED and finish.reason == "SMTP_UNAVAILABLE"
    assert "not sent within 86400 s" in finish.detail
    early = lifecycle.after_failure(error, now=NOW + 60, send_time=NOW, attempt=2, policy=POLICY)
    assert early.status is Status.QUEUED


def test_expiry_is_measured_from_the_send_time() -> None:
    assert not lifecycle.expired(NOW + 86400, NOW, POLICY)
    assert lifecycle.expired(NOW + 86400.5, NOW, POLICY)
    finish = lifecycle.gave_up_expired(NOW, POLICY)
    assert finish.status is Status.FAILED and finish.reason == lifecycle.QUEUE_MAX_AGE


# --- visibility

ALICE = Principal("alice", frozenset({"user"}))
ADMIN = Principal("root", frozenset({"user", "admin"}))
SUPER = Principal("boss", frozenset({"user", "superadmin"}))


def test_callers_see_their_own_admins_see_all() -> None:
    assert lifecycle.can_see(ALICE, "alice")
    assert not lifecycle.can_see(ALICE, "bert")
    assert lifecycle.can_see(ADMIN, "bert") and lifecycle.can_see(SUPER, "bert")


def test_list_caller_filter_is_ignored_for_non_admins() -> None:
    assert lifecycle.list_caller(ALICE, "bert") == "alice"
    assert lifecycle.list_caller(ALICE, "") == "alice"
    assert lifecycle.list_caller(ADMIN, "bert") == "bert"
    assert lifecycle.list_caller(ADMIN, "") == ""


def test_watch_filters_by_visibility_and_id() -> None:
    event = Event(message_id="m1", time=NOW, status=Status.SENT, caller="bert")
    assert not lifecycle.watch_sees(ALICE, event)
    assert lifecycle.watch_sees(ADMIN, event)
    assert lifecycle.watch_sees(ADMIN, event, "m1")
    assert not lifecycle.watch_sees(ADMIN, event, "m2")


# --- paging


@pytest.mark.parametrize(("asked", "used"), [(0, 50), (1, 1), (1000, 1000), (5000, 1000)])
def test_page_size(asked: int, used: int) -> None:
    assert lifecycle.page_size(asked) == used


def test_negative_page_size_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        lifecycle.page_size(-1)
    assert info.value.violations[0].field == "page_size"


TOKENS = PageTokens(lifecycle.page_token_key(b"jwt-secret"))
FILTER = ("alice", Status.QUEUED, "bob@example.org", "")


def test_page_token_round_trips_and_is_opaque() -> None:
    token = TOKENS.encode(FILTER, (NOW + 0.123456, "m-42"))
    assert "m-42" not in token and "alice" not in token
    assert TOKENS.decode(token, FILTER) == (NOW + 0.123456, "m-42")
    assert TOKENS.decode("", FILTER) is None


def test_the_same_secret_gives_the_same_tokens_on_every_replica() -> None:
    other = PageTokens(lifecycle.page_token_key(b"jwt-secret"))
    assert other.decode(TOKENS.encode(FILTER, (NOW, "x")), FILTER) == (NOW, "x")


def _field(token: str, filter: tuple[object, ...] = FILTER) -> str:
    with pytest.raises(InvalidArgument) as info:
        TOKENS.decode(token, filter)
    return info.value.violations[0].field


def test_a_token_used_with_another_filter_is_refused() -> None:
    token = TOKENS.encode(FILTER, (NOW, "x"))
    assert _field(token, ("alice", Status.SENT, "bob@example.org", "")) == "page_token"
    assert _field(token, ("bert", Status.QUEUED, "bob@example.org", "")) == "page_token"


def test_tampered_or_garbage_tokens_are_refused() -> None:
    token = TOKENS.encode(FILTER, (NOW, "x"))
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    assert _field(flipped) == "page_token"
    assert _field("not a token!") == "page_token"
    assert _field("QUJD") == "page_token"
    forged = PageTokens(b"other key").encode(FILTER, (NOW, "x"))
    assert _field(forged) == "page_token"
