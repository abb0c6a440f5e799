"""Operator commands that call a running server: `settings get|put`, `send`, `render`,
`messages list|get|cancel|watch`, `suppressions list|add|delete`, `health`.

Each command prints the reply as protobuf JSON (camelCase names) on stdout and nothing else, so
its output can be piped to `jq` or saved and fed back to `settings put`. Failures go to stderr:
an RPC error as `CODE_NAME: message`, then each `google.rpc.BadRequest` field violation on its
own line (exit 1); a bad flag or input file as `mailsvc: error: ...` (exit 2). The token is
never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from mailsvc.v1 import mail_pb2, settings_pb2, suppression_pb2

if TYPE_CHECKING:
    import grpc

# grpc and the *_grpc stubs are imported in the functions that use them, so that run() can
# set GRPC_VERBOSITY first: gRPC's C core reads it once, when grpc is first imported.

Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
HEALTH_TIMEOUT = 3.0  # a probe should answer fast; `health` has always waited 3 s
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad flag or an unreadable input: reported on stderr with exit code 2."""


# --- parsers ---------------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client subcommands; `run(args, environ)` then executes the chosen one."""
    client = _connection_flags(token=True, timeout=DEFAULT_TIMEOUT)

    settings = sub.add_parser("settings", help="read or replace the mail settings")
    settings_sub = settings.add_subparsers(dest="settings_command", required=True)
    get = settings_sub.add_parser(
        "get", parents=[client], help="print the settings as JSON (secrets are never returned)"
    )
    get.set_defaults(client_command=_settings_get)
    put = settings_sub.add_parser(
        "put",
        parents=[client],
        help="write settings from a JSON file; print the stored result",
        description="Write MailSettings given as protobuf JSON (the shape `settings get` "
        "prints). Without --mask everything is replaced; an empty secret keeps the stored one.",
    )
    put.add_argument("file", metavar="FILE.json", help="MailSettings as JSON; - reads stdin")
    put.add_argument(
        "--mask",
        action="append",
        metavar="PATHS",
        help="only update these comma-separated field paths (repeatable), "
        "e.g. smtp.host,templates.welcome",
    )
    put.add_argument(
        "--etag", default="", help="write only if the stored settings still have this etag"
    )
    put.set_defaults(client_command=_settings_put)

    send = sub.add_parser(
        "send",
        parents=[client],
        help="send one mail; print the SendMailResponse as JSON",
        description="Send one mail. Its From is the settings' defaultFrom or the server's "
        "--default-from. At least one of --text/--text-file and --html/--html-file is needed.",
    )
    _recipient_flags(send, to_required=True)
    send.add_argument("--subject", required=True, help="subject line")
    text = send.add_mutually_exclusive_group()
    text.add_argument("--text", help="plain text body")
    text.add_argument("--text-file", metavar="FILE", help="plain text body from FILE (- = stdin)")
    html = send.add_mutually_exclusive_group()
    html.add_argument("--html", help="HTML body")
    html.add_argument("--html-file", metavar="FILE", help="HTML body from FILE (- = stdin)")
    send.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="FILE",
        help="attach FILE (repeatable); its type is guessed from its name",
    )
    send.add_argument("--reply-to", default="", help="Reply-To address")
    send.add_argument(
        "--idempotency-key",
        default="",
        help="a repeat with the same key within 24 hours returns the first response",
    )
    send.add_argument(
        "--queue",
        action="store_true",
        help="store the mail and deliver it in the background (the reply is QUEUED)",
    )
    send.add_argument(
        "--send-at",
        type=_timestamp,
        metavar="TIME",
        help="deliver at TIME (implies --queue): RFC 3339 (2026-12-01T09:00:00Z) or +DURATION "
        "from now (+90s, +10m, +2h, +1d)",
    )
    send.set_defaults(client_command=_send)

    render = sub.add_parser(
        "render",
        parents=[client],
        help="render a stored template; print the RenderedMail as JSON (nothing is sent)",
    )
    render.add_argument("template", metavar="TEMPLATE", help="the stored template's name")
    render.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template parameter (repeatable); VALUE is JSON when it parses as JSON "
        "(n=3, ok=true, tags='[\"a\"]'), else a string (name=Alice)",
    )
    _recipient_flags(render, to_required=False)
    render.set_defaults(client_command=_render)

    _message_commands(sub, client)
    _suppression_commands(sub, client)

    health = sub.add_parser(
        "health",
        parents=[_connection_flags(token=False, timeout=HEALTH_TIMEOUT)],
        help="exit 0 when the server reports SERVING",
    )
    health.add_argument("--service", default="", help="service name; empty = overall")
    health.set_defaults(client_command=_health)


