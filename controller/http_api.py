"""HTTP API (FastAPI): OpenAI-compatible /v1, function-per-model /functions, admin, health, metrics.

Every error answers in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, so the
official `openai` client raises its usual exceptions with our messages. Streaming answers are
Server-Sent Events; while a request waits for a cold start, SSE comment lines (": loading 42%")
carry the load's progress and keep proxies from closing an idle connection. A client that goes
away cancels its request: streaming responses notice at once (Starlette listens for the
disconnect), non-streaming ones race the generation against the disconnect message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember.controller.app import Controller
from ember.controller.auth import admin_check, http_guard, is_generation
from ember.controller.errors import BadRequest, ControllerError, ModelNotFound
from ember.controller.inference import Generation, Progress, Tokens
from ember.controller.keys_routes import keys_router
from ember.controller.limits import BodyLimitMiddleware, KeyLimitMiddleware, check_generate_input
from ember.controller.metrics import CONTENT_TYPE
from ember.controller.migration_routes import migration_router
from ember.controller.models import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    DeploymentSpec,
    DeploymentUpdate,
    FunctionChatRequest,
    InvokeRequest,
    SamplingFields,
)
from ember.controller.status_page import status_router
from ember.controller.worker_client import GenerateInput

log = logging.getLogger("ember.controller.http")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499


def _error_response(exc: ControllerError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _plain_error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return _plain_error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                            "invalid_request_error", "invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = f"invalid value for '{param}': {first['msg']}" if param else f"invalid request: {first['msg']}"
    if first.get("type") == "missing":
        message = f"'{param}' is required" if param else "the request body is required"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return _plain_error(422, message, "invalid_request_error", "invalid_value", param)


def generate_input(body: SamplingFields, *, prompt: Any = None,
                   messages: list[ChatMessageIn] | None = None, max_tokens: int | None = None) -> GenerateInput:
    inp = GenerateInput(
        max_tokens=max_tokens if max_tokens is not None else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=body.stop_list(),
        request_id=uuid.uuid4().hex,
    )
    if messages is not None:
        inp.messages = [("system" if m.role == "developer" else m.role, m.text()) for m in messages]
    elif isinstance(prompt, list):
        inp.prompt_token_ids = list(prompt)
    else:
        inp.prompt = prompt
    return inp


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_or_cancel(request: Request, work) -> Any:
    """Run `work` (a coroutine) unless the client disconnects first; then cancel it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _ClientGone()


class _ClientGone(Exception):
    """The client disconnected before its answer was ready (answered 499, which nobody reads)."""


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_comment(progress: Progress) -> str:
    return f": loading {progress.percent:.0f}% ({progress.message})\n\n"


