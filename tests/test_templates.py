"""Templated mail, end to end: SendTemplatedMail and RenderTemplate against the real server.

Covers the sandboxed Jinja2 rendering (autoescaped html, raw subject/text/addresses), typed
parameters, template roles, recipient validation of rendered fields, the checks made when
templates are stored, hostile templates, and that rendering reuses the compiled templates.
"""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    SUPERADMIN,
    USER,
    Server,
    SmtpSink,
    auth,
    details,
    make_token,
    smtp_settings,
)
from tests.helpers import (
    Metadata,
    addresses,
    assert_error,
    body,
    expect_error,
    get_settings,
    render,
    send_templated,
)

SENDER = "sender@example.com"
RCPT = "rcpt@example.com"
# Python internals that must never reach a client in an error message.
INTERNALS = ("__", "Traceback", "object at 0x", "<class")


# --- fixtures (conftest's shared_server and shared_sink serve the well-behaved cases) ------------


@pytest.fixture
def sink(shared_sink: SmtpSink) -> SmtpSink:
    """The module's SMTP sink, emptied for this test."""
    with shared_sink.handler.lock:
        shared_sink.handler.received.clear()
    return shared_sink


# --- helpers -------------------------------------------------------------------------------------


def configure(
    server: Server, sink: SmtpSink, templates: dict[str, settings_pb2.MailTemplate]
) -> settings_pb2.MailSettings:
    """Replace the settings: SMTP to `sink`, SENDER as default From, these templates."""
    return server.put_settings(
        settings_pb2.MailSettings(
            default_from=SENDER, smtp=smtp_settings(sink), templates=templates
        )
    )


def send_fails(
    server: Server,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    metadata: Metadata = SUPERADMIN,
    **fields: Any,
) -> Any:
    """The grpc.RpcError SendTemplatedMail ends with (it must fail)."""
    with pytest.raises(grpc.RpcError) as caught:
        send_templated(server, name, params, metadata=metadata, **fields)
    return caught.value


def render_fails(
    server: Server,
    name: str,
    params: dict[str, Any] | None = None,
    *,
    metadata: Metadata = SUPERADMIN,
    **fields: Any,
) -> Any:
    """The grpc.RpcError RenderTemplate ends with (it must fail)."""
    with pytest.raises(grpc.RpcError) as caught:
        render(server, name, params, metadata=metadata, **fields)
    return caught.value


def assert_code(err: Any, code: grpc.StatusCode) -> None:
    assert err.code() == code, f"{err.code()}: {err.details()}"


def assert_clean(err: Any) -> None:
    message = err.details() or ""
    for marker in INTERNALS:
        assert marker not in message, f"{marker!r} in error message {message!r}"


def assert_nothing_sent(sink: SmtpSink) -> None:
    # No wait: a mail handed over by mistake reaches the sink before the call returns.
    assert sink.received == []


def only_mail(sink: SmtpSink) -> tuple[list[str], EmailMessage]:
    received = sink.wait_for(1)
    assert len(received) == 1
    return received[0].rcpt_tos, received[0].message


def template(**fields: Any) -> settings_pb2.MailTemplate:
    """A template with one fixed recipient and a text body, changed by `fields`."""
    values: dict[str, Any] = {"to": [RCPT], "subject": "Hello", "text": "Hi"}
    values.update(fields)
    return settings_pb2.MailTemplate(**values)


# --- rendering and delivery ----------------------------------------------------------------------

WELCOME = settings_pb2.MailTemplate(
    to=["{{ name|lower }}@example.com"],
    subject="Welcome {{ name }}, {{ count }} new",
    text=(
        "Hi {{ name }}\n"
        "{% for item in items %}- {{ item }}\n{% endfor %}"
        "{% if flag %}flag on{% else %}flag off{% endif %} count={{ count }}\n"
    ),
    html=(
        "<p>Hi {{ name }}</p><ul>{% for item in items %}<li>{{ item }}</li>{% endfor %}</ul>"
        "{% if flag %}<b>on</b>{% endif %}<i>{{ count }}</i>"
    ),
    model={"name": "string", "count": "integer", "flag": "boolean", "items": "array"},
)
WELCOME_PARAMS: dict[str, Any] = {
    "name": "Alice",
    "count": 3,
    "flag": True,
    "items": ["apples", "pears"],
}


