"""The interceptor wraps every kind of handler: a grpc.aio server in this process, over loopback.

The protos have no streaming RPC yet, so a generic handler exposes one of each kind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mailsvc.api.callstate import current_call
from mailsvc.api.interceptors import RpcInterceptor
from mailsvc.auth import TokenVerifier
from mailsvc.errors import NotFound
from mailsvc.metrics import Metrics

SECRET = b"unit-test-secret-0123456789abcdef0123456789"
SERVICE = "test.Edge"


def _token(sub: str = "alice") -> list[tuple[str, str]]:
    token = jwt.encode({"sub": sub, "roles": []}, SECRET, algorithm="HS256")
    return [("authorization", f"Bearer {token}")]


async def _unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    caller = current_call().principal.sub.encode()
    for part in (b"one", b"two", caller):
        yield part
    if request == b"fail":
        raise NotFound("no message 'm-1'", reason="MESSAGE_NOT_FOUND")


async def _stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    parts = [part async for part in requests]
    if b"fail" in parts:
        raise NotFound("no message 'm-1'", reason="MESSAGE_NOT_FOUND")
    return b"+".join(parts)


async def _stream_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for part in requests:
        yield part.upper()


async def _unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("a bug")


Scenario = Callable[[grpc.aio.Channel, RpcInterceptor], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def main() -> None:
        interceptor = RpcInterceptor(TokenVerifier(SECRET), Metrics())
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream),
                        "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary),
                        "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream),
                        "UnaryUnary": grpc.unary_unary_rpc_method_handler(_unary_unary),
                    },
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(scenario(channel, interceptor), timeout=20)
        finally:
            await server.stop(None)

    asyncio.run(main())


async def _gen(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _drain(call: Any) -> list[bytes]:
    return [response async for response in call]


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo")


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailsvc.access"]


@pytest.mark.parametrize("kind", ["UnaryStream", "StreamUnary", "StreamStream"])
def test_streaming_rpc_without_token_is_unauthenticated(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailsvc.access")

    async def scenario(channel: grpc.aio.Channel, _: RpcInterceptor) -> None:
        method = f"/{SERVICE}/{kind}"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if kind == "UnaryStream":
                await _drain(channel.unary_stream(method)(b"x"))
            elif kind == "StreamUnary":
                await channel.stream_unary(method)(_gen(b"a", b"b"))
            else:
                await _drain(channel.stream_stream(method)(_gen(b"a")))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(caught.value) == "TOKEN_MISSING"

    run(scenario)
    [line] = _access_lines(caplog)
    head, _, tail = line.partition(" duration_ms=")
    assert head == f"rpc method={SERVICE}/{kind} caller=- code=UNAUTHENTICATED"
    assert tail.endswith(" message_id=-")


def test_streaming_rpcs_with_token_run_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailsvc.access")

    async def scenario(channel: grpc.aio.Channel, _: RpcInterceptor) -> None:
        stream = channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"x", metadata=_token())
        assert [r async for r in stream] == [b"one", b"two", b"alice"]
        joined = await channel.stream_unary(f"/{SERVICE}/StreamUnary")(
            _gen(b"a", b"b"), metadata=_token()
        )
        assert joined == b"a+b"
        both = channel.stream_stream(f"/{SERVICE}/StreamStream")(_gen(b"a"), metadata=_token())
        assert [r async for r in both] == [b"A"]

    run(scenario)
    lines = _access_lines(caplog)
    assert [line.split(" duration_ms=")[0] for line in lines] == [
        f"rpc method={SERVICE}/UnaryStream caller=alice code=OK",
        f"rpc method={SERVICE}/StreamUnary caller=alice code=OK",
        f"rpc method={SERVICE}/StreamStream caller=alice code=OK",
    ]


def test_domain_error_inside_a_stream_is_mapped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailsvc.access")

    async def scenario(channel: grpc.aio.Channel, _: RpcInterceptor) -> None:
        received: list[bytes] = []
        stream = channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"fail", metadata=_token())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for response in stream:
                received.append(response)
        assert received == [b"one", b"two", b"alice"]  # what was streamed before the error
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "no message 'm-1'"
        assert _reason(caught.value) == "MESSAGE_NOT_FOUND"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.stream_unary(f"/{SERVICE}/StreamUnary")(
                _gen(b"a", b"fail"), metadata=_token()
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario)
    codes = [line.split(" code=")[1].split()[0] for line in _access_lines(caplog)]
    assert codes == ["NOT_FOUND", "NOT_FOUND"]


def test_unexpected_error_is_internal_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(channel: grpc.aio.Channel, _: RpcInterceptor) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{SERVICE}/UnaryUnary")(b"x", metadata=_token())
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "a bug" not in str(caught.value.details())

    run(scenario)


def test_draining_refuses_streaming_calls() -> None:
    async def scenario(channel: grpc.aio.Channel, interceptor: RpcInterceptor) -> None:
        interceptor.draining = True
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _drain(channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"x"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _reason(caught.value) == "SHUTTING_DOWN"

    run(scenario)


def test_refused_call_never_reads_the_request_stream() -> None:
    """A refused client-streaming call is answered while the client is still sending."""

    async def scenario(channel: grpc.aio.Channel, _: RpcInterceptor) -> None:
        more = asyncio.Event()

        async def endless() -> AsyncIterator[bytes]:
            yield b"first"
            await more.wait()  # never set: the request stream never ends
            yield b"never"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.stream_unary(f"/{SERVICE}/StreamUnary")(endless())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(scenario)
