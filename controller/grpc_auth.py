"""The gRPC side of API-key auth and per-key limits: the checks of ember.controller.auth and
ember.controller.limits, applied by a server interceptor so no servicer method can forget them.

An interceptor sees only the method name and metadata, so it wraps the method's handler: the
wrapper runs after the request is decoded, which lets Invoke be checked against the key's
deployments and hold one of the key's generation slots for as long as it streams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from ember.controller.auth import INVOKE, Authenticator, grpc_action
from ember.controller.errors import ControllerError
from ember.controller.limits import KeyLimiter, limiter_key


class ControllerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, limiter: KeyLimiter) -> None:
        self.auth = auth
        self.limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        action = grpc_action(details.method)
        if handler is None or action is None:
            return handler
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode(errors="replace")
        auth, limiter = self.auth, self.limiter
        budget = limiter_key(authorization)

        async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
            deployment = getattr(request, "deployment", None) if action == INVOKE else None
            try:
                await auth.authorize(authorization, action, deployment or None)
            except ControllerError as exc:
                await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(request, context)
                slot = limiter.stream(budget)
                try:
                    slot.__enter__()  # as on HTTP: a request refused for concurrency spends no rate budget
                    limiter.take(budget)
                except ControllerError as exc:
                    slot.__exit__(None, None, None)
                    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
                try:
                    async for message in inner_stream(request, context):
                        yield message
                finally:
                    slot.__exit__(None, None, None)

            return grpc.unary_stream_rpc_method_handler(streaming, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        return handler  # the controller service has no client-streaming methods