def test_typed_model_renders_and_arrives(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"welcome": WELCOME})

    response = send_templated(shared_server, "welcome", WELCOME_PARAMS)

    assert response.transport == "smtp"
    assert list(response.recipients) == ["alice@example.com"]
    rcpt_tos, message = only_mail(sink)
    assert rcpt_tos == ["alice@example.com"]
    assert message["From"] == SENDER
    assert addresses(message, "To") == ["alice@example.com"]
    assert message["Subject"] == "Welcome Alice, 3 new"
    assert message["Message-ID"] == response.message_id
    text = body(message, "plain")
    assert text.startswith("Hi Alice\n- apples\n- pears\nflag on count=3")
    assert "3.0" not in text
    html = body(message, "html")
    assert "<p>Hi Alice</p><ul><li>apples</li><li>pears</li></ul><b>on</b><i>3</i>" in html


def test_boolean_false_and_empty_array(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"welcome": WELCOME})

    rendered = render(shared_server, "welcome", {**WELCOME_PARAMS, "flag": False, "items": []})

    assert rendered.text == "Hi Alice\nflag off count=3"  # Jinja drops one final newline


def test_number_and_structured_types_render(shared_server: Server, sink: SmtpSink) -> None:
    numbers = template(
        text=(
            "i={{ i }} l={{ l }} f={{ f }} d={{ d }} sum={{ i + l }} "
            "o={{ o.name }} a={{ a|join(',') }}"
        ),
        model={
            "i": "integer",
            "l": "long",
            "f": "float",
            "d": "double",
            "o": "object",
            "a": "array",
        },
    )
    configure(shared_server, sink, {"numbers": numbers})

    rendered = render(
        shared_server,
        "numbers",
        {
            "i": 3,
            "l": 1234567890123,
            "f": 2.5,
            "d": 0.25,
            "o": {"name": "obj"},
            "a": ["x", "y"],
        },
    )

    assert rendered.text == "i=3 l=1234567890123 f=2.5 d=0.25 sum=1234567890126 o=obj a=x,y"


def test_html_is_autoescaped_subject_and_text_are_not(
    shared_server: Server, sink: SmtpSink
) -> None:
    configure(
        shared_server,
        sink,
        {
            "escape": template(
                subject="Re: {{ v }}",
                text="T {{ v }}",
                html="<p>{{ v }}</p>",
                model={"v": "string"},
            )
        },
    )

    send_templated(shared_server, "escape", {"v": "<b>x</b> & co"})

    _, message = only_mail(sink)
    assert message["Subject"] == "Re: <b>x</b> & co"
    assert body(message, "plain").rstrip("\n") == "T <b>x</b> & co"
    html = body(message, "html")
    assert "<p>&lt;b&gt;x&lt;/b&gt; &amp; co</p>" in html
    assert "<b>x</b>" not in html


def test_request_recipients_are_added_bcc_only_in_envelope(
    shared_server: Server, sink: SmtpSink
) -> None:
    configure(
        shared_server,
        sink,
        {
            "team": template(
                to=["{{ who }}@example.com"],
                cc=["tc@example.com"],
                bcc=["tb@example.com"],
                model={"who": "string"},
            )
        },
    )

    response = send_templated(
        shared_server,
        "team",
        {"who": "t"},
        to=["r@example.com"],
        cc=["rc@example.com"],
        bcc=["rb@example.com"],
    )

    everyone = {
        "t@example.com",
        "r@example.com",
        "tc@example.com",
        "rc@example.com",
        "tb@example.com",
        "rb@example.com",
    }
    rcpt_tos, message = only_mail(sink)
    assert set(rcpt_tos) == everyone
    assert set(response.recipients) == everyone
    assert set(addresses(message, "To")) == {"t@example.com", "r@example.com"}
    assert set(addresses(message, "Cc")) == {"tc@example.com", "rc@example.com"}
    assert "Bcc" not in message
    raw = sink.received[0].raw
    assert b"tb@example.com" not in raw
    assert b"rb@example.com" not in raw


