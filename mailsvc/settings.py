"""The mail settings' rules: field-mask updates, secrets kept and hidden, validation."""

from __future__ import annotations

import re

from google.protobuf.field_mask_pb2 import FieldMask

from mailsvc.addresses import is_host_name, parse_address
from mailsvc.errors import FieldViolation, InvalidArgument
from mailsvc.limits import validate_rules
from mailsvc.templates import LIST_FIELDS, CompiledTemplate, TemplateEngine
from mailsvc.v1.settings_pb2 import MailgunSettings, MailSettings, SmtpSettings

TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_OUTPUT_ONLY = {"etag", "smtp.password_set", "mailgun.key_set"}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _fields(message: type[MailSettings] | type[SmtpSettings] | type[MailgunSettings]) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


_TOP = _fields(MailSettings)
_NESTED = {"smtp": _fields(SmtpSettings), "mailgun": _fields(MailgunSettings)}


def _snake(path: str) -> str:
    """camelCase field names to snake_case; a template's name is kept as written."""
    head, dot, rest = path.partition(".")
    head = _CAMEL.sub("_", head).lower()
    if head == "templates":
        return head + dot + rest
    return ".".join([head, *(_CAMEL.sub("_", p).lower() for p in rest.split(".") if dot)])


def redact(settings: MailSettings) -> MailSettings:
    """A copy fit to return: secrets removed, `*_set` telling whether one is stored."""
    out = MailSettings()
    out.CopyFrom(settings)
    if out.HasField("smtp"):
        out.smtp.password_set = bool(out.smtp.password)
        out.smtp.password = ""
    if out.HasField("mailgun"):
        out.mailgun.key_set = bool(out.mailgun.key)
        out.mailgun.key = ""
    return out


def for_storage(settings: MailSettings) -> MailSettings:
    """A copy fit to write: secrets kept, output-only flags dropped."""
    out = MailSettings()
    out.CopyFrom(settings)
    if out.HasField("smtp"):
        out.smtp.ClearField("password_set")
    if out.HasField("mailgun"):
        out.mailgun.ClearField("key_set")
    return out


def _mask_paths(mask: FieldMask) -> list[str] | None:
    """Normalized mask paths; None means replace everything."""
    paths = [_snake(p.strip()) for p in mask.paths if p.strip()]
    if not paths or "*" in paths:
        return None
    bad = []
    for path in paths:
        head, _, rest = path.partition(".")
        if path in _OUTPUT_ONLY:
            continue
        if (
            head not in _TOP
            or (rest and head not in _NESTED and head != "templates")
            or (rest and head in _NESTED and rest not in _NESTED[head])
            or (head == "templates" and rest and not TEMPLATE_NAME.match(rest))
        ):
            bad.append(path)
    if bad:
        raise InvalidArgument.one("update_mask", f"unknown field paths: {', '.join(bad)}")
    return [p for p in paths if p not in _OUTPUT_ONLY]


def apply_update(current: MailSettings, new: MailSettings, mask: FieldMask) -> MailSettings:
    """The settings after an update (AIP-134); secrets not named by the mask are kept."""
    paths = _mask_paths(mask)
    result = MailSettings()
    if paths is None:
        result.CopyFrom(new)
    else:
        result.CopyFrom(current)
        for path in paths:
            _apply_path(result, new, path)
    result.ClearField("etag")
    named = set(paths or ())
    if (
        "smtp.password" not in named
        and result.HasField("smtp")
        and not result.smtp.password
        and current.HasField("smtp")
    ):
        result.smtp.password = current.smtp.password
    if (
        "mailgun.key" not in named
        and result.HasField("mailgun")
        and not result.mailgun.key
        and current.HasField("mailgun")
    ):
        result.mailgun.key = current.mailgun.key
    return result


def _apply_path(result: MailSettings, new: MailSettings, path: str) -> None:
    head, _, rest = path.partition(".")
    if head == "templates" and rest:
        if rest in new.templates:
            result.templates[rest].CopyFrom(new.templates[rest])
        else:
            result.templates.pop(rest, None)
        return
    if rest:
        # Setting a field of an unset parent creates the parent, as the path asks.
        setattr(getattr(result, head), rest, getattr(getattr(new, head), rest))
        return
    FieldMask(paths=[head]).MergeMessage(
        new, result, replace_message_field=True, replace_repeated_field=True
    )


def check(
    settings: MailSettings, engine: TemplateEngine
) -> tuple[dict[str, CompiledTemplate], list[FieldViolation]]:
    """Compile the templates and name every bad field by its path in the update request."""
    v: list[FieldViolation] = []
    if settings.HasField("smtp"):
        smtp = settings.smtp
        if not smtp.host.strip():
            v.append(FieldViolation("settings.smtp.host", "required when smtp is set"))
        if not 0 <= smtp.port <= 65535:
            v.append(FieldViolation("settings.smtp.port", "must be between 0 and 65535"))
    if settings.HasField("mailgun"):
        mg = settings.mailgun
        if not mg.domain.strip():
            v.append(FieldViolation("settings.mailgun.domain", "required when mailgun is set"))
        elif not is_host_name(mg.domain):
            v.append(FieldViolation("settings.mailgun.domain", "must be a host name"))
        if not mg.key:
            v.append(FieldViolation("settings.mailgun.key", "required when mailgun is first set"))
    if settings.default_from:
        parse_address(settings.default_from, "settings.default_from", v)
    for i, role in enumerate(settings.authorized_roles):
        if not role.strip():
            v.append(FieldViolation(f"settings.authorized_roles[{i}]", "must not be empty"))
    v.extend(validate_rules(settings.rate_limits))
    compiled: dict[str, CompiledTemplate] = {}
    for name, template in sorted(settings.templates.items()):
        path = f"settings.templates.{name}"
        if not TEMPLATE_NAME.match(name):
            v.append(FieldViolation(path, "name must be 1 to 64 letters, digits, '_' or '-'"))
            continue
        for roles_i, role in enumerate(template.roles):
            if not role.strip():
                v.append(FieldViolation(f"{path}.roles[{roles_i}]", "must not be empty"))
        # Literal addresses are checked now; templated ones when rendered.
        if template.from_address and "{" not in template.from_address:
            parse_address(template.from_address, f"{path}.from_address", v)
        for list_name in LIST_FIELDS:
            for j, value in enumerate(getattr(template, list_name)):
                if "{" not in value:
                    parse_address(value, f"{path}.{list_name}[{j}]", v)
        result, bad = engine.compile(name, template, path)
        v.extend(bad)
        if result is not None:
            compiled[name] = result
    return compiled, v


def names_only_output_fields(mask: FieldMask) -> bool:
    """True when the mask names only output-only fields (etag, *_set): nothing to write."""
    return _mask_paths(mask) == []
