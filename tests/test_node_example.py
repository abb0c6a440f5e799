"""examples/node: the Node.js client, installed from its lock file, sends through a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mailsvc.v1 import settings_pb2

from tests.conftest import Server, SmtpSink, make_token, smtp_settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"


def node_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILSVC_", "MAIL_TO"))}
    env.update(NPM_CONFIG_UPDATE_NOTIFIER="false", NPM_CONFIG_FUND="false")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def npm() -> str:
    """npm, with the example's dependencies installed exactly as its package-lock.json says."""
    npm = shutil.which("npm")
    assert npm, "node and npm are needed for examples/node (apt-get install nodejs npm)"
    # `npm ci` also fails when package.json and package-lock.json disagree.
    result = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        env=node_env(),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return npm


def npm_start(npm: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [npm, "start", "--silent"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        env=node_env(**env),
        timeout=120,
        check=False,
    )


def test_node_example_sends_one_mail(npm: str, server: Server, smtp_sink: SmtpSink) -> None:
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    result = npm_start(
        npm,
        MAILSVC_SERVER=server.address,
        MAILSVC_TOKEN=make_token(["admin"], sub="node-example"),
        MAIL_TO="node@example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reply = json.loads(result.stdout)
    assert reply["transport"] == "smtp"
    assert reply["recipients"] == ["node@example.com"]

    (received,) = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ["node@example.com"]
    assert received.message["Message-ID"] == reply["messageId"]
    assert received.message["Subject"] == "Hello from Node.js"


def test_node_example_fails_with_the_status(npm: str, server: Server, smtp_sink: SmtpSink) -> None:
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    bad = make_token(["admin"], secret="not-the-server-secret-0123456789abcdef")
    result = npm_start(npm, MAILSVC_SERVER=server.address, MAILSVC_TOKEN=bad)
    assert result.returncode != 0
    assert result.stderr.startswith("UNAUTHENTICATED: "), result.stderr
    assert bad not in result.stdout + result.stderr
    assert smtp_sink.received == []