def test_template_without_recipients_uses_the_request_ones(
    shared_server: Server, sink: SmtpSink
) -> None:
    configure(shared_server, sink, {"open": template(to=[])})

    send_templated(shared_server, "open", to=["only@example.com"])

    rcpt_tos, message = only_mail(sink)
    assert rcpt_tos == ["only@example.com"]
    assert addresses(message, "To") == ["only@example.com"]


def test_no_recipient_at_all_is_invalid(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"open": template(to=[])})

    err = send_fails(shared_server, "open")

    assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
    assert_nothing_sent(sink)


def test_from_address_template_is_the_from(shared_server: Server, sink: SmtpSink) -> None:
    configure(
        shared_server,
        sink,
        {
            "signed": template(
                from_address="{{ team }} Team <{{ team|lower }}@example.com>",
                model={"team": "string"},
            )
        },
    )

    send_templated(shared_server, "signed", {"team": "Sales"})

    _, message = only_mail(sink)
    assert parseaddr(message["From"]) == ("Sales Team", "sales@example.com")


def test_unknown_template_is_not_found(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"welcome": WELCOME})

    for err in (
        send_fails(shared_server, "nope", to=[RCPT]),
        render_fails(shared_server, "nope", to=[RCPT]),
    ):
        assert_code(err, grpc.StatusCode.NOT_FOUND)
    assert_nothing_sent(sink)


# --- roles ---------------------------------------------------------------------------------------

EDITOR = auth(make_token(["editor"], sub="ed"))
MARKETING = auth(make_token(["marketing"], sub="mk"))


@pytest.mark.parametrize(
    "caller", [MARKETING, ADMIN, USER], ids=["other-role", "admin", "plain-user"]
)
def test_caller_without_the_template_role_is_denied(
    shared_server: Server, sink: SmtpSink, caller: Metadata
) -> None:
    configure(
        shared_server,
        sink,
        {"restricted": template(subject="{{ s }}", model={"s": "string"}, roles=["editor"])},
    )
    # Parameters that would fail rendering: the role check must come first.
    bad = {"s": 1, "unknown": "x"}

    for err in (
        send_fails(shared_server, "restricted", bad, metadata=caller),
        send_fails(shared_server, "restricted", {"s": "ok"}, metadata=caller),
        render_fails(shared_server, "restricted", bad, metadata=caller),
    ):
        assert_code(err, grpc.StatusCode.PERMISSION_DENIED)
        assert_clean(err)
    assert_nothing_sent(sink)


@pytest.mark.parametrize(
    "caller",
    [
        EDITOR,
        auth(make_token(["marketing", "editor"], sub="both")),
        SUPERADMIN,
    ],
    ids=["editor", "several-roles", "superadmin"],
)
def test_caller_with_the_template_role_may_send(
    shared_server: Server, sink: SmtpSink, caller: Metadata
) -> None:
    configure(
        shared_server,
        sink,
        {"restricted": template(subject="{{ s }}", model={"s": "string"}, roles=["editor"])},
    )

    assert render(shared_server, "restricted", {"s": "ok"}, metadata=caller).subject == "ok"
    send_templated(shared_server, "restricted", {"s": "ok"}, metadata=caller)

    _, message = only_mail(sink)
    assert message["Subject"] == "ok"


