"""Do the mails the sink kept look as the tests expect? Headers, parts, envelope."""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

from bench import workload


@dataclass(frozen=True)
class Expected:
    text: str
    html: str


EXPECTED = {
    workload.PLAIN_SUBJECT: Expected(workload.TEXT, workload.HTML),
    workload.QUEUED_SUBJECT: Expected(workload.TEXT, workload.HTML),
    workload.BACKLOG_SUBJECT: Expected(workload.TEXT, workload.HTML),
    workload.TEMPLATED_SUBJECT: Expected(
        "Hi Alice, you have 3 new messages.\n" + workload.TEXT,
        "<p>Hi Alice</p><p>You have <b>3</b> new messages.</p>",
    ),
}


@dataclass
class Report:
    checked: dict[str, int] = field(default_factory=dict)  # samples per subject
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _normal(text: str) -> str:
    return text.replace("\r\n", "\n").rstrip("\n")


def _addresses(msg: EmailMessage, header: str) -> list[str]:
    return [addr for _, addr in email.utils.getaddresses([str(v) for v in msg.get_all(header, [])])]


def check_mail(msg: EmailMessage, envelope: dict[str, object], expected: Expected) -> list[str]:
    """What is wrong with one mail the server sent, as the tests would see it."""
    problems = []
    if _addresses(msg, "From") != [workload.SENDER]:
        problems.append(f"From is {msg['From']!r}")
    if _addresses(msg, "To") != [workload.RECIPIENT]:
        problems.append(f"To is {msg['To']!r}")
    message_id = str(msg.get("Message-ID", "")).strip()
    if not (message_id.startswith("<") and message_id.endswith(">") and "@" in message_id):
        problems.append(f"Message-ID is {message_id!r}")
    try:
        sent = email.utils.parsedate_to_datetime(str(msg["Date"]))
        sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
        if abs(datetime.now(UTC) - sent) > timedelta(hours=1):
            problems.append(f"Date is {msg['Date']!r}")
    except (TypeError, ValueError):
        problems.append(f"Date is {msg.get('Date')!r}")
    if msg.get_content_type() != "multipart/alternative":
        problems.append(f"Content-Type is {msg.get_content_type()}")
    else:
        kinds = [part.get_content_type() for part in msg.iter_parts()]
        if kinds != ["text/plain", "text/html"]:
            problems.append(f"parts are {kinds}")
        else:
            text, html = (part.get_content() for part in msg.iter_parts())
            if _normal(text) != _normal(expected.text):
                problems.append("the text part differs from what was sent")
            if _normal(html) != _normal(expected.html):
                problems.append(f"the html part is {html!r}")
    if envelope.get("mail_from") != workload.SENDER:
        problems.append(f"envelope sender is {envelope.get('mail_from')!r}")
    if envelope.get("rcpt_tos") != [workload.RECIPIENT]:
        problems.append(f"envelope recipients are {envelope.get('rcpt_tos')!r}")
    return problems


def check_samples(samples: Path, subjects: Iterable[str] = EXPECTED) -> Report:
    """Every kept mail must parse; those the server sent must look as the tests expect.

    There must be a sample of each of `subjects` (the kinds of mail the run sent).
    """
    report = Report()
    ids: set[str] = set()
    for path in sorted(samples.glob("*.eml")):
        try:
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            envelope = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError) as exc:
            report.problems.append(f"{path.name}: does not parse: {exc}")
            continue
        assert isinstance(msg, EmailMessage)
        if msg.defects:
            report.problems.append(f"{path.name}: defects {msg.defects}")
        subject = str(msg.get("Subject", ""))
        report.checked[subject] = report.checked.get(subject, 0) + 1
        if subject in EXPECTED:  # the server's mails (the direct ones reuse one message)
            message_id = str(msg.get("Message-ID", ""))
            if message_id in ids:
                report.problems.append(f"{path.name}: Message-ID {message_id} seen twice")
            ids.add(message_id)
            for problem in check_mail(msg, envelope, EXPECTED[subject]):
                report.problems.append(f"{path.name} ({subject}): {problem}")
    for subject in subjects:
        if not report.checked.get(subject):
            report.problems.append(f"no sample of {subject!r} to check")
    return report


@dataclass(frozen=True, kw_only=True)
class Counted:
    """What the sink and the stand-in counted, and what the successful calls sent them."""

    sink: int
    sink_expected: int
    standin: int
    standin_expected: int

    @property
    def ok(self) -> bool:
        return self.sink == self.sink_expected and self.standin == self.standin_expected


def verdict(counted: Counted, samples: Report, failed_calls: int) -> tuple[bool, list[str]]:
    """Whether the run delivered what it should, and the report's lines saying so."""

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**NOT MET**"

    kinds = ", ".join(f"{n} of {subject!r}" for subject, n in samples.checked.items())
    lines = [
        f"- correctness: the sink counted {counted.sink} mails for {counted.sink_expected} sent, "
        f"the stand-in {counted.standin} requests for {counted.standin_expected} — "
        f"{mark(counted.ok)}",
        f"- correctness: {sum(samples.checked.values())} sampled mails parse ({kinds or 'none'});"
        " those of SendMail (now and queued) and SendTemplatedMail have From, To, Subject,"
        f" Message-ID, Date and a multipart/alternative text+html body — {mark(samples.ok)}",
        *(f"  - {problem}" for problem in samples.problems[:20]),
    ]
    if failed_calls:
        lines.append(f"- {failed_calls} calls failed (see the errors column) — **NOT MET**")
    return counted.ok and samples.ok and not failed_calls, lines
