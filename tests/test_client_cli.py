"""End-to-end tests of the operator client: `mailsvc settings|send|render|health` as a user runs
them (`python -m mailsvc ...` subprocesses) against a real server and a real SMTP sink."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    JWT_SECRET,
    SMTP_PASSWORD,
    Pki,
    Server,
    SmtpSink,
    free_port,
    make_token,
    wait_until,
)
from tests.helpers import ServerFactory, clean_env
from tests.helpers import cli as run_cli

ROOT_TOKEN = make_token(["superadmin"], sub="root")
ADMIN_TOKEN = make_token(["admin"], sub="ops")
USER_TOKEN = make_token([], sub="someone")
BAD_TOKEN = make_token(["superadmin"], sub="root", secret="not-the-server-secret-0123456789abcd")
SECRETS = (SMTP_PASSWORD, JWT_SECRET, ROOT_TOKEN, ADMIN_TOKEN, USER_TOKEN, BAD_TOKEN)


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args, env=env, stdin=stdin)
    for secret in SECRETS:  # whatever happens, no token or password is ever printed
        assert secret not in result.stdout + result.stderr
    return result


def on(server: Server, *args: str, token: str = ROOT_TOKEN) -> subprocess.CompletedProcess[str]:
    """Run a client command against `server` with `token`."""
    return cli(*args, "--server", server.address, "--token", token)


def output(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON a successful command printed: stdout holds that and nothing else."""
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def failure(result: subprocess.CompletedProcess[str], code: str) -> list[str]:
    """The stderr lines of a failed RPC, checked to start with `CODE: message`."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith(f"{code}: "), result.stderr
    return result.stderr.splitlines()


def settings_json(sink: SmtpSink, **extra: Any) -> dict[str, Any]:
    """MailSettings as protobuf JSON: SMTP to the sink, with a password, and one template."""
    return {
        "smtp": {"host": sink.host, "port": sink.port, "login": "", "password": SMTP_PASSWORD},
        "defaultFrom": "ops@example.com",
        "templates": {
            "welcome": {
                "to": ["{{ email }}"],
                "subject": "Hello {{ name }}, you are number {{ n }}",
                "text": "Welcome, {{ name }}.",
                "model": {"name": "string", "n": "integer", "email": "string"},
                "roles": ["user"],
            }
        },
        **extra,
    }


def put(server: Server, tmp_path: Path, settings: dict[str, Any], *args: str) -> dict[str, Any]:
    path = tmp_path / f"settings-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(settings))
    return output(on(server, "settings", "put", str(path), *args))


# --- settings --------------------------------------------------------------------------------


def test_settings_put_then_get_round_trips(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    stored = put(server, tmp_path, settings_json(smtp_sink))
    assert stored["smtp"]["host"] == smtp_sink.host
    assert stored["smtp"]["passwordSet"] is True
    assert "password" not in stored["smtp"]
    assert stored["templates"]["welcome"]["model"]["n"] == "integer"
    assert stored["etag"]

    got = on(server, "settings", "get")
    assert output(got) == stored
    assert SMTP_PASSWORD not in got.stdout

    # What `get` printed can be edited and fed back (its output-only fields are ignored).
    edited = output(got)
    edited["defaultFrom"] = "team@example.com"
    again = put(server, tmp_path, edited)
    assert again["defaultFrom"] == "team@example.com"
    assert again["smtp"]["passwordSet"] is True  # an empty secret keeps the stored one
    assert again["etag"] != stored["etag"]


def test_settings_put_with_mask_changes_only_the_named_paths(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    change = {
        "defaultFrom": "masked@example.com",
        "smtp": {"host": "ignored.example.com", "port": 2525},
        "enableUserFullAccess": True,
    }
    stored = put(server, tmp_path, change, "--mask", "default_from,smtp.port")
    assert stored["defaultFrom"] == "masked@example.com"
    assert stored["smtp"]["port"] == 2525
    assert stored["smtp"]["host"] == smtp_sink.host
    assert stored["smtp"]["passwordSet"] is True
    assert "welcome" in stored["templates"]
    assert "enableUserFullAccess" not in stored

    # --mask repeats, and FILE may be - for stdin.
    result = cli(
        "settings",
        "put",
        "-",
        "--mask",
        "enable_user_full_access",
        "--mask",
        "templates",
        "--server",
        server.address,
        env=clean_env(MAILSVC_TOKEN=ROOT_TOKEN),
        stdin=json.dumps({"enableUserFullAccess": True}),
    )
    stored = output(result)
    assert stored["enableUserFullAccess"] is True
    assert "templates" not in stored
    assert stored["defaultFrom"] == "masked@example.com"


def test_settings_put_with_stale_etag_is_aborted(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    first = put(server, tmp_path, settings_json(smtp_sink))
    put(server, tmp_path, settings_json(smtp_sink, defaultFrom="second@example.com"))
    path = tmp_path / "third.json"
    path.write_text(json.dumps(settings_json(smtp_sink, defaultFrom="third@example.com")))
    result = on(server, "settings", "put", str(path), "--etag", first["etag"])
    failure(result, "ABORTED")
    assert output(on(server, "settings", "get"))["defaultFrom"] == "second@example.com"


def test_settings_validation_error_lists_each_field_violation(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"smtp": {"host": "", "port": 70000}}))
    lines = failure(on(server, "settings", "put", str(path)), "INVALID_ARGUMENT")
    violations = [line.strip() for line in lines[1:]]
    assert any(v.startswith("settings.smtp.host: ") for v in violations), lines
    assert any(v.startswith("settings.smtp.port: ") for v in violations), lines


# --- send ------------------------------------------------------------------------------------


def test_send_delivers_through_the_sink(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    html = tmp_path / "body.html"
    html.write_text("<p>Hello <b>ops</b></p>")
    report = tmp_path / "report.csv"
    report.write_bytes(b"a,b\n1,2\n")
    result = on(
        server,
        "send",
        "--to",
        "alice@example.com",
        "--to",
        "bob@example.com",
        "--cc",
        "carol@example.com",
        "--bcc",
        "dave@example.com",
        "--subject",
        "Weekly report",
        "--text",
        "See the attachment.",
        "--html-file",
        str(html),
        "--attach",
        str(report),
        "--reply-to",
        "ops@example.com",
        "--idempotency-key",
        "weekly-1",
        token=ADMIN_TOKEN,
    )
    reply = output(result)
    assert reply["messageId"]
    assert reply["transport"] == "smtp"
    assert sorted(reply["recipients"]) == sorted(
        ["alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com"]
    )

    (received,) = smtp_sink.wait_for(1)
    message = received.message
    assert message["Subject"] == "Weekly report"
    assert message["Message-ID"] == reply["messageId"]
    assert message["Reply-To"] == "ops@example.com"
    assert message["From"] == "ops@example.com"
    assert "dave@example.com" in received.rcpt_tos
    assert "Bcc" not in message
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["report.csv"]
    assert attachments[0].get_payload(decode=True) == b"a,b\n1,2\n"
    body = message.get_body(("html",))
    assert body is not None and "<b>ops</b>" in body.get_content()


def test_send_text_from_stdin(server: Server, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    result = cli(
        "send",
        "--to",
        "alice@example.com",
        "--subject",
        "piped",
        "--text-file",
        "-",
        env=clean_env(MAILSVC_SERVER=server.address, MAILSVC_TOKEN=ADMIN_TOKEN),
        stdin="from a pipe\n",
    )
    assert output(result)["messageId"]
    (received,) = smtp_sink.wait_for(1)
    body = received.message.get_body(("plain",))
    assert body is not None and body.get_content().strip() == "from a pipe"


def test_send_validation_error_shows_the_field(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    result = on(
        server, "send", "--to", "not an address", "--subject", "x", "--text", "y", token=ADMIN_TOKEN
    )
    lines = failure(result, "INVALID_ARGUMENT")
    assert any(line.strip().startswith("to[0]: ") for line in lines[1:]), lines
    assert smtp_sink.received == []


def test_send_without_the_role_is_permission_denied(server: Server) -> None:
    denied = on(
        server, "send", "--to", "a@example.com", "--subject", "x", "--text", "y", token=USER_TOKEN
    )
    failure(denied, "PERMISSION_DENIED")


# --- render ----------------------------------------------------------------------------------


def test_render_types_parameters_and_sends_nothing(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    result = on(
        server,
        "render",
        "welcome",
        "--param",
        "name=Alice",
        "--param",
        "n=3",
        "--param",
        "email=alice@example.com",
        "--to",
        "extra@example.com",
        token=USER_TOKEN,  # the template's roles include "user"
    )
    rendered = output(result)
    assert rendered["subject"] == "Hello Alice, you are number 3"
    assert rendered["text"] == "Welcome, Alice."
    assert rendered["to"] == ["alice@example.com", "extra@example.com"]
    assert rendered["fromAddress"] == "ops@example.com"
    # No wait: the command has ended, and with it the call that would have sent.
    assert smtp_sink.received == []


def test_render_wrong_parameter_type_names_the_parameter(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    # "3x" is not JSON, so it stays a string, which the integer parameter refuses.
    result = on(server, "render", "welcome", "--param", "name=A", "--param", "n=3x")
    lines = failure(result, "INVALID_ARGUMENT")
    assert any("n" in line for line in lines[1:]), lines


def test_render_unknown_template_is_not_found(server: Server) -> None:
    failure(on(server, "render", "nope"), "NOT_FOUND")


# --- authentication and usage errors ---------------------------------------------------------

COMMANDS: dict[str, list[str]] = {
    "settings get": ["settings", "get"],
    "settings put": ["settings", "put", "{settings}"],
    "send": ["send", "--to", "a@example.com", "--subject", "s", "--text", "t"],
    "render": ["render", "welcome", "--param", "name=Alice"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_token_is_unauthenticated(server: Server, tmp_path: Path, command: str) -> None:
    settings = tmp_path / "s.json"
    settings.write_text("{}")
    args = [a.replace("{settings}", str(settings)) for a in COMMANDS[command]]
    failure(on(server, *args, token=BAD_TOKEN), "UNAUTHENTICATED")


def test_no_token_is_unauthenticated_with_a_hint(server: Server) -> None:
    lines = failure(cli("settings", "get", "--server", server.address), "UNAUTHENTICATED")
    assert any("MAILSVC_TOKEN" in line for line in lines[1:]), lines


def test_token_and_server_from_the_environment(
    server: Server, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    put(server, tmp_path, settings_json(smtp_sink))
    env = clean_env(MAILSVC_SERVER=server.address, MAILSVC_TOKEN=ROOT_TOKEN)
    got = output(cli("settings", "get", env=env))
    assert got["smtp"]["host"] == smtp_sink.host
    # The flag wins over the environment.
    result = cli("settings", "get", "--token", BAD_TOKEN, env=env)
    failure(result, "UNAUTHENTICATED")


def test_unreachable_server_fails_with_unavailable() -> None:
    result = cli("settings", "get", "--server", f"127.0.0.1:{free_port()}", "--token", ROOT_TOKEN)
    failure(result, "UNAVAILABLE")


@pytest.mark.parametrize(
    "args",
    [
        ["send", "--to", "a@example.com", "--subject", "no body"],
        ["send", "--subject", "no recipient", "--text", "t"],
        ["send", "--to", "a@example.com", "--subject", "s", "--text-file", "/nonexistent"],
        ["settings", "put", "/nonexistent.json"],
        ["render", "welcome", "--param", "no-equals-sign"],
        ["settings", "get", "--timeout", "0"],
        ["settings", "get", "--tls-cert", "/nonexistent.pem"],
    ],
)
def test_usage_errors_exit_2(server: Server, args: list[str]) -> None:
    result = on(server, *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip()


def test_settings_put_of_a_file_that_is_not_settings_json(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"smtp": {"hots": "typo.example.com"}}')
    result = on(server, "settings", "put", str(path))
    assert result.returncode == 2
    assert "hots" in result.stderr


def test_token_that_cannot_be_a_header_is_refused_without_echoing_it(server: Server) -> None:
    result = on(server, "settings", "get", token="abc\ndef-secretish")
    assert result.returncode == 2
    assert "secretish" not in result.stderr


# --- TLS -------------------------------------------------------------------------------------


def start_tls_server(server_factory: ServerFactory, pki: Pki, *extra: str) -> Server:
    """A TLS server, waited for with `mailsvc health` over mTLS (the plaintext probe can't)."""
    server = server_factory(*pki.server_flags(), *extra, wait=False)
    probe = ["health", "--server", server.address, *pki.client_flags()]

    def serving() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(f"TLS server exited:\n{server.logs()}")
        result = cli(*probe)
        assert result.returncode != 0 or result.stdout.strip() == "SERVING", result.stdout
        return result.returncode == 0

    wait_until(serving, 30, "the TLS server serving")
    return server


def test_client_commands_over_mutual_tls(
    server_factory: ServerFactory, pki: Pki, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    server = start_tls_server(server_factory, pki, "--tls-client-ca", str(pki.ca))
    tls = pki.client_flags()
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings_json(smtp_sink)))
    stored = output(on(server, "settings", "put", str(path), *tls))
    assert stored["smtp"]["passwordSet"] is True
    assert output(on(server, "settings", "get", *tls)) == stored
    sent = output(
        on(server, "send", "--to", "a@example.com", "--subject", "tls", "--text", "t", *tls)
    )
    assert sent["transport"] == "smtp"
    assert len(smtp_sink.wait_for(1)) == 1

    # Without the client certificate, without TLS, or without trusting the CA: refused.
    for args in (["--tls-ca", str(pki.ca)], [], ["--tls"]):
        result = on(server, "settings", "get", "--timeout", "5", *args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("UNAVAILABLE: "), result.stderr


def test_tls_server_name_overrides_the_name_checked(
    server_factory: ServerFactory, pki: Pki
) -> None:
    server = start_tls_server(server_factory, pki)
    port = server.address.rpartition(":")[2]
    # "localhost" is not in the certificate: refused unless told which name to check.
    target = f"localhost:{port}"
    plain = cli(
        "settings", "get", "--server", target, "--token", ROOT_TOKEN, "--tls-ca", str(pki.ca)
    )
    assert plain.returncode == 1
    assert plain.stderr.startswith("UNAVAILABLE: "), plain.stderr
    named = cli(
        "settings",
        "get",
        "--server",
        target,
        "--token",
        ROOT_TOKEN,
        "--tls-ca",
        str(pki.ca),
        "--tls-server-name",
        "mail.internal",
    )
    assert output(named).get("etag")