def create_app(ctl: Controller) -> FastAPI:
    app = FastAPI(title="Ember controller", version="0.1.0", docs_url="/docs", redoc_url=None,
                  dependencies=[Depends(http_guard(ctl.auth))])
    app.add_middleware(KeyLimitMiddleware, limiter=ctl.limiter, applies=is_generation)
    app.add_middleware(BodyLimitMiddleware, max_bytes=ctl.config.limits.max_body_bytes)

    @app.exception_handler(ControllerError)
    async def _controller_error(request: Request, exc: ControllerError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(exc.detail)
        return _plain_error(exc.status_code, message, "invalid_request_error", "not_found" if exc.status_code == 404
                            else "http_error")

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, exc: _ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _plain_error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal")

    # -- health and metrics ---------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not ctl.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        try:
            await asyncio.wait_for(ctl.store.ping(), timeout=5)
        except Exception as exc:  # any store failure means not ready
            return JSONResponse({"status": "state store unreachable", "error": str(exc)}, status_code=503)
        nodes = sum(1 for n in ctl.cluster.nodes.values() if n.up)
        return JSONResponse({"status": "ready", "nodes_up": nodes, "deployments": len(ctl.router.deployments)})

    @app.get("/metrics")
    async def metrics() -> Response:
        ctl.refresh_metrics()
        return Response(ctl.metrics.render(), media_type=CONTENT_TYPE)

    # -- admin ----------------------------------------------------------------------------------

    @app.post("/v1/deployments", status_code=201)
    async def create_deployment(spec: DeploymentSpec) -> dict:
        return (await ctl.create_deployment(spec)).model_dump()

    @app.get("/v1/deployments")
    async def list_deployments() -> dict:
        return {"object": "list", "data": [d.model_dump() for d in ctl.list_deployments()]}

    @app.get("/v1/deployments/{name}")
    async def get_deployment(name: str) -> dict:
        return ctl.deployment_view(name).model_dump()

    @app.patch("/v1/deployments/{name}")
    async def update_deployment(name: str, update: DeploymentUpdate) -> dict:
        return (await ctl.update_deployment(name, update)).model_dump()

    @app.delete("/v1/deployments/{name}")
    async def delete_deployment(name: str) -> dict:
        deleted = await ctl.delete_deployment(name)
        return {**deleted.model_dump(), "deleted": True}

    @app.get("/v1/instances")
    async def list_instances(deployment: str | None = None) -> dict:
        if deployment is not None:
            ctl.router.get(deployment)
        return {"object": "list", "data": [i.model_dump() for i in ctl.list_instances(deployment)]}

    @app.get("/v1/instances/{instance_id}")
    async def get_instance(instance_id: str) -> dict:
        return ctl.get_instance(instance_id).model_dump()

    @app.get("/v1/nodes")
    async def list_nodes() -> dict:
        return {"object": "list", "data": [n.model_dump() for n in ctl.list_nodes()]}

    @app.get("/v1/nodes/{node_id}")
    async def get_node(node_id: str) -> dict:
        return ctl.get_node(node_id).model_dump()

    # -- OpenAI-compatible ------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        allowed = getattr(getattr(request.state, "principal", None), "deployments", None)  # a limited invoke key
        return {"object": "list", "data": [
            {"id": d.name, "object": "model", "created": int(d.created_at), "owned_by": "ember"}
            for d in ctl.list_deployments() if allowed is None or d.name in allowed
        ]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        d = _deployment(name)
        return {"id": d.name, "object": "model", "created": int(d.created_at), "owned_by": "ember"}

    def _deployment(name: str):
        if name not in ctl.router.deployments:
            raise ModelNotFound(name, list(ctl.router.deployments))
        return ctl.router.deployments[name].record

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _deployment(body.model)
        return await _chat(request, body.model, body, body.messages, body.max_completion_tokens)

    @app.post("/functions/{name}/v1/chat/completions")
    async def function_chat(name: str, body: FunctionChatRequest, request: Request) -> Response:
        _deployment(name)
        if body.model is not None and body.model != name:
            raise BadRequest(f"'model' is {body.model!r} but this endpoint serves {name!r}; omit 'model' or use "
                             "/v1/chat/completions", param="model")
        return await _chat(request, name, body, body.messages, body.max_completion_tokens)

    async def _chat(request: Request, model: str, body: SamplingFields, messages: list[ChatMessageIn],
                    max_completion_tokens: int | None) -> Response:
        inp = generate_input(body, messages=messages, max_tokens=max_completion_tokens or body.max_tokens)
        check_generate_input(inp, ctl.config.limits)
        gen = Generation(ctl, model, inp, progress=body.stream)
        await gen.admit()
        rid, created = f"chatcmpl-{inp.request_id}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return StreamingResponse(_chat_stream(gen, rid, created, model, include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        text, finish, prompt_tokens, completion_tokens = await run_or_cancel(request, gen.collect())
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": _usage(prompt_tokens, completion_tokens),
        }, headers=_where(gen))

    async def _chat_stream(gen: Generation, rid: str, created: int, model: str,
                           include_usage: bool) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        usage = (0, 0)
        started = False
        async for event in _guarded(gen):
            if isinstance(event, str):
                yield event
                continue
            if isinstance(event, Progress):
                yield sse_comment(event)
                continue
            if not started:
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                started = True
            usage = (max(usage[0], event.prompt_tokens), max(usage[1], event.completion_tokens))
            if event.text:
                yield sse(chunk({"content": event.text}, None))
            if event.finish_reason:
                yield sse(chunk({}, event.finish_reason))
        if started and include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": _usage(*usage)})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _deployment(body.model)
        prompts: list[Any]
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            prompts = list(body.prompt)
        else:
            prompts = [body.prompt]
        if body.stream and len(prompts) > 1:
            raise BadRequest("streaming takes a single prompt; send one request per prompt", param="prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        inputs = [generate_input(body, prompt=p) for p in prompts]
        for inp in inputs:
            check_generate_input(inp, ctl.config.limits)
        gens = [Generation(ctl, body.model, inp, progress=body.stream) for inp in inputs]
        try:
            for gen in gens:
                await gen.admit()
        except BaseException:
            for gen in gens:
                gen.close()
            raise
        echo = [p if body.echo and isinstance(p, str) else "" for p in prompts]
        if body.stream:
            return StreamingResponse(_completion_stream(gens[0], rid, created, body.model, include_usage, echo[0]),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        async def all_of() -> list:
            return await asyncio.gather(*(g.collect() for g in gens))

        try:
            results = await run_or_cancel(request, all_of())
        finally:
            for gen in gens:
                gen.close()
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": i, "text": echo[i] + text, "logprobs": None, "finish_reason": finish}
                        for i, (text, finish, _, _) in enumerate(results)],
            "usage": _usage(sum(r[2] for r in results), sum(r[3] for r in results)),
        }, headers=_where(gens[0]))

    async def _completion_stream(gen: Generation, rid: str, created: int, model: str, include_usage: bool,
                                 echo: str) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        usage = (0, 0)
        started = False
        async for event in _guarded(gen):
            if isinstance(event, str):
                yield event
                continue
            if isinstance(event, Progress):
                yield sse_comment(event)
                continue
            usage = (max(usage[0], event.prompt_tokens), max(usage[1], event.completion_tokens))
            text = event.text
            if not started:
                text, started = echo + text, True
            if text or event.finish_reason:
                yield sse(chunk(text, event.finish_reason))
        if started and include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": _usage(*usage)})
        yield "data: [DONE]\n\n"

    # -- function-per-model ---------------------------------------------------------------------

    @app.post("/functions/{name}/invoke")
    async def invoke(name: str, body: InvokeRequest, request: Request) -> Response:
        _deployment(name)
        inp = generate_input(body, prompt=body.prompt, messages=body.messages)
        check_generate_input(inp, ctl.config.limits)
        gen = Generation(ctl, name, inp, progress=body.stream)
        await gen.admit()
        rid = f"inv-{inp.request_id}"
        if body.stream:
            return StreamingResponse(_invoke_stream(gen, rid, name), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        text, finish, prompt_tokens, completion_tokens = await run_or_cancel(request, gen.collect())
        return JSONResponse({
            "id": rid, "deployment": name, "text": text, "finish_reason": finish,
            "usage": _usage(prompt_tokens, completion_tokens),
            "instance": gen.instance, "node": gen.node, "cold_start": gen.cold_start,
        }, headers=_where(gen))

    async def _invoke_stream(gen: Generation, rid: str, name: str) -> AsyncIterator[str]:
        usage = (0, 0)
        async for event in _guarded(gen):
            if isinstance(event, str):
                yield event
            elif isinstance(event, Progress):
                yield sse_comment(event)
            else:
                usage = (max(usage[0], event.prompt_tokens), max(usage[1], event.completion_tokens))
                if event.text:
                    yield sse({"id": rid, "text": event.text})
                if event.finish_reason:
                    yield sse({"id": rid, "deployment": name, "finish_reason": event.finish_reason,
                               "usage": _usage(*usage), "instance": gen.instance, "node": gen.node,
                               "cold_start": gen.cold_start})
        yield "data: [DONE]\n\n"

    app.include_router(status_router(ctl, authorize=admin_check(ctl.auth) if ctl.auth.enabled else None))
    app.include_router(migration_router(ctl))
    app.include_router(keys_router(ctl.auth))
    return app


async def _guarded(gen: Generation) -> AsyncIterator[Progress | Tokens | str]:
    """The generation's events; an error after the response started becomes an SSE error event."""
    try:
        async for event in gen.events():
            yield event
    except ControllerError as exc:
        yield sse(exc.body())
    finally:
        gen.close()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _where(gen: Generation) -> dict[str, str]:
    headers = {}
    if gen.instance:
        headers["x-ember-instance"] = gen.instance
    if gen.node:
        headers["x-ember-node"] = gen.node
    if gen.cold_start:
        headers["x-ember-cold-start"] = "1"
    return headers