@pytest.mark.parametrize("caller", [USER, MARKETING, ADMIN], ids=["plain-user", "other", "admin"])
def test_user_role_lets_any_caller_send(
    shared_server: Server, sink: SmtpSink, caller: Metadata
) -> None:
    configure(shared_server, sink, {"public": template(roles=["user"])})

    send_templated(shared_server, "public", metadata=caller)

    assert len(sink.wait_for(1)) == 1


def test_template_without_roles_is_superadmin_only(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"private": template(roles=[])})

    assert_code(
        send_fails(shared_server, "private", metadata=ADMIN), grpc.StatusCode.PERMISSION_DENIED
    )
    assert_nothing_sent(sink)
    send_templated(shared_server, "private", metadata=SUPERADMIN)
    assert len(sink.wait_for(1)) == 1


# --- parameters ----------------------------------------------------------------------------------

TYPED = template(
    text="{{ s }} {{ i }} {{ l }} {{ f }} {{ d }} {{ b }} {{ o }} {{ a }}",
    model={
        "s": "string",
        "i": "integer",
        "l": "long",
        "f": "float",
        "d": "double",
        "b": "boolean",
        "o": "object",
        "a": "array",
    },
)
TYPED_OK: dict[str, Any] = {
    "s": "x",
    "i": 1,
    "l": 2,
    "f": 1.5,
    "d": 2.5,
    "b": True,
    "o": {"k": "v"},
    "a": ["y"],
}


def test_typed_baseline_is_sent(shared_server: Server, sink: SmtpSink) -> None:
    """The valid parameters each case below spoils one of."""
    configure(shared_server, sink, {"typed": TYPED})

    send_templated(shared_server, "typed", TYPED_OK)

    assert len(sink.wait_for(1)) == 1


WRONG_TYPES = [
    ("s", 1),
    ("s", True),
    ("s", ["x"]),
    ("s", {"k": "v"}),
    ("s", None),
    ("i", 1.5),
    ("i", "1"),
    ("i", True),
    ("i", None),
    ("l", 2.5),
    ("l", "2"),
    ("l", False),
    ("f", "1.5"),
    ("f", True),
    ("f", [1.5]),
    ("d", "2.5"),
    ("d", False),
    ("d", {"v": 2.5}),
    ("b", "true"),
    ("b", 1),
    ("b", 0),
    ("b", None),
    ("o", "x"),
    ("o", [1]),
    ("o", 1),
    ("a", "x"),
    ("a", {"k": 1}),
    ("a", 1),
]


@pytest.mark.parametrize(
    ("name", "value"),
    [pytest.param(n, v, id=f"{TYPED.model[n]}-{v!r}") for n, v in WRONG_TYPES],
)
def test_wrong_parameter_type_is_named(
    shared_server: Server, sink: SmtpSink, name: str, value: Any
) -> None:
    configure(shared_server, sink, {"typed": TYPED})
    params = {**TYPED_OK, name: value}

    for err in (
        send_fails(shared_server, "typed", params),
        render_fails(shared_server, "typed", params),
    ):
        assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
        assert set(details(err)["violations"]) == {f"parameters.{name}"}
    assert_nothing_sent(sink)


def test_unknown_parameter_is_named(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"typed": TYPED})

    err = send_fails(shared_server, "typed", {**TYPED_OK, "zzz": "extra"})

    assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details(err)["violations"]) == {"parameters.zzz"}
    assert_nothing_sent(sink)


@pytest.mark.parametrize("name", ["s", "i", "o", "a"])
def test_missing_parameter_is_named(shared_server: Server, sink: SmtpSink, name: str) -> None:
    configure(shared_server, sink, {"typed": TYPED})
    params = {k: v for k, v in TYPED_OK.items() if k != name}

    err = send_fails(shared_server, "typed", params)

    assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details(err)["violations"]) == {f"parameters.{name}"}
    assert_nothing_sent(sink)


