"""`mailsvc send --queue/--send-at` and `mailsvc messages list|get|cancel|watch` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from mailsvc.v1 import settings_pb2

from tests.conftest import ADMIN, Server, SmtpSink, smtp_settings
from tests.helpers import clean_env, cli, wait_until

ServerFactory = Callable[..., Server]
MAIL = ("--to", "r@example.com", "--subject", "s", "--text", "t")


def test_queue_send_and_the_messages_commands(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = server_factory()
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    env = clean_env(
        MAILSVC_SERVER=server.address, MAILSVC_TOKEN=ADMIN[0][1].removeprefix("Bearer ")
    )
    watch = subprocess.Popen(
        [sys.executable, "-m", "mailsvc", "messages", "watch", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert watch.stderr is not None
        # Sent before the watch is live, the first mail's events would be missed.
        assert watch.stderr.readline().startswith("watching"), "the watch did not start"
        queued = cli("send", *MAIL, "--queue", env=env)
        assert queued.returncode == 0, queued.stderr
        reply = json.loads(queued.stdout)
        assert reply["status"] == "MESSAGE_STATUS_QUEUED"
        wait_until(lambda: len(smtp_sink.received) == 1, 10, "the queued mail")

        def status(id: str) -> str:
            got = cli("messages", "get", id, env=env)
            assert got.returncode == 0, got.stderr
            return str(json.loads(got.stdout)["status"])

        wait_until(lambda: status(reply["id"]) == "MESSAGE_STATUS_SENT", 10, "SENT")

        later = cli("send", *MAIL, "--send-at", "+1h", env=env)
        assert later.returncode == 0, later.stderr
        scheduled = json.loads(later.stdout)
        assert scheduled["status"] == "MESSAGE_STATUS_SCHEDULED"
        listed = cli("messages", "list", "--status", "scheduled", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [m["id"] for m in json.loads(listed.stdout)["messages"]] == [scheduled["id"]]
        cancelled = cli("messages", "cancel", scheduled["id"], env=env)
        assert cancelled.returncode == 0, cancelled.stderr
        assert json.loads(cancelled.stdout)["status"] == "MESSAGE_STATUS_CANCELLED"
        again = cli("messages", "cancel", scheduled["id"], env=env)
        assert again.returncode != 0 and "FAILED_PRECONDITION" in again.stderr
        everything = cli("messages", "list", "--all", "--page-size", "1", env=env)
        assert len(json.loads(everything.stdout)["messages"]) == 2
    finally:
        watch.terminate()
        out, err = watch.communicate(timeout=10)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    seen = [(e["messageId"], e["status"]) for e in lines]
    assert (reply["id"], "MESSAGE_STATUS_SENT") in seen, (out, err)
    assert (scheduled["id"], "MESSAGE_STATUS_CANCELLED") in seen