def _message_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    messages = sub.add_parser("messages", help="look up, list, cancel or watch mail records")
    messages_sub = messages.add_subparsers(dest="messages_command", required=True)
    ls = messages_sub.add_parser(
        "list", parents=[client], help="print records, newest first, as JSON"
    )
    ls.add_argument("--status", type=_status, help="only this status, e.g. QUEUED or failed")
    ls.add_argument("--recipient", default="", help="only mail to this address (to, cc or bcc)")
    ls.add_argument(
        "--caller", default="", help="only mail of this caller (admin and superadmin only)"
    )
    ls.add_argument("--page-size", type=int, default=0, help="records per page (default 50)")
    ls.add_argument("--page-token", default="", help="nextPageToken of the previous page")
    ls.add_argument("--all", action="store_true", help="follow every page and print them all")
    ls.set_defaults(client_command=_messages_list)
    for name, what, handler in (
        ("get", "print one record with its events", _messages_get),
        ("cancel", "cancel a QUEUED or SCHEDULED mail; print the record", _messages_cancel),
    ):
        command = messages_sub.add_parser(name, parents=[client], help=what)
        command.add_argument("id", metavar="ID", help="the record's id (SendMailResponse.id)")
        command.set_defaults(client_command=handler)
    watch = messages_sub.add_parser(
        "watch",
        parents=[_connection_flags(token=True, timeout=None)],
        help="print status changes as they happen, one JSON object a line, until interrupted",
    )
    watch.add_argument("id", nargs="?", default="", help="only this record; default: all")
    watch.set_defaults(client_command=_messages_watch)


def _suppression_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    suppressions = sub.add_parser(
        "suppressions", help="the addresses no mail is sent to (admin, superadmin)"
    )
    suppressions_sub = suppressions.add_subparsers(dest="suppressions_command", required=True)
    ls = suppressions_sub.add_parser("list", parents=[client], help="print entries as JSON")
    ls.add_argument("--page-size", type=int, default=0, help="entries per page (default 50)")
    ls.add_argument("--page-token", default="", help="nextPageToken of the previous page")
    ls.add_argument("--all", action="store_true", help="follow every page and print them all")
    ls.set_defaults(client_command=_suppressions_list)
    add = suppressions_sub.add_parser("add", parents=[client], help="suppress an address")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument(
        "--reason",
        type=_suppression_reason,
        default=suppression_pb2.SUPPRESSION_REASON_MANUAL,
        help="bounce, complaint, unsubscribe or manual (default manual)",
    )
    add.add_argument("--detail", default="", help="a note kept with the entry")
    add.set_defaults(client_command=_suppressions_add)
    delete = suppressions_sub.add_parser(
        "delete", parents=[client], help="stop suppressing an address"
    )
    delete.add_argument("address", metavar="ADDRESS")
    delete.set_defaults(client_command=_suppressions_delete)