def test_every_parameter_error_is_named_together(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"typed": TYPED})
    params = {k: v for k, v in TYPED_OK.items() if k != "s"}
    params.update(i="one", zzz=1)

    err = send_fails(shared_server, "typed", params)

    assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(details(err)["violations"]) == {"parameters.s", "parameters.i", "parameters.zzz"}
    assert_nothing_sent(sink)


def test_strict_undefined_attribute_of_an_object(shared_server: Server, sink: SmtpSink) -> None:
    """StrictUndefined: a missing key is an error, never an empty string."""
    configure(
        shared_server,
        sink,
        {"strict": template(text="Hi {{ user.name }}!", model={"user": "object"})},
    )

    err = send_fails(shared_server, "strict", {"user": {"other": "x"}})

    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert_clean(err)
    assert_nothing_sent(sink)


def test_immutable_sandbox_refuses_mutation(shared_server: Server, sink: SmtpSink) -> None:
    configure(
        shared_server,
        sink,
        {"mutate": template(text="{{ items.append(4) }}{{ items }}", model={"items": "array"})},
    )

    err = send_fails(shared_server, "mutate", {"items": [1, 2, 3]})

    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
    assert_clean(err)
    assert_nothing_sent(sink)


# --- rendered recipients and headers are validated -------------------------------------------


@pytest.mark.parametrize("field", ["to", "cc", "bcc"])
@pytest.mark.parametrize(
    "value",
    ["a@x.test, b@y.test", "Eve <a@x.test>, b@y.test", "a@x.test; b@y.test", "a@x.test b@y.test"],
)
def test_parameter_rendering_two_addresses_is_invalid(
    shared_server: Server, sink: SmtpSink, field: str, value: str
) -> None:
    fields: dict[str, Any] = {"to": [RCPT], field: ["{{ who }}"], "model": {"who": "string"}}
    configure(shared_server, sink, {"inject": template(**fields)})

    for err in (
        send_fails(shared_server, "inject", {"who": value}),
        render_fails(shared_server, "inject", {"who": value}),
    ):
        assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
        assert details(err)["violations"]
    assert_nothing_sent(sink)


CRLF = ["x\r\nBcc: evil@x.test", "x\nBcc: evil@x.test", "x\rBcc: evil@x.test"]


@pytest.mark.parametrize("value", CRLF, ids=["crlf", "lf", "cr"])
def test_crlf_rendered_into_subject_is_invalid(
    shared_server: Server, sink: SmtpSink, value: str
) -> None:
    configure(
        shared_server,
        sink,
        {"inject": template(subject="Hello {{ name }}", model={"name": "string"})},
    )

    for err in (
        send_fails(shared_server, "inject", {"name": value}),
        render_fails(shared_server, "inject", {"name": value}),
    ):
        assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
        assert details(err)["violations"]
    assert_nothing_sent(sink)


@pytest.mark.parametrize("field", ["to", "cc", "bcc", "from_address"])
@pytest.mark.parametrize("value", [f"a@x.test{v[1:]}" for v in CRLF], ids=["crlf", "lf", "cr"])
def test_crlf_rendered_into_an_address_is_invalid(
    shared_server: Server, sink: SmtpSink, field: str, value: str
) -> None:
    fields: dict[str, Any] = {"model": {"who": "string"}}
    fields[field] = "{{ who }}" if field == "from_address" else ["{{ who }}"]
    configure(shared_server, sink, {"inject": template(**fields)})

    for err in (
        send_fails(shared_server, "inject", {"who": value}),
        render_fails(shared_server, "inject", {"who": value}),
    ):
        assert_code(err, grpc.StatusCode.INVALID_ARGUMENT)
        assert details(err)["violations"]
    assert_nothing_sent(sink)


# --- RenderTemplate ------------------------------------------------------------------------------


