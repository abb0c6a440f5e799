from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Region(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGION_UNSPECIFIED: _ClassVar[Region]
    US: _ClassVar[Region]
    EU: _ClassVar[Region]
REGION_UNSPECIFIED: Region
US: Region
EU: Region

class MailSettings(_message.Message):
    __slots__ = ("enable_user_full_access", "mailgun", "smtp", "templates", "authorized_roles", "default_from", "etag", "rate_limits")
    class TemplatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MailTemplate
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MailTemplate, _Mapping]] = ...) -> None: ...
    ENABLE_USER_FULL_ACCESS_FIELD_NUMBER: _ClassVar[int]
    MAILGUN_FIELD_NUMBER: _ClassVar[int]
    SMTP_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZED_ROLES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FROM_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    enable_user_full_access: bool
    mailgun: MailgunSettings
    smtp: SmtpSettings
    templates: _containers.MessageMap[str, MailTemplate]
    authorized_roles: _containers.RepeatedScalarFieldContainer[str]
    default_from: str
    etag: str
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    def __init__(self, enable_user_full_access: _Optional[bool] = ..., mailgun: _Optional[_Union[MailgunSettings, _Mapping]] = ..., smtp: _Optional[_Union[SmtpSettings, _Mapping]] = ..., templates: _Optional[_Mapping[str, MailTemplate]] = ..., authorized_roles: _Optional[_Iterable[str]] = ..., default_from: _Optional[str] = ..., etag: _Optional[str] = ..., rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("role", "per_minute", "per_day")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    PER_DAY_FIELD_NUMBER: _ClassVar[int]
    role: str
    per_minute: int
    per_day: int
    def __init__(self, role: _Optional[str] = ..., per_minute: _Optional[int] = ..., per_day: _Optional[int] = ...) -> None: ...

class SmtpSettings(_message.Message):
    __slots__ = ("host", "port", "login", "password", "start_tls_required", "ssl_on_connect", "password_set", "dkim")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    LOGIN_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    START_TLS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SSL_ON_CONNECT_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_SET_FIELD_NUMBER: _ClassVar[int]
    DKIM_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    login: str
    password: str
    start_tls_required: bool
    ssl_on_connect: bool
    password_set: bool
    dkim: DkimSettings
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., login: _Optional[str] = ..., password: _Optional[str] = ..., start_tls_required: _Optional[bool] = ..., ssl_on_connect: _Optional[bool] = ..., password_set: _Optional[bool] = ..., dkim: _Optional[_Union[DkimSettings, _Mapping]] = ...) -> None: ...

class DkimSettings(_message.Message):
    __slots__ = ("domain", "selector", "private_key", "private_key_set")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_SET_FIELD_NUMBER: _ClassVar[int]
    domain: str
    selector: str
    private_key: str
    private_key_set: bool
    def __init__(self, domain: _Optional[str] = ..., selector: _Optional[str] = ..., private_key: _Optional[str] = ..., private_key_set: _Optional[bool] = ...) -> None: ...

class MailgunSettings(_message.Message):
    __slots__ = ("domain", "key", "region", "key_set", "webhook_signing_key", "webhook_signing_key_set")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    KEY_SET_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_SIGNING_KEY_SET_FIELD_NUMBER: _ClassVar[int]
    domain: str
    key: str
    region: Region
    key_set: bool
    webhook_signing_key: str
    webhook_signing_key_set: bool
    def __init__(self, domain: _Optional[str] = ..., key: _Optional[str] = ..., region: _Optional[_Union[Region, str]] = ..., key_set: _Optional[bool] = ..., webhook_signing_key: _Optional[str] = ..., webhook_signing_key_set: _Optional[bool] = ...) -> None: ...

class MailTemplate(_message.Message):
    __slots__ = ("from_address", "to", "cc", "bcc", "subject", "text", "html", "model", "roles")
    class ModelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FROM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    CC_FIELD_NUMBER: _ClassVar[int]
    BCC_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HTML_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    from_address: str
    to: _containers.RepeatedScalarFieldContainer[str]
    cc: _containers.RepeatedScalarFieldContainer[str]
    bcc: _containers.RepeatedScalarFieldContainer[str]
    subject: str
    text: str
    html: str
    model: _containers.ScalarMap[str, str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, from_address: _Optional[str] = ..., to: _Optional[_Iterable[str]] = ..., cc: _Optional[_Iterable[str]] = ..., bcc: _Optional[_Iterable[str]] = ..., subject: _Optional[str] = ..., text: _Optional[str] = ..., html: _Optional[str] = ..., model: _Optional[_Mapping[str, str]] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class GetMailSettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateMailSettingsRequest(_message.Message):
    __slots__ = ("settings", "update_mask", "etag")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    settings: MailSettings
    update_mask: _field_mask_pb2.FieldMask
    etag: str
    def __init__(self, settings: _Optional[_Union[MailSettings, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class DeleteMailSettingsRequest(_message.Message):
    __slots__ = ("etag",)
    ETAG_FIELD_NUMBER: _ClassVar[int]
    etag: str
    def __init__(self, etag: _Optional[str] = ...) -> None: ...

class SettingsAcl(_message.Message):
    __slots__ = ("read_roles", "update_roles")
    READ_ROLES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ROLES_FIELD_NUMBER: _ClassVar[int]
    read_roles: _containers.RepeatedScalarFieldContainer[str]
    update_roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, read_roles: _Optional[_Iterable[str]] = ..., update_roles: _Optional[_Iterable[str]] = ...) -> None: ...

class GetSettingsAclRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateSettingsAclRequest(_message.Message):
    __slots__ = ("acl",)
    ACL_FIELD_NUMBER: _ClassVar[int]
    acl: SettingsAcl
    def __init__(self, acl: _Optional[_Union[SettingsAcl, _Mapping]] = ...) -> None: ...
