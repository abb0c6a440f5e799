"""One interceptor for every RPC of ours: authenticate, refuse while draining, map errors to
status, count and log access. Every kind of handler is wrapped: no call passes unchecked."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from mailsvc.api.callstate import CallInfo, current_call, set_call
from mailsvc.api.status import domain_error, internal_status, to_status
from mailsvc.auth import TokenVerifier
from mailsvc.errors import MailsvcError, ResourceExhausted, Unavailable
from mailsvc.metrics import Metrics

log = logging.getLogger("mailsvc.access")
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_CANCELLED = (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit)

Handler = Callable[..., Any]
Done = Callable[[CallInfo | None, str, float], None]


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return str(value)
    return None


class RequestBudget:
    """Bounds the bytes that requests being handled hold together (one always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        if self.held and self.held + size > self.limit:
            raise ResourceExhausted(
                "the server holds too many large requests right now; retry later",
                reason="TOO_MUCH_REQUEST_DATA_IN_FLIGHT",
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self, verifier: TokenVerifier, metrics: Metrics, *, max_request_memory: int = 1 << 62
    ) -> None:
        self._verifier = verifier
        self._metrics = metrics
        self._budget = RequestBudget(max_request_memory)
        self.draining = False  # set at shutdown: calls not yet started are refused
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, Done]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.startswith(_PUBLIC_PREFIXES):
            return await continuation(details)
        start = time.perf_counter()
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        # Credentials are checked here, before gRPC reads the request body: a refused call
        # costs no memory for its body, however large.
        try:
            if self.draining:
                raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
            principal = self._verifier.principal(_authorization(details.invocation_metadata))
        except MailsvcError as exc:
            return _refusal(exc, wrapped[1], start)
        set_call(CallInfo(principal, start))
        return wrapped[0]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> tuple[Any, Done]:
        """The handler with error mapping, metrics and the access log, for every kind."""
        done = self._recorder(method.lstrip("/"))
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner = _unary_response(handler.unary_unary, method, done, self._budget)
            return grpc.unary_unary_rpc_method_handler(inner, **codecs), done
        if handler.stream_unary is not None:
            inner = _unary_response(handler.stream_unary, method, done)
            return grpc.stream_unary_rpc_method_handler(inner, **codecs), done
        if handler.unary_stream is not None:
            inner = _stream_response(handler.unary_stream, method, done)
            return grpc.unary_stream_rpc_method_handler(inner, **codecs), done
        if handler.stream_stream is not None:
            inner = _stream_response(handler.stream_stream, method, done)
            return grpc.stream_stream_rpc_method_handler(inner, **codecs), done
        # A handler of a kind we do not know cannot be checked, so it is never called.
        log.error("refusing %s: its handler is of no known kind", method)
        return _refusal(MailsvcError("internal error; the server log has the details"), done), done

    def _recorder(self, name: str) -> Done:
        rpcs = self._metrics.rpcs
        latency = self._metrics.rpc_seconds.labels(name)
        counters: dict[str, Any] = {}  # code -> child: labels() takes a lock and builds keys

        def done(info: CallInfo | None, code: str, start: float) -> None:
            elapsed = time.perf_counter() - start
            counter = counters.get(code)
            if counter is None:
                counter = counters[code] = rpcs.labels(name, code)
            counter.inc()
            latency.observe(elapsed)
            fields = {
                "method": name,
                "caller": info.principal.sub if info else "-",
                "code": code,
                "duration_ms": round(elapsed * 1000, 2),
                "message_id": (info.message_id if info else "") or "-",
            }
            log.info(
                "rpc method=%s caller=%s code=%s duration_ms=%s message_id=%s",
                *fields.values(),
                extra=fields,
            )

        return done


def _refusal(exc: MailsvcError, done: Done, start: float | None = None) -> Any:
    """A handler that answers `exc` at once. It is request-streaming without a deserializer
    and never reads the request, so HTTP/2 flow control keeps the body off the server."""
    status = to_status(exc)

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        done(None, exc.code, time.perf_counter() if start is None else start)
        await context.abort(status.code, status.details, status.trailing_metadata)

    return grpc.stream_unary_rpc_method_handler(refuse)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    error = domain_error(exc)
    if error is not None:
        if not isinstance(exc, MailsvcError):
            log.error("%s failed: %s", method, exc)
        status = to_status(error)
    else:
        log.error("unexpected error in %s", method, exc_info=exc)
        status = internal_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


def _code(exc: Exception) -> str:
    error = domain_error(exc)
    return error.code if error is not None else "INTERNAL"


def _unary_response(
    inner: Handler, method: str, done: Done, budget: RequestBudget | None = None
) -> Handler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        info = current_call()
        code = "OK"
        size = 0
        try:
            if budget is not None:
                need = request.ByteSize()
                budget.take(need)
                size = need
            return await inner(request, context)
        except _CANCELLED:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = _code(exc)
            await _abort(context, exc, method)
        finally:
            if budget is not None and size:
                budget.give(size)
            done(info, code, info.start)

    return call


def _stream_response(inner: Handler, method: str, done: Done) -> Handler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        info = current_call()
        code = "OK"
        try:
            result = inner(request, context)
            if hasattr(result, "__aiter__"):
                async for response in result:
                    yield response
            else:  # a handler that writes with context.write()
                await result
        except _CANCELLED:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = _code(exc)
            await _abort(context, exc, method)
        finally:
            done(info, code, info.start)

    return call