def test_render_returns_every_field_and_sends_nothing(
    shared_server: Server, sink: SmtpSink
) -> None:
    configure(
        shared_server,
        sink,
        {
            "all": settings_pb2.MailTemplate(
                from_address="{{ team|lower }}@example.com",
                to=["{{ user }}@example.com"],
                cc=["{{ team|lower }}-cc@example.com"],
                bcc=["audit-{{ n }}@example.com"],
                subject="{{ n }} for <{{ user }}>",
                text="Dear {{ user }} <{{ team }}>",
                html="<p>Dear {{ user }} {{ tag }}</p>",
                model={"team": "string", "user": "string", "n": "integer", "tag": "string"},
            )
        },
    )

    rendered = render(
        shared_server,
        "all",
        {"team": "Ops", "user": "bob", "n": 7, "tag": "<i>"},
        to=["extra@example.com"],
        cc=["extra-cc@example.com"],
        bcc=["extra-bcc@example.com"],
    )

    assert rendered == mail_pb2.RenderedMail(
        from_address="ops@example.com",
        to=["bob@example.com", "extra@example.com"],
        cc=["ops-cc@example.com", "extra-cc@example.com"],
        bcc=["audit-7@example.com", "extra-bcc@example.com"],
        subject="7 for <bob>",
        text="Dear bob <Ops>",
        html="<p>Dear bob &lt;i&gt;</p>",
    )
    assert_nothing_sent(sink)


def test_render_without_from_uses_default_from(shared_server: Server, sink: SmtpSink) -> None:
    configure(shared_server, sink, {"plain": template()})

    rendered = render(shared_server, "plain")

    assert rendered.from_address == SENDER
    assert list(rendered.to) == [RCPT]
    assert_nothing_sent(sink)


# --- checks when templates are stored ------------------------------------------------------------

BROKEN = [
    pytest.param(
        "bad",
        template(text="Hello\n{{ name + }}\nbye", model={"name": "string"}),
        "settings.templates.bad.text",
        "line 2",
        id="syntax-text-line-2",
    ),
    pytest.param(
        "bad",
        template(html="<p>\n{{ name }}\n{% if %}</p>", model={"name": "string"}),
        "settings.templates.bad.html",
        "line 3",
        id="syntax-html-line-3",
    ),
    pytest.param(
        "bad",
        template(subject="{{ name }"),
        "settings.templates.bad.subject",
        "line 1",
        id="syntax-subject",
    ),
    pytest.param(
        "bad",
        template(from_address="{% if %}x@example.com"),
        "settings.templates.bad.from_address",
        "line 1",
        id="syntax-from",
    ),
    pytest.param(
        "bad",
        template(to=[RCPT, "{{ who }"], model={"who": "string"}),
        "settings.templates.bad.to[1]",
        "line 1",
        id="syntax-to-1",
    ),
    pytest.param(
        "bad",
        template(text="a\n{% for x in items %}\nb\n{% endif %}", model={"items": "array"}),
        "settings.templates.bad.text",
        "line 4",
        id="mismatched-block-line-4",
    ),
    pytest.param(
        "bad",
        template(text="Hi\n{{ nobody }}", model={}),
        "settings.templates.bad.text",
        "line 2",
        id="undeclared-variable-line-2",
    ),
    pytest.param(
        "bad",
        template(bcc=["{{ who }}@example.com"], model={"other": "string"}),
        "settings.templates.bad.bcc[0]",
        "line 1",
        id="undeclared-variable-bcc",
    ),
    pytest.param(
        "bad",
        template(text="{{ n }}", model={"n": "int"}),
        "settings.templates.bad.model.n",
        None,
        id="model-type-int",
    ),
    pytest.param(
        "bad",
        template(text="{{ n }}", model={"n": "String"}),
        "settings.templates.bad.model.n",
        None,
        id="model-type-case",
    ),
    pytest.param(
        "bad",
        template(text="{{ n }}", model={"n": ""}),
        "settings.templates.bad.model.n",
        None,
        id="model-type-empty",
    ),
    pytest.param("bad name!", template(), "settings.templates.bad name!", None, id="name-chars"),
    pytest.param("dot.ted", template(), "settings.templates.dot.ted", None, id="name-dot"),
    pytest.param("a" * 65, template(), "settings.templates." + "a" * 65, None, id="name-65"),
    pytest.param("naïve", template(), "settings.templates.naïve", None, id="name-non-ascii"),
]


