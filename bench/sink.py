"""The SMTP sink, a process of its own: counts every mail and keeps a few raw ones.

    python -m bench.sink --samples DIR [--port N]

Says `READY <port>`, then answers commands on stdin until `quit` or the end of stdin:
`count` (mails so far), `ids` (JSON: per subject, mails and distinct Message-IDs), `hold`
(from now on MAIL FROM waits: senders stall as on a server that stopped answering; nothing is
refused, so no attempt fails) and `release` (the held senders go on). Of each subject it keeps
the 1st, the 1+every-th, ... mail (at most `--per-subject`) as `<n>.eml` with its envelope
beside it as `<n>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from bench.control import answer_commands, say

_SUBJECT = re.compile(rb"(?mi)^Subject:[ \t]*(.*)$")
_MESSAGE_ID = re.compile(rb"(?mi)^Message-ID:[ \t]*(.*)$")


def _header(head: bytes, pattern: re.Pattern[bytes]) -> str:
    """A header's raw value, read cheaply from the header block (not decoded)."""
    match = pattern.search(head)
    return match.group(1).strip().decode("ascii", "replace") if match else ""


class CountingHandler:
    """aiosmtpd handler: accept every mail, count it, keep a sample."""

    def __init__(self, samples: Path, *, every: int, per_subject: int) -> None:
        self.count = 0
        self._samples = samples
        self._every = every
        self._per_subject = per_subject
        self._seen: Counter[str] = Counter()
        self._ids: dict[str, set[str]] = {}
        self._open = asyncio.Event()
        self._open.set()

    def hold(self) -> str:
        self._open.clear()
        return "held"

    def release(self) -> str:
        self._open.set()
        return "released"

    def ids(self) -> str:
        """Per subject: [mails, distinct Message-IDs]; a mail sent twice shows as a difference."""
        return json.dumps({s: [n, len(self._ids.get(s, ()))] for s, n in self._seen.items()})

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if not self._open.is_set():
            await self._open.wait()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        raw = bytes(envelope.content)
        head = raw.split(b"\r\n\r\n", 1)[0]
        subject = _header(head, _SUBJECT)
        nth = self._seen[subject]
        self._seen[subject] += 1
        self._ids.setdefault(subject, set()).add(_header(head, _MESSAGE_ID))
        if nth % self._every == 0 and nth // self._every < self._per_subject:
            self._keep(raw, envelope.mail_from, list(envelope.rcpt_tos))
        return "250 OK"

    def _keep(self, raw: bytes, mail_from: str, rcpt_tos: list[str]) -> None:
        stem = self._samples / f"{self.count:08d}"
        stem.with_suffix(".eml").write_bytes(raw)
        envelope = {"mail_from": mail_from, "rcpt_tos": rcpt_tos}
        stem.with_suffix(".json").write_text(json.dumps(envelope))


async def serve(port: int, handler: CountingHandler) -> None:
    loop = asyncio.get_running_loop()
    # A fixed hostname: aiosmtpd would otherwise look up the FQDN for every connection.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-sink", ident="bench-sink"),
        host="127.0.0.1",
        port=port,
        backlog=1024,
    )
    say("READY", server.sockets[0].getsockname()[1])
    try:
        await answer_commands(
            {
                "count": lambda: handler.count,
                "ids": handler.ids,
                "hold": handler.hold,
                "release": handler.release,
            }
        )
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--per-subject", type=int, default=10)
    args = parser.parse_args()
    args.samples.mkdir(parents=True, exist_ok=True)
    handler = CountingHandler(args.samples, every=args.every, per_subject=args.per_subject)
    asyncio.run(serve(args.port, handler))


if __name__ == "__main__":
    main()