def _connection_flags(*, token: bool, timeout: float | None) -> argparse.ArgumentParser:
    """Where the server is and how to reach it: shared by every client command."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--server",
        help="host:port of the server (env MAILSVC_SERVER; default from MAILSVC_LISTEN, "
        f"else {DEFAULT_SERVER})",
    )
    if token:
        group.add_argument(
            "--token", help="bearer token, e.g. from `mailsvc token` (env MAILSVC_TOKEN)"
        )
    group.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=timeout,
        help=f"seconds to wait for the reply (default {timeout:g})"
        if timeout
        else "stop after this many seconds (default: run until interrupted)",
    )
    tls = parent.add_argument_group("TLS (any of these turns TLS on)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system CAs")
    tls.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting only the CAs in FILE")
    tls.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS")
    tls.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    tls.add_argument(
        "--tls-server-name", metavar="NAME", help="name to check in the server's certificate"
    )
    return parent


def _recipient_flags(parser: argparse.ArgumentParser, *, to_required: bool) -> None:
    parser.add_argument(
        "--to", action="append", required=to_required, default=[], help="To address (repeatable)"
    )
    parser.add_argument("--cc", action="append", default=[], help="Cc address (repeatable)")
    parser.add_argument("--bcc", action="append", default=[], help="Bcc address (repeatable)")


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _timestamp(value: str) -> Timestamp:
    """RFC 3339, or +N with a unit (s, m, h, d) from now."""
    stamp = Timestamp()
    if value.startswith("+"):
        number, unit = value[1:], "s"
        if number and number[-1] in _DURATION_UNITS:
            number, unit = number[:-1], number[-1]
        try:
            seconds = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a duration: {value!r}") from None
        stamp.GetCurrentTime()
        stamp.FromNanoseconds(stamp.ToNanoseconds() + int(seconds * 1e9))
        return stamp
    try:
        stamp.FromJsonString(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time or +duration: {value!r}") from None
    return stamp


def _enum_value(enum: Any, prefix: str, value: str) -> int:
    name = value.strip().upper()
    try:
        return int(enum.Value(name if name.startswith(prefix) else prefix + name))
    except ValueError:
        names = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys()[1:])
        raise argparse.ArgumentTypeError(f"{value!r} is not one of: {names}") from None


def _status(value: str) -> int:
    return _enum_value(mail_pb2.MessageStatus, "MESSAGE_STATUS_", value)


def _suppression_reason(value: str) -> int:
    return _enum_value(suppression_pb2.SuppressionReason, "SUPPRESSION_REASON_", value)


# --- running a command -----------------------------------------------------------------------


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run the client command `args` names; report failures on stderr and return the exit code."""
    handler: Handler = args.client_command
    # gRPC's C core logs failed TLS handshakes and the like on stderr, ahead of our own
    # `CODE: message` line, which says it all. GRPC_VERBOSITY=info brings them back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc

    try:
        return handler(args, environ)
    except UsageError as exc:
        print(f"mailsvc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        _report(exc, token_given=bool(_token(args, environ)))
        return EXIT_RPC_ERROR


def _report(exc: grpc.RpcError, *, token_given: bool) -> None:
    import grpc

    code = exc.code()
    print(f"{code.name}: {exc.details()}", file=sys.stderr)
    for violation in _field_violations(exc):
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if code == grpc.StatusCode.UNAUTHENTICATED and not token_given:
        print("  (no token given: pass --token or set MAILSVC_TOKEN)", file=sys.stderr)


def _field_violations(
    exc: grpc.RpcError,
) -> list[error_details_pb2.BadRequest.FieldViolation]:
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(exc)
    except (ValueError, AttributeError):  # no call behind the error, or inconsistent trailers
        return []
    violations: list[error_details_pb2.BadRequest.FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
    return violations


def _print_json(message: Message) -> int:
    print(json_format.MessageToJson(message))
    return 0


def _server(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.server:
        return str(args.server)
    if environ.get("MAILSVC_SERVER"):
        return environ["MAILSVC_SERVER"]
    # On the server's own host, reach it where `mailsvc serve` listens.
    listen = environ.get("MAILSVC_LISTEN") or DEFAULT_SERVER
    host, _, port = listen.rpartition(":")
    return f"{'127.0.0.1' if host in ('0.0.0.0', '', '[::]') else host}:{port}"


@contextmanager
def _channel(args: argparse.Namespace, environ: Mapping[str, str]) -> Iterator[grpc.Channel]:
    import grpc

    target = _server(args, environ)
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        with grpc.insecure_channel(target) as channel:
            yield channel
        return
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_bytes(args.tls_ca) if args.tls_ca else None,
        private_key=_read_bytes(args.tls_key) if args.tls_key else None,
        certificate_chain=_read_bytes(args.tls_cert) if args.tls_cert else None,
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    with grpc.secure_channel(target, credentials, options=options) as channel:
        yield channel


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    token = str(getattr(args, "token", None) or environ.get("MAILSVC_TOKEN") or "").strip()
    if token[:7].lower() == "bearer ":  # tolerate a pasted header value
        token = token[7:].strip()
    return token


def _metadata(args: argparse.Namespace, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    token = _token(args, environ)
    if not token:
        return []  # the server answers UNAUTHENTICATED, and run() adds a hint
    if not all("!" <= c <= "~" for c in token):
        # Say what is wrong without echoing it: the token is a secret.
        raise UsageError("the token has spaces or characters a header cannot carry")
    return [("authorization", f"Bearer {token}")]


def _call(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of every authenticated call: deadline and token."""
    return {"timeout": args.timeout, "metadata": _metadata(args, environ)}


# --- input -----------------------------------------------------------------------------------


def _read_bytes(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_text(path: str) -> str:
    data = _read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None


def _mask(groups: Sequence[str] | None) -> FieldMask:
    return FieldMask(paths=[p.strip() for g in groups or () for p in g.split(",") if p.strip()])


def _parameter_value(text: str) -> Any:
    """JSON when it parses (3, true, {"a": 1}), else the text itself; never NaN or Infinity."""

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError:
        return text


def _parameters(pairs: Sequence[str]) -> Struct:
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param wants NAME=VALUE, got {pair!r}")
        values[name.strip()] = _parameter_value(value)
    parameters = Struct()
    parameters.update(values)
    return parameters


# --- the commands ----------------------------------------------------------------------------


def _settings_get(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import settings_pb2_grpc

    with _channel(args, environ) as channel:
        reply = settings_pb2_grpc.SettingsServiceStub(channel).GetMailSettings(
            settings_pb2.GetMailSettingsRequest(), **_call(args, environ)
        )
    return _print_json(reply)


def _settings_put(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import settings_pb2_grpc

    name = "stdin" if args.file == "-" else args.file
    settings = settings_pb2.MailSettings()
    try:
        json_format.Parse(_read_text(args.file), settings)
    except json_format.ParseError as exc:
        raise UsageError(f"{name} is not MailSettings JSON: {exc}") from None
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings, update_mask=_mask(args.mask), etag=args.etag
    )
    with _channel(args, environ) as channel:
        reply = settings_pb2_grpc.SettingsServiceStub(channel).UpdateMailSettings(
            request, **_call(args, environ)
        )
    return _print_json(reply)


def _send(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import mail_pb2_grpc

    if args.text_file == "-" and args.html_file == "-":
        raise UsageError("only one of --text-file and --html-file can be - (stdin)")
    text = _read_text(args.text_file) if args.text_file else args.text
    html = _read_text(args.html_file) if args.html_file else args.html
    if text is None and html is None:
        raise UsageError("give a body: --text, --text-file, --html or --html-file")
    attachments = [
        mail_pb2.Attachment(filename=Path(path).name, content=_read_bytes(path))
        for path in args.attach
    ]
    request = mail_pb2.SendMailRequest(
        to=args.to,
        cc=args.cc,
        bcc=args.bcc,
        subject=args.subject,
        text=text or "",
        html=html or "",
        reply_to=args.reply_to,
        attachments=attachments,
        idempotency_key=args.idempotency_key,
        queue=args.queue,
    )
    if args.send_at is not None:
        request.send_at.CopyFrom(args.send_at)
    with _channel(args, environ) as channel:
        reply = mail_pb2_grpc.MailServiceStub(channel).SendMail(request, **_call(args, environ))
    return _print_json(reply)


def _render(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import mail_pb2_grpc

    request = mail_pb2.RenderTemplateRequest(
        template_name=args.template,
        parameters=_parameters(args.param),
        to=args.to,
        cc=args.cc,
        bcc=args.bcc,
    )
    with _channel(args, environ) as channel:
        reply = mail_pb2_grpc.MailServiceStub(channel).RenderTemplate(
            request, **_call(args, environ)
        )
    return _print_json(reply)


def _health(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args, environ) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_RPC_ERROR


def _messages_list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import mail_pb2_grpc

    request = mail_pb2.ListMessagesRequest(
        page_size=args.page_size,
        page_token=args.page_token,
        status=args.status or mail_pb2.MESSAGE_STATUS_UNSPECIFIED,
        recipient=args.recipient,
        caller=args.caller,
    )
    everything = mail_pb2.ListMessagesResponse()
    with _channel(args, environ) as channel:
        stub = mail_pb2_grpc.MailServiceStub(channel)
        while True:
            reply = stub.ListMessages(request, **_call(args, environ))
            if not args.all:
                return _print_json(reply)
            everything.messages.extend(reply.messages)
            if not reply.next_page_token:
                return _print_json(everything)
            request.page_token = reply.next_page_token


def _messages_get(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import mail_pb2_grpc

    with _channel(args, environ) as channel:
        reply = mail_pb2_grpc.MailServiceStub(channel).GetMessage(
            mail_pb2.GetMessageRequest(id=args.id), **_call(args, environ)
        )
    return _print_json(reply)


def _messages_cancel(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import mail_pb2_grpc

    with _channel(args, environ) as channel:
        reply = mail_pb2_grpc.MailServiceStub(channel).CancelMessage(
            mail_pb2.CancelMessageRequest(id=args.id), **_call(args, environ)
        )
    return _print_json(reply)


def _messages_watch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import grpc

    from mailsvc.v1 import mail_pb2_grpc

    with _channel(args, environ) as channel:
        stream = mail_pb2_grpc.MailServiceStub(channel).WatchMessages(
            mail_pb2.WatchMessagesRequest(id=args.id), **_call(args, environ)
        )
        try:
            stream.initial_metadata()  # the server sends it once the watch is live
            print("watching; events follow, one JSON object a line", file=sys.stderr, flush=True)
            for event in stream:
                print(json_format.MessageToJson(event, indent=None), flush=True)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # --timeout ran out: done
                raise
        except KeyboardInterrupt:
            stream.cancel()
    return 0


def _suppressions_list(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import suppression_pb2_grpc

    request = suppression_pb2.ListSuppressionsRequest(
        page_size=args.page_size, page_token=args.page_token
    )
    everything = suppression_pb2.ListSuppressionsResponse()
    with _channel(args, environ) as channel:
        stub = suppression_pb2_grpc.SuppressionServiceStub(channel)
        while True:
            reply = stub.ListSuppressions(request, **_call(args, environ))
            if not args.all:
                return _print_json(reply)
            everything.suppressions.extend(reply.suppressions)
            if not reply.next_page_token:
                return _print_json(everything)
            request.page_token = reply.next_page_token


def _suppressions_add(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import suppression_pb2_grpc

    entry = suppression_pb2.Suppression(
        address=args.address, reason=args.reason, detail=args.detail
    )
    with _channel(args, environ) as channel:
        reply = suppression_pb2_grpc.SuppressionServiceStub(channel).AddSuppression(
            suppression_pb2.AddSuppressionRequest(suppression=entry), **_call(args, environ)
        )
    return _print_json(reply)


def _suppressions_delete(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mailsvc.v1 import suppression_pb2_grpc

    with _channel(args, environ) as channel:
        suppression_pb2_grpc.SuppressionServiceStub(channel).DeleteSuppression(
            suppression_pb2.DeleteSuppressionRequest(address=args.address),
            **_call(args, environ),
        )
    print(f"{args.address} is no longer suppressed")
    return 0