@pytest.mark.parametrize(("name", "broken", "field", "line"), BROKEN)
def test_broken_template_is_refused_and_nothing_written(
    shared_server: Server,
    sink: SmtpSink,
    name: str,
    broken: settings_pb2.MailTemplate,
    field: str,
    line: str | None,
) -> None:
    stored = configure(shared_server, sink, {"good": WELCOME})
    path = shared_server.data_dir / "settings.json"
    before = path.read_bytes()
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(
            default_from=SENDER,
            smtp=smtp_settings(sink),
            templates={"good": WELCOME, name: broken},
        )
    )

    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        shared_server.settings.UpdateMailSettings,
        request,
        metadata=SUPERADMIN,
        timeout=10,
    )

    violations = details(err)["violations"]
    assert field in violations, violations
    if line is not None:
        assert line in violations[field], violations[field]
    assert path.read_bytes() == before
    current = get_settings(shared_server)
    assert current.etag == stored.etag
    assert set(current.templates) == {"good"}


def test_broken_template_by_mask_is_refused(shared_server: Server, sink: SmtpSink) -> None:
    stored = configure(shared_server, sink, {"good": WELCOME})
    path = shared_server.data_dir / "settings.json"
    before = path.read_bytes()
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(templates={"bad": template(text="x\n\n{{ 1 + }}")}),
        update_mask=field_mask_pb2.FieldMask(paths=["templates.bad"]),
    )

    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        shared_server.settings.UpdateMailSettings,
        request,
        metadata=SUPERADMIN,
        timeout=10,
    )

    violations = details(err)["violations"]
    assert "line 3" in violations["settings.templates.bad.text"]
    assert path.read_bytes() == before
    current = get_settings(shared_server)
    assert current.etag == stored.etag


# --- hostile templates ---------------------------------------------------------------------------

# Which defence stops each hostile template: SAVE, the checks when the template is stored
# (INVALID_ARGUMENT naming the field, nothing written); RENDER, the sandbox refusing an unsafe
# access when it runs (FAILED_PRECONDITION TEMPLATE_UNSAFE); or BOUND, a size, step or time
# bound hit while it runs (INVALID_ARGUMENT naming the template's field). Both run-time
# defences are fast and hold for SendTemplatedMail and RenderTemplate alike.
SAVE = "save"
RENDER = "render"
BOUND = "bound"

