"""End-to-end tests of SettingsService: defaults, updates, masks, etags, validation, files, ACL."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format
from mailsvc.v1 import settings_pb2

from tests.conftest import (
    ADMIN,
    MAILGUN_KEY,
    SMTP_PASSWORD,
    SUPERADMIN,
    USER,
    Server,
    auth,
    details,
    make_token,
)
from tests.helpers import Metadata, ServerFactory, expect_error
from tests.helpers import get_settings as get

AUDITOR = auth(make_token(["auditor"], sub="auditor"))
OPS = auth(make_token(["ops"], sub="ops-team"))
DENIED = grpc.StatusCode.PERMISSION_DENIED


# --- helpers ---------------------------------------------------------------------------------


def settings_path(server: Server) -> Path:
    return server.data_dir / "settings.json"


def update(
    server: Server,
    settings: settings_pb2.MailSettings,
    *paths: str,
    etag: str = "",
    metadata: Metadata = SUPERADMIN,
) -> settings_pb2.MailSettings:
    """UpdateMailSettings: a full replace without paths, else a masked update."""
    request = settings_pb2.UpdateMailSettingsRequest(settings=settings, etag=etag)
    request.update_mask.paths.extend(paths)
    reply: settings_pb2.MailSettings = server.settings.UpdateMailSettings(
        request, metadata=metadata, timeout=10
    )
    return reply


def delete(
    server: Server, etag: str = "", metadata: Metadata = SUPERADMIN
) -> settings_pb2.MailSettings:
    reply: settings_pb2.MailSettings = server.settings.DeleteMailSettings(
        settings_pb2.DeleteMailSettingsRequest(etag=etag), metadata=metadata, timeout=10
    )
    return reply


def get_acl(server: Server, metadata: Metadata = SUPERADMIN) -> settings_pb2.SettingsAcl:
    reply: settings_pb2.SettingsAcl = server.settings.GetSettingsAcl(
        settings_pb2.GetSettingsAclRequest(), metadata=metadata, timeout=10
    )
    return reply


def put_acl(
    server: Server, acl: settings_pb2.SettingsAcl, metadata: Metadata = SUPERADMIN
) -> settings_pb2.SettingsAcl:
    reply: settings_pb2.SettingsAcl = server.settings.UpdateSettingsAcl(
        settings_pb2.UpdateSettingsAclRequest(acl=acl), metadata=metadata, timeout=10
    )
    return reply


def template(subject: str = "Hello {{ name }}") -> settings_pb2.MailTemplate:
    return settings_pb2.MailTemplate(
        to=["someone@example.com"],
        subject=subject,
        text="Hi {{ name }}",
        model={"name": "string"},
    )


def welcome_template() -> settings_pb2.MailTemplate:
    return settings_pb2.MailTemplate(
        from_address="welcome@example.com",
        to=["{{ email }}"],
        cc=["cc@example.com"],
        bcc=["audit@example.com"],
        subject="Welcome {{ name }}",
        text="Hi {{ name }}, you are number {{ count }}.",
        html="<p>Hi {{ name }}</p>",
        model={"name": "string", "email": "string", "count": "integer"},
        roles=["user"],
    )


def full_settings() -> settings_pb2.MailSettings:
    return settings_pb2.MailSettings(
        enable_user_full_access=True,
        smtp=settings_pb2.SmtpSettings(
            host="smtp.example.com",
            port=2525,
            login="mailer",
            password=SMTP_PASSWORD,
            start_tls_required=True,
        ),
        mailgun=settings_pb2.MailgunSettings(
            domain="mg.example.com", key=MAILGUN_KEY, region=settings_pb2.EU
        ),
        templates={"welcome": welcome_template(), "bye": template("Bye {{ name }}")},
        authorized_roles=["mailer"],
        default_from="noreply@example.com",
    )


def public(settings: settings_pb2.MailSettings) -> settings_pb2.MailSettings:
    """What the service should answer for settings it stored: secrets replaced by flags."""
    out = settings_pb2.MailSettings()
    out.CopyFrom(settings)
    out.ClearField("etag")
    if out.HasField("smtp"):
        out.smtp.password_set = bool(settings.smtp.password)
        out.smtp.password = ""
    if out.HasField("mailgun"):
        out.mailgun.key_set = bool(settings.mailgun.key)
        out.mailgun.key = ""
    return out


def no_etag(settings: settings_pb2.MailSettings) -> settings_pb2.MailSettings:
    out = settings_pb2.MailSettings()
    out.CopyFrom(settings)
    out.ClearField("etag")
    return out


# --- defaults, round trips, persistence ------------------------------------------------------


def test_defaults_when_nothing_configured(server: Server) -> None:
    settings = get(server)
    assert not settings.enable_user_full_access
    assert not settings.HasField("smtp")
    assert not settings.HasField("mailgun")
    assert len(settings.templates) == 0
    assert list(settings.authorized_roles) == []
    assert settings.default_from == ""
    assert settings.etag != ""


def test_get_twice_without_write_gives_same_etag(server: Server) -> None:
    assert get(server).etag == get(server).etag


def test_full_replace_round_trip_and_restart(server: Server, server_factory: ServerFactory) -> None:
    stored = update(server, full_settings())
    assert no_etag(stored) == public(full_settings())
    assert stored.etag != ""

    fetched = get(server)
    assert no_etag(fetched) == public(full_settings())
    assert fetched.etag == stored.etag
    assert dict(fetched.templates) == {
        "welcome": welcome_template(),
        "bye": template("Bye {{ name }}"),
    }

    assert server.stop() == 0
    restarted = server_factory(data_dir=server.data_dir)
    after = get(restarted)
    assert no_etag(after) == public(full_settings())
    assert after.smtp.password_set
    assert after.mailgun.key_set


def test_hand_written_settings_file_in_origin_shape_is_loaded(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    document = {
        "enableUserFullAccess": True,
        "mailgun": {"domain": "mg.example.com", "key": MAILGUN_KEY},
        "smtp": {
            "host": "smtp.example.com",
            "login": "mailer",
            "password": SMTP_PASSWORD,
            "startTlsRequired": True,
            "sslOnConnect": True,
        },
        "templates": None,
    }
    path = data_dir / "settings.json"
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    server = server_factory(data_dir=data_dir)
    settings = get(server)
    assert settings.enable_user_full_access
    assert settings.smtp.host == "smtp.example.com"
    assert settings.smtp.login == "mailer"
    assert settings.smtp.start_tls_required
    assert settings.smtp.ssl_on_connect
    assert settings.smtp.password == ""
    assert settings.smtp.password_set
    assert settings.mailgun.domain == "mg.example.com"
    assert settings.mailgun.key == ""
    assert settings.mailgun.key_set
    assert len(settings.templates) == 0


# --- secrets ---------------------------------------------------------------------------------


def test_secrets_never_returned_nor_logged(server: Server) -> None:
    stored = update(server, full_settings())
    for settings in (stored, get(server)):
        assert settings.smtp.password == ""
        assert settings.smtp.password_set
        assert settings.mailgun.key == ""
        assert settings.mailgun.key_set

    # A rejected write that carries the secrets must not echo them either.
    bad = full_settings()
    bad.smtp.port = 70000
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, update, server, bad)
    shown = f"{err.details()} {details(err)}"
    assert SMTP_PASSWORD not in shown
    assert MAILGUN_KEY not in shown

    masked = settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(password=SMTP_PASSWORD))
    assert update(server, masked, "smtp.password").smtp.password == ""

    logs = server.logs()
    assert SMTP_PASSWORD not in logs
    assert MAILGUN_KEY not in logs


def test_full_replace_with_empty_secrets_keeps_stored_ones(server: Server) -> None:
    update(server, full_settings())
    again = full_settings()
    again.smtp.host = "smtp2.example.com"
    again.smtp.password = ""
    again.mailgun.key = ""
    stored = update(server, again)
    assert stored.smtp.host == "smtp2.example.com"
    assert stored.smtp.password_set
    assert stored.mailgun.key_set
    text = settings_path(server).read_text()
    assert SMTP_PASSWORD in text
    assert MAILGUN_KEY in text


def test_secret_is_dropped_with_its_parent(server: Server) -> None:
    update(server, full_settings())
    without_smtp = full_settings()
    without_smtp.ClearField("smtp")
    assert not update(server, without_smtp).HasField("smtp")
    assert SMTP_PASSWORD not in settings_path(server).read_text()

    smtp_again = full_settings()
    smtp_again.smtp.password = ""
    stored = update(server, smtp_again)
    assert stored.smtp.host == "smtp.example.com"
    assert not stored.smtp.password_set


# --- update masks ----------------------------------------------------------------------------


def test_mask_smtp_host_changes_only_the_host(server: Server) -> None:
    update(server, full_settings())
    patch = settings_pb2.MailSettings(
        smtp=settings_pb2.SmtpSettings(host="other.example.com", port=1, login="x"),
        default_from="ignored@example.com",
        enable_user_full_access=False,
    )
    stored = update(server, patch, "smtp.host")
    expected = public(full_settings())
    expected.smtp.host = "other.example.com"
    assert no_etag(stored) == expected
    assert no_etag(get(server)) == expected
    assert SMTP_PASSWORD in settings_path(server).read_text()


def test_mask_smtp_password_with_empty_value_clears_it(server: Server) -> None:
    update(server, full_settings())
    stored = update(
        server, settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings()), "smtp.password"
    )
    assert not stored.smtp.password_set
    assert stored.smtp.host == "smtp.example.com"
    assert stored.smtp.login == "mailer"
    assert stored.mailgun.key_set
    assert not get(server).smtp.password_set
    assert SMTP_PASSWORD not in settings_path(server).read_text()


def test_mask_smtp_password_with_value_sets_it(server: Server) -> None:
    settings = full_settings()
    settings.smtp.password = ""
    assert not update(server, settings).smtp.password_set
    patch = settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(password="n3w-Secret"))
    stored = update(server, patch, "smtp.password")
    assert stored.smtp.password_set
    assert stored.smtp.password == ""
    assert stored.smtp.host == "smtp.example.com"
    assert "n3w-Secret" in settings_path(server).read_text()


def test_mask_single_template_add_replace_delete(server: Server) -> None:
    other = template("Other {{ name }}")
    update(server, settings_pb2.MailSettings(templates={"other": other}, default_from="a@b.org"))

    first = template("First {{ name }}")
    stored = update(
        server, settings_pb2.MailSettings(templates={"welcome": first}), "templates.welcome"
    )
    assert dict(stored.templates) == {"other": other, "welcome": first}
    assert stored.default_from == "a@b.org"

    second = template("Second {{ name }}")
    stored = update(
        server, settings_pb2.MailSettings(templates={"welcome": second}), "templates.welcome"
    )
    assert dict(stored.templates) == {"other": other, "welcome": second}

    # Absent from the request under its mask path: deleted.
    stored = update(server, settings_pb2.MailSettings(), "templates.welcome")
    assert dict(stored.templates) == {"other": other}
    assert dict(get(server).templates) == {"other": other}


def test_mask_templates_replaces_the_whole_map(server: Server) -> None:
    update(server, full_settings())
    only = template("Only {{ name }}")
    stored = update(server, settings_pb2.MailSettings(templates={"only": only}), "templates")
    assert dict(stored.templates) == {"only": only}
    assert stored.smtp.password_set


@pytest.mark.parametrize(
    ("paths", "patch", "check"),
    [
        pytest.param(
            ["default_from"],
            settings_pb2.MailSettings(default_from="new@example.com"),
            lambda s: s.default_from == "new@example.com",
            id="default_from",
        ),
        pytest.param(
            ["authorized_roles"],
            settings_pb2.MailSettings(authorized_roles=["a", "b"]),
            lambda s: list(s.authorized_roles) == ["a", "b"],
            id="authorized_roles",
        ),
        pytest.param(
            ["enable_user_full_access"],
            settings_pb2.MailSettings(),
            lambda s: s.enable_user_full_access is False,
            id="enable_user_full_access",
        ),
        pytest.param(
            ["mailgun"],
            settings_pb2.MailSettings(),
            lambda s: not s.HasField("mailgun"),
            id="mailgun-cleared",
        ),
        pytest.param(
            ["smtp"],
            settings_pb2.MailSettings(),
            lambda s: not s.HasField("smtp"),
            id="smtp-cleared",
        ),
    ],
)
def test_mask_paths_touch_only_their_field(
    server: Server,
    paths: list[str],
    patch: settings_pb2.MailSettings,
    check: Callable[[settings_pb2.MailSettings], bool],
) -> None:
    update(server, full_settings())
    stored = update(server, patch, *paths)
    assert check(stored)
    assert check(get(server))
    # Everything the mask does not name is as before.
    untouched = public(full_settings())
    mine = no_etag(stored)
    for name in ("default_from", "authorized_roles", "enable_user_full_access", "mailgun", "smtp"):
        if name not in paths:
            assert getattr(mine, name) == getattr(untouched, name), name
    assert dict(mine.templates) == dict(untouched.templates)


@pytest.mark.parametrize("path", ["nope", "smtp.nope", "templates.welcome.subject.x"])
def test_unknown_mask_path_is_invalid(server: Server, path: str) -> None:
    update(server, full_settings())
    before = settings_path(server).read_bytes()
    patch = settings_pb2.MailSettings(default_from="x@example.com")
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, update, server, patch, path)
    assert "update_mask" in details(err)["violations"]
    assert settings_path(server).read_bytes() == before


# --- etags -----------------------------------------------------------------------------------


def test_stale_etag_is_aborted_and_nothing_written(server: Server) -> None:
    first = update(server, full_settings())
    second = update(server, settings_pb2.MailSettings(default_from="b@example.com"))
    assert second.etag != ""
    assert second.etag != first.etag
    before = settings_path(server).read_bytes()

    patch = settings_pb2.MailSettings(default_from="c@example.com")
    err = expect_error(grpc.StatusCode.ABORTED, update, server, patch, etag=first.etag)
    assert details(err)["reason"] == "ETAG_MISMATCH"
    err = expect_error(
        grpc.StatusCode.ABORTED, update, server, patch, "default_from", etag=first.etag
    )
    assert details(err)["reason"] == "ETAG_MISMATCH"
    assert settings_path(server).read_bytes() == before
    assert get(server).default_from == "b@example.com"


def test_current_etag_is_accepted_and_changes(server: Server) -> None:
    defaults = get(server)
    stored = update(
        server, settings_pb2.MailSettings(default_from="a@example.com"), etag=defaults.etag
    )
    assert stored.etag not in ("", defaults.etag)
    assert get(server).etag == stored.etag

    again = update(
        server,
        settings_pb2.MailSettings(default_from="b@example.com"),
        "default_from",
        etag=stored.etag,
    )
    assert again.etag not in ("", stored.etag)
    assert again.default_from == "b@example.com"
    assert get(server).etag == again.etag


# --- delete ----------------------------------------------------------------------------------


def test_delete_returns_defaults(server: Server) -> None:
    stored = update(server, full_settings())
    deleted = delete(server)
    assert no_etag(deleted) == settings_pb2.MailSettings()
    assert deleted.etag not in ("", stored.etag)
    fetched = get(server)
    assert no_etag(fetched) == settings_pb2.MailSettings()
    assert fetched.etag == deleted.etag
    path = settings_path(server)
    if path.exists():
        text = path.read_text()
        assert SMTP_PASSWORD not in text
        assert MAILGUN_KEY not in text


def test_delete_with_stale_etag_is_aborted(server: Server) -> None:
    first = update(server, full_settings())
    second = update(server, full_settings())
    before = settings_path(server).read_bytes()
    err = expect_error(grpc.StatusCode.ABORTED, delete, server, etag=first.etag)
    assert details(err)["reason"] == "ETAG_MISMATCH"
    assert settings_path(server).read_bytes() == before
    assert no_etag(get(server)) == public(full_settings())

    assert no_etag(delete(server, etag=second.etag)) == settings_pb2.MailSettings()


# --- validation ------------------------------------------------------------------------------


def with_template(name: str, tpl: settings_pb2.MailTemplate) -> settings_pb2.MailSettings:
    return settings_pb2.MailSettings(templates={name: tpl})


def bad_template(**fields: Any) -> settings_pb2.MailTemplate:
    tpl = template()
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(tpl, name)[:]
            getattr(tpl, name).extend(value)
        elif isinstance(value, dict):
            getattr(tpl, name).update(value)
        else:
            setattr(tpl, name, value)
    return tpl


def base_settings() -> settings_pb2.MailSettings:
    """Valid settings stored before each validation case: smtp only, no mailgun."""
    return settings_pb2.MailSettings(
        smtp=settings_pb2.SmtpSettings(host="smtp.example.com", port=25),
        default_from="ok@example.com",
        templates={"keep": template()},
    )


VALIDATION_CASES = [
    pytest.param(
        settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(port=25)),
        [],
        ["settings.smtp.host"],
        id="smtp-without-host",
    ),
    pytest.param(
        settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(host="h.example.com", port=70000)),
        [],
        ["settings.smtp.port"],
        id="port-70000",
    ),
    pytest.param(
        settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(host="h.example.com", port=-1)),
        [],
        ["settings.smtp.port"],
        id="port-negative",
    ),
    pytest.param(
        settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(port=70000)),
        ["smtp.port"],
        ["settings.smtp.port"],
        id="port-70000-by-mask",
    ),
    pytest.param(
        settings_pb2.MailSettings(mailgun=settings_pb2.MailgunSettings(key="k")),
        [],
        ["settings.mailgun.domain"],
        id="mailgun-without-domain",
    ),
    pytest.param(
        settings_pb2.MailSettings(mailgun=settings_pb2.MailgunSettings(domain="mg.example.com")),
        [],
        ["settings.mailgun.key"],
        id="mailgun-first-set-without-key",
    ),
    pytest.param(
        settings_pb2.MailSettings(default_from="not an address"),
        [],
        ["settings.default_from"],
        id="bad-default-from",
    ),
    pytest.param(
        with_template("bad name!", template()),
        [],
        ["settings.templates.bad name!"],
        id="template-name-chars",
    ),
    pytest.param(
        with_template("a" * 65, template()),
        [],
        ["settings.templates." + "a" * 65],
        id="template-name-65",
    ),
    pytest.param(
        with_template("welcome", bad_template(to=["not-an-address"])),
        [],
        ["settings.templates.welcome.to[0]"],
        id="template-bad-to",
    ),
    pytest.param(
        with_template("welcome", bad_template(from_address="nobody at all")),
        [],
        ["settings.templates.welcome.from_address"],
        id="template-bad-from",
    ),
    pytest.param(
        with_template("welcome", bad_template(model={"id": "uuid"})),
        [],
        ["settings.templates.welcome.model.id"],
        id="template-model-uuid",
    ),
    pytest.param(
        settings_pb2.MailSettings(
            smtp=settings_pb2.SmtpSettings(port=70000),
            mailgun=settings_pb2.MailgunSettings(key="k"),
            default_from="nope",
            templates={"ok": bad_template(to=["bad"])},
        ),
        [],
        [
            "settings.smtp.host",
            "settings.smtp.port",
            "settings.mailgun.domain",
            "settings.default_from",
            "settings.templates.ok.to[0]",
        ],
        id="several-bad-fields",
    ),
]


@pytest.mark.parametrize(("settings", "paths", "fields"), VALIDATION_CASES)
def test_invalid_settings_are_rejected_and_nothing_written(
    server: Server, settings: settings_pb2.MailSettings, paths: list[str], fields: list[str]
) -> None:
    update(server, base_settings())
    before = settings_path(server).read_bytes()
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, update, server, settings, *paths)
    violations = details(err)["violations"]
    for name in fields:
        assert name in violations, violations
    assert settings_path(server).read_bytes() == before
    assert no_etag(get(server)) == public(base_settings())


def test_template_with_syntax_error_is_rejected(server: Server) -> None:
    update(server, base_settings())
    before = settings_path(server).read_bytes()
    settings = with_template("welcome", bad_template(subject="{{ foo"))
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, update, server, settings)
    violations = details(err)["violations"]
    prefix = "settings.templates.welcome"
    assert any(f == prefix or f.startswith(prefix + ".") for f in violations), violations
    assert settings_path(server).read_bytes() == before


# --- the file on disk ------------------------------------------------------------------------


def test_settings_file_is_private_protobuf_json(server: Server) -> None:
    update(server, full_settings())
    path = settings_path(server)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    data = json.loads(text)
    assert data["enableUserFullAccess"] is True
    assert data["defaultFrom"] == "noreply@example.com"
    assert data["authorizedRoles"] == ["mailer"]
    assert data["smtp"]["host"] == "smtp.example.com"
    assert data["smtp"]["startTlsRequired"] is True
    assert data["smtp"]["password"] == SMTP_PASSWORD
    assert data["mailgun"]["key"] == MAILGUN_KEY
    assert "passwordSet" not in data["smtp"]
    assert "keySet" not in data["mailgun"]
    parsed = json_format.Parse(text, settings_pb2.MailSettings())
    assert parsed.smtp.password == SMTP_PASSWORD
    assert dict(parsed.templates) == dict(full_settings().templates)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"smtp": 5}', b""],
    ids=["not-json", "not-mail-settings", "empty"],
)
def test_corrupt_settings_file_stops_the_server(
    tmp_path: Path, server_factory: ServerFactory, content: bytes
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / "settings.json"
    path.write_bytes(content)
    path.chmod(0o600)
    server = server_factory(data_dir=data_dir, wait=False)
    code = server.proc.wait(timeout=30)
    server.channel.close()
    assert code != 0
    logs = server.logs()
    assert str(path) in logs or str(path.resolve()) in logs, logs
    assert path.read_bytes() == content


# --- ACL -------------------------------------------------------------------------------------


def test_acl_is_for_superadmin_only(server: Server) -> None:
    original = get_acl(server)
    wanted = settings_pb2.SettingsAcl(read_roles=["admin"])
    for metadata in (ADMIN, USER, AUDITOR):
        err = expect_error(DENIED, get_acl, server, metadata)
        assert details(err)["reason"] == "ROLE_MISSING"
        err = expect_error(DENIED, put_acl, server, wanted, metadata)
        assert details(err)["reason"] == "ROLE_MISSING"
    assert get_acl(server) == original


def test_default_acl_lets_nobody_but_superadmin_touch_settings(server: Server) -> None:
    get(server)
    for metadata in (ADMIN, USER, AUDITOR):
        expect_error(DENIED, get, server, metadata)
        expect_error(DENIED, update, server, full_settings(), metadata=metadata)
        expect_error(DENIED, delete, server, metadata=metadata)


def test_read_roles_may_get_but_not_update(server: Server) -> None:
    acl = settings_pb2.SettingsAcl(read_roles=["auditor"])
    assert put_acl(server, acl) == acl
    assert get_acl(server) == acl
    update(server, full_settings())
    before = settings_path(server).read_bytes()

    fetched = get(server, AUDITOR)
    assert no_etag(fetched) == public(full_settings())
    expect_error(DENIED, update, server, settings_pb2.MailSettings(), metadata=AUDITOR)
    expect_error(DENIED, delete, server, metadata=AUDITOR)
    expect_error(DENIED, get_acl, server, AUDITOR)
    assert settings_path(server).read_bytes() == before


def test_update_roles_may_update_and_delete(server: Server) -> None:
    acl = settings_pb2.SettingsAcl(update_roles=["ops"])
    assert put_acl(server, acl) == acl
    # Update does not grant read: the answer carries the etag only.
    stored = update(server, full_settings(), metadata=OPS)
    assert stored == settings_pb2.MailSettings(etag=stored.etag) and stored.etag
    assert no_etag(get(server)) == public(full_settings())
    masked = update(
        server,
        settings_pb2.MailSettings(default_from="ops@example.com"),
        "default_from",
        metadata=OPS,
    )
    assert masked == settings_pb2.MailSettings(etag=masked.etag)
    assert get(server).default_from == "ops@example.com"
    expect_error(DENIED, get, server, OPS)
    assert no_etag(delete(server, metadata=OPS)) == settings_pb2.MailSettings()
    assert no_etag(get(server)) == settings_pb2.MailSettings()


def test_acl_survives_restart(server: Server, server_factory: ServerFactory) -> None:
    acl = settings_pb2.SettingsAcl(read_roles=["auditor", "admin"], update_roles=["ops"])
    put_acl(server, acl)
    assert (server.data_dir / "acl.json").is_file()
    assert server.stop() == 0
    restarted = server_factory(data_dir=server.data_dir)
    assert get_acl(restarted) == acl
    get(restarted, AUDITOR)
    update(restarted, settings_pb2.MailSettings(), metadata=OPS)


def test_mask_keeps_the_case_of_a_template_name(server: Server) -> None:
    template = settings_pb2.MailTemplate(to=["a@example.com"], subject="Hi", text="Hello")
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(templates={"WelcomeMail": template}),
        update_mask=field_mask_pb2.FieldMask(paths=["templates.WelcomeMail"]),
    )
    stored = server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=10)
    assert list(stored.templates) == ["WelcomeMail"]
