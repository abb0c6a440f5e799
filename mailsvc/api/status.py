"""The one place where our errors become google.rpc.Status (code, message, details)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mailsvc.errors import InvalidArgument, MailsvcError

DOMAIN = "mailsvc"


def to_status(exc: MailsvcError) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))
    details = [info]
    if isinstance(exc, InvalidArgument):
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(
        code=code_pb2.Code.Value(exc.code), message=exc.message, details=details
    )
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    return to_status(MailsvcError("internal error; the server log has the details"))