# Templates that reach for Python internals.
PRYING = [
    pytest.param("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}, SAVE, id="subclasses"),
    pytest.param("{{ cycler.__init__.__globals__ }}", {}, SAVE, id="cycler-globals"),
    pytest.param("{{ self._TemplateReference__context }}", {}, SAVE, id="self-context"),
    # The same, reached through declared parameters so the names pass the model check.
    pytest.param("{{ s.__class__.__mro__ }}", {"s": "string"}, SAVE, id="param-class"),
    pytest.param("{{ o|attr('__class__') }}", {"o": "object"}, RENDER, id="attr-filter"),
    pytest.param(
        "{{ o|attr('__cla' ~ 'ss__') }}", {"o": "object"}, RENDER, id="attr-filter-concat"
    ),
    pytest.param("{{ '{0.__class__}'.format(s) }}", {"s": "string"}, RENDER, id="str-format"),
    pytest.param(
        "{{ cycler.__init__.__globals__ }}", {"cycler": "object"}, SAVE, id="declared-cycler"
    ),
]
# Templates that would eat the CPU or the memory: they must fail fast, in the text field.
GREEDY = [
    pytest.param(
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        {},
        BOUND,
        id="nested-range-loops",
    ),
    pytest.param("{% for i in range(100000000) %}x{% endfor %}", {}, BOUND, id="long-range-loop"),
    pytest.param("{{ 'x' * 100000000 }}", {}, BOUND, id="repeat-string"),
    pytest.param("{{ s * 100000000 }}", {"s": "string"}, BOUND, id="repeat-param"),
    pytest.param("{{ 9 ** 999999999 }}", {}, BOUND, id="huge-power"),
    pytest.param("{{ ((((9 ** 64) ** 64) ** 64) ** 64) ** 64 }}", {}, BOUND, id="chained-powers"),
    # No range() and no output: only the parameters' size bounds the work (8 * 10**9 steps).
    pytest.param(
        "{% for a in xs %}{% for b in xs %}{% for c in xs %}{% endfor %}{% endfor %}{% endfor %}"
        "done",
        {"xs": "array"},
        BOUND,
        id="nested-parameter-loops",
    ),
]
HOSTILE = [
    *[
        pytest.param(*p.values, field, id=f"{p.id}-{field}")
        for p in PRYING
        for field in ("text", "html", "subject")
    ],
    *[pytest.param(*p.values, "text", id=p.id) for p in GREEDY],
]
HOSTILE_PARAMS: dict[str, Any] = {
    "s": "x",
    "o": {"k": "v"},
    "cycler": {"k": "v"},
    "xs": list(range(2000)),
}


@pytest.mark.slow
@pytest.mark.parametrize(("source", "model", "stage", "field"), HOSTILE)
def test_hostile_template_is_stopped_at_its_stage(
    server: Server, sink: SmtpSink, source: str, model: dict[str, str], stage: str, field: str
) -> None:
    configure(server, sink, {"ok": template()})
    path = server.data_dir / "settings.json"
    before = path.read_bytes()
    evil = template(model=model, **{field: source})
    store = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(
            default_from=SENDER,
            smtp=smtp_settings(sink),
            templates={"ok": template(), "evil": evil},
        )
    )

    if stage == SAVE:
        refused = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            server.settings.UpdateMailSettings,
            store,
            metadata=SUPERADMIN,
            timeout=20,
        )
        assert f"settings.templates.evil.{field}" in details(refused)["violations"]
        assert_clean(refused)
        assert path.read_bytes() == before
    else:
        server.settings.UpdateMailSettings(store, metadata=SUPERADMIN, timeout=20)
        params = {k: v for k, v in HOSTILE_PARAMS.items() if k in model}
        for call in (send_templated, render):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                call(server, "evil", params, timeout=20)
            assert time.monotonic() - started < 20
            if stage == RENDER:
                assert_error(caught.value, grpc.StatusCode.FAILED_PRECONDITION, "TEMPLATE_UNSAFE")
            else:
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"settings.templates.evil.{field}" in details(caught.value)["violations"]
            assert_clean(caught.value)

    # The server is still there and still sends.
    assert server.proc.poll() is None
    send_templated(server, "ok")
    rcpt_tos, message = only_mail(sink)
    assert rcpt_tos == [RCPT]
    assert message["Subject"] == "Hello"


# --- compiled once -------------------------------------------------------------------------------


def test_rendering_reuses_compiled_templates(tmp_path: Path) -> None:
    from mailsvc.store import SettingsStore
    from mailsvc.templates import TemplateEngine

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = settings_pb2.MailSettings(templates={"welcome": WELCOME})
    (data_dir / "settings.json").write_text(json_format.MessageToJson(settings))

    engine = TemplateEngine()
    store = SettingsStore(data_dir, engine)
    after_load = engine.compilations
    assert after_load > 0
    compiled = store.snapshot.templates["welcome"]

    for i in range(100):
        # As the server passes a Struct: every number a float.
        rendered = compiled.render(
            {"name": f"N{i}", "count": float(i), "flag": bool(i % 2), "items": ["a", "b"]}
        )
        assert rendered.subject == f"Welcome N{i}, {i} new"
        assert rendered.to == [f"n{i}@example.com"]

    assert engine.compilations == after_load
