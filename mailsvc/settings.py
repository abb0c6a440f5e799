"""The mail settings' rules: field-mask updates, secrets kept and hidden, validation."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from mailsvc.addresses import is_host_name, parse_address
from mailsvc.dkim import validate_private_key
from mailsvc.errors import FieldViolation, InvalidArgument
from mailsvc.limits import validate_rules
from mailsvc.templates import LIST_FIELDS, CompiledTemplate, TemplateEngine
from mailsvc.v1.settings_pb2 import DkimSettings, MailSettings, MailTemplate

TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TEMPLATE_BYTES = 256 * 1024  # one template serialized: all its string fields together
MAX_SETTINGS_BYTES = 4 * 1024 * 1024  # all the settings serialized
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


@dataclass(frozen=True)
class Secret:
    """A write-only field: `path` from MailSettings, `flag` the output-only bool beside it."""

    path: tuple[str, ...]
    flag: str

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def flag_path(self) -> str:
        return ".".join((*self.path[:-1], self.flag))


SECRETS = (
    Secret(("smtp", "password"), "password_set"),
    Secret(("mailgun", "key"), "key_set"),
    Secret(("smtp", "dkim", "private_key"), "private_key_set"),
    Secret(("mailgun", "webhook_signing_key"), "webhook_signing_key_set"),
)
_OUTPUT_ONLY = {"etag", *(s.flag_path for s in SECRETS)}


def _parent(message: Message, path: tuple[str, ...], *, create: bool = False) -> Message | None:
    """The message holding the field at `path`, or None when an ancestor is unset."""
    for name in path[:-1]:
        if not create and not message.HasField(name):
            return None
        message = getattr(message, name)
    return message


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
    for secret in SECRETS:
        parent = _parent(out, secret.path)
        if parent is not None:
            setattr(parent, secret.flag, bool(getattr(parent, secret.path[-1])))
            parent.ClearField(secret.path[-1])
    return out


def for_storage(settings: MailSettings) -> MailSettings:
    """A copy fit to write: secrets kept, output-only flags dropped."""
    out = MailSettings()
    out.CopyFrom(settings)
    for secret in SECRETS:
        parent = _parent(out, secret.path)
        if parent is not None:
            parent.ClearField(secret.flag)
    return out


def _is_field_path(descriptor: Any, parts: list[str]) -> bool:
    """Whether `parts` names a field, through singular message fields only."""
    for i, part in enumerate(parts):
        field = descriptor.fields_by_name.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            if field.type != FieldDescriptor.TYPE_MESSAGE or field.is_repeated:
                return False
            descriptor = field.message_type
    return True


def _valid_path(path: str) -> bool:
    head, dot, rest = path.partition(".")
    if head == "templates" and dot:
        return bool(TEMPLATE_NAME.match(rest))
    if head == "templates":
        return True
    return _is_field_path(MailSettings.DESCRIPTOR, path.split("."))


def _mask_paths(mask: FieldMask) -> list[str] | None:
    """Normalized mask paths; None means replace everything."""
    paths = [_snake(p.strip()) for p in mask.paths if p.strip()]
    if not paths or "*" in paths:
        return None
    bad = [p for p in paths if p not in _OUTPUT_ONLY and not _valid_path(p)]
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
    for secret in SECRETS:
        if secret.dotted in named:
            continue
        parent, old = _parent(result, secret.path), _parent(current, secret.path)
        name = secret.path[-1]
        if parent is not None and old is not None and not getattr(parent, name):
            setattr(parent, name, getattr(old, name))
    return result


def _apply_path(result: MailSettings, new: MailSettings, path: str) -> None:
    head, _, rest = path.partition(".")
    if head == "templates" and rest:
        if rest in new.templates:
            result.templates[rest].CopyFrom(new.templates[rest])
        else:
            result.templates.pop(rest, None)
        return
    parts = tuple(path.split("."))
    target = _parent(result, parts, create=True)
    # Setting a field of an unset parent creates the parent, as the path asks.
    assert target is not None
    source = _parent(new, parts, create=True)
    assert source is not None
    FieldMask(paths=[parts[-1]]).MergeMessage(
        source, target, replace_message_field=True, replace_repeated_field=True
    )


def check(
    settings: MailSettings, engine: TemplateEngine
) -> tuple[dict[str, CompiledTemplate], list[FieldViolation]]:
    """Compile the templates and name every bad field by its path in the update request."""
    v: list[FieldViolation] = []
    if settings.ByteSize() > MAX_SETTINGS_BYTES:
        v.append(FieldViolation("settings", f"larger than {MAX_SETTINGS_BYTES} bytes"))
        v.extend(
            FieldViolation(f"settings.templates.{name}", f"larger than {MAX_TEMPLATE_BYTES} bytes")
            for name, template in sorted(settings.templates.items())
            if template.ByteSize() > MAX_TEMPLATE_BYTES
        )
        return {}, v
    if settings.HasField("smtp"):
        smtp = settings.smtp
        if not smtp.host.strip():
            v.append(FieldViolation("settings.smtp.host", "required when smtp is set"))
        if not 0 <= smtp.port <= 65535:
            v.append(FieldViolation("settings.smtp.port", "must be between 0 and 65535"))
        if smtp.HasField("dkim"):
            v.extend(_check_dkim(smtp.dkim))
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
        if template.ByteSize() > MAX_TEMPLATE_BYTES:
            v.append(FieldViolation(path, f"larger than {MAX_TEMPLATE_BYTES} bytes"))
            continue
        result, bad = engine.checked(
            name, template, functools.partial(_check_template, name, template, path, engine)
        )
        v.extend(bad)
        if result is not None:
            compiled[name] = result
    engine.keep_only_used()
    return compiled, v


def _check_dkim(dkim: DkimSettings) -> list[FieldViolation]:
    """Domain and selector are DNS names; the key (stored or given) must sign. Never echoed."""
    v: list[FieldViolation] = []
    path = "settings.smtp.dkim"
    for name in ("domain", "selector"):
        value = getattr(dkim, name)
        if not value.strip():
            v.append(FieldViolation(f"{path}.{name}", "required when smtp.dkim is set"))
        elif not (value.isascii() and is_host_name(value)):
            v.append(
                FieldViolation(f"{path}.{name}", "must be a DNS name (IDNs in their xn-- form)")
            )
    if not dkim.private_key:
        v.append(FieldViolation(f"{path}.private_key", "required when smtp.dkim is first set"))
    else:
        problem = validate_private_key(dkim.private_key)
        if problem is not None:
            v.append(FieldViolation(f"{path}.private_key", problem))
    return v


def names_only_output_fields(mask: FieldMask) -> bool:
    """True when the mask names only output-only fields (etag, *_set): nothing to write."""
    return _mask_paths(mask) == []


def _check_template(
    name: str, template: MailTemplate, path: str, engine: TemplateEngine
) -> tuple[CompiledTemplate | None, list[FieldViolation]]:
    v: list[FieldViolation] = []
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
    return (result if not v else None), v
