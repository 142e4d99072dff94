"""Shared-token authentication between controller and workers.

One secret (EMBER_WORKER_TOKEN) is enough inside a cluster: the controller presents it on every
Worker RPC and the worker presents it on NodeRegistry calls, as gRPC metadata
`authorization: Bearer <token>`. Without the variable the worker accepts every caller, which
suits a single machine bound to loopback.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

TOKEN_ENV = "EMBER_WORKER_TOKEN"
AUTH_HEADER = "authorization"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses RPCs without the right bearer token with UNAUTHENTICATED (before any handler runs)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the worker token must not be empty")
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong worker token: send metadata 'authorization: Bearer <EMBER_WORKER_TOKEN>'",
            )

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await deny(request, context)
            yield  # pragma: no cover - abort raises before this

        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)
        self._deny_bidi = grpc.stream_stream_rpc_method_handler(deny_stream)  # MigrateIn

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_HEADER:
                presented = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(presented, self._expected):
                    return await continuation(handler_call_details)
                break
        handler = await continuation(handler_call_details)
        if handler is not None and handler.request_streaming and handler.response_streaming:
            return self._deny_bidi
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary
