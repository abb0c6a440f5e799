"""apply_update: the field-mask rules of UpdateMailSettings (AIP-134) and secret keeping."""

from __future__ import annotations

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from mailsvc.v1.settings_pb2 import MailgunSettings, MailSettings, MailTemplate, SmtpSettings

from mailsvc.errors import InvalidArgument
from mailsvc.settings import SECRETS, apply_update, for_storage, redact


def mask(*paths: str) -> FieldMask:
    return FieldMask(paths=list(paths))


CURRENT = MailSettings(
    smtp=SmtpSettings(host="old.example.com", port=25, login="u", password="old-pass"),
    mailgun=MailgunSettings(domain="mg.example.com", key="old-key"),
    templates={
        "a": MailTemplate(subject="A", to=["a@example.com"]),
        "b": MailTemplate(subject="B", to=["b@example.com"]),
    },
    authorized_roles=["billing"],
    default_from="from@example.com",
)


def test_no_mask_or_star_replaces_everything_but_keeps_secrets() -> None:
    new = MailSettings(smtp=SmtpSettings(host="new.example.com"), default_from="x@example.com")
    for m in (mask(), mask("*")):
        result = apply_update(CURRENT, new, m)
        assert result.smtp.host == "new.example.com"
        assert result.smtp.password == "old-pass"  # parent kept set: secret kept
        assert not result.HasField("mailgun")
        assert not result.templates
        assert result.default_from == "x@example.com"


def test_one_field_changes_only_that_field() -> None:
    new = MailSettings(smtp=SmtpSettings(host="new.example.com", port=587))
    result = apply_update(CURRENT, new, mask("smtp.host"))
    assert result.smtp.host == "new.example.com"
    assert result.smtp.port == 25
    assert result.smtp.password == "old-pass"
    assert result.templates.keys() == CURRENT.templates.keys()


def test_camel_case_paths() -> None:
    new = MailSettings(smtp=SmtpSettings(start_tls_required=True), default_from="n@example.com")
    result = apply_update(CURRENT, new, mask("smtp.startTlsRequired", "defaultFrom"))
    assert result.smtp.start_tls_required is True
    assert result.default_from == "n@example.com"


def test_field_of_an_unset_parent_creates_the_parent() -> None:
    result = apply_update(
        MailSettings(), MailSettings(smtp=SmtpSettings(host="h")), mask("smtp.host")
    )
    assert result.HasField("smtp")
    assert result.smtp.host == "h"


def test_naming_a_secret_with_an_empty_value_clears_it() -> None:
    result = apply_update(CURRENT, MailSettings(), mask("smtp.password", "mailgun.key"))
    assert result.smtp.password == ""
    assert result.mailgun.key == ""
    assert result.smtp.host == "old.example.com"


def test_replacing_a_parent_keeps_its_secret_and_unsetting_it_drops_it() -> None:
    new = MailSettings(mailgun=MailgunSettings(domain="other.example.com"))
    result = apply_update(CURRENT, new, mask("mailgun"))
    assert result.mailgun.domain == "other.example.com"
    assert result.mailgun.key == "old-key"
    result = apply_update(CURRENT, MailSettings(), mask("smtp"))
    assert not result.HasField("smtp")


def test_template_paths_set_or_remove_one_template() -> None:
    new = MailSettings(templates={"c": MailTemplate(subject="C")})
    result = apply_update(CURRENT, new, mask("templates.c", "templates.a"))
    assert sorted(result.templates) == ["b", "c"]
    assert result.templates["c"].subject == "C"
    result = apply_update(CURRENT, new, mask("templates"))
    assert sorted(result.templates) == ["c"]


def test_repeated_fields_are_replaced_not_appended() -> None:
    new = MailSettings(authorized_roles=["ops"])
    assert list(apply_update(CURRENT, new, mask("authorized_roles")).authorized_roles) == ["ops"]


def test_output_only_paths_are_ignored_and_etag_cleared() -> None:
    new = MailSettings(etag="abc", smtp=SmtpSettings(password_set=True))
    result = apply_update(CURRENT, new, mask("etag", "smtp.password_set"))
    assert result == apply_update(CURRENT, new, mask("etag"))
    assert result.etag == ""
    assert result.smtp.password == "old-pass"


@pytest.mark.parametrize(
    "path",
    [
        "templates.",  # would otherwise delete every template
        "smtp.",
        "smtp..host",
        ".smtp",
        "nope",
        "smtp.nope",
        "smtp.host.x",
        "default_from.x",
        "authorized_roles.x",
        "templates.bad name",
        "templates." + "x" * 65,
    ],
)
def test_bad_paths_are_invalid_update_mask(path: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        apply_update(CURRENT, MailSettings(), mask(path))
    assert [v.field for v in refused.value.violations] == ["update_mask"]


def test_redact_and_for_storage_follow_the_secrets_table() -> None:
    shown = redact(CURRENT)
    assert (shown.smtp.password, shown.smtp.password_set) == ("", True)
    assert (shown.mailgun.key, shown.mailgun.key_set) == ("", True)
    assert not redact(MailSettings()).HasField("smtp")  # no parent is created
    stored = for_storage(shown)
    assert not stored.smtp.password_set
    assert not stored.mailgun.key_set
    assert {s.dotted for s in SECRETS} == {
        "smtp.password",
        "mailgun.key",
        "smtp.dkim.private_key",
        "mailgun.webhook_signing_key",
    }
