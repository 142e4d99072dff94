"""Property tests of request decoding: whatever JSON, query or protobuf field values arrive, the
controller answers a 4xx (or a valid answer) — never a 500, an INTERNAL, a hang or a dead server.

The app is the real one (HTTP on uvicorn, gRPC on grpc.aio) with fake workers, running on a
loop in a thread of its own so hypothesis can drive it with plain blocking clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from controller_fakes import FakeWorkers, close, make_controller, node_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.api import controller_pb2 as cpb
from ember.api import controller_pb2_grpc as cpb_grpc
from ember.api import worker_pb2 as wpb

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                          max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream", "stream_options", "echo", "n", "name", "checkpoint", "min_instances",
          "max_instances", "target_concurrency", "keep_alive_s", "queue_limit", "backend", "scope", "deployments",
          "node", "mode", "role", "content"]
# Bodies shaped like the real ones (known keys, any values) reach deeper than random dictionaries.
shaped_body = st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=8)
ROUTES = [("POST", "/v1/deployments"), ("PATCH", "/v1/deployments/demo"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/functions/demo/invoke"),
          ("POST", "/functions/demo/v1/chat/completions"), ("POST", "/v1/keys"),
          # Not n1's drain: a drained node would starve the other tests' requests.
          ("POST", "/v1/instances/nope/migrate"), ("POST", "/v1/nodes/nope/drain")]


@contextlib.contextmanager
def running_controller(demo_checkpoint: Path) -> Iterator[tuple[str, str]]:
    """(HTTP URL, gRPC address) of a controller with one fake node and a deployment "demo"."""
    import uvicorn

    from ember.controller.grpc_api import add_services
    from ember.controller.grpc_auth import ControllerAuthInterceptor
    from ember.controller.http_api import create_app
    from ember.controller.models import DeploymentSpec

    ready = threading.Event()
    state: dict = {}

    async def main() -> None:
        ctl = await make_controller(workers=FakeWorkers())
        await ctl.node_report(node_status("n1"), register=True)
        await ctl.create_deployment(DeploymentSpec(name="demo", checkpoint=str(demo_checkpoint)))
        grpc_server = grpc.aio.server(interceptors=[ControllerAuthInterceptor(ctl.auth, ctl.limiter)])
        add_services(grpc_server, ctl)
        grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        server = uvicorn.Server(uvicorn.Config(create_app(ctl), log_level="warning", lifespan="off"))
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        state.update(url=f"http://127.0.0.1:{sock.getsockname()[1]}", grpc=f"127.0.0.1:{grpc_port}", server=server)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        ready.set()
        try:
            await task
        finally:
            await grpc_server.stop(1)
            await close(ctl)
            sock.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(60), "the controller did not start"
    try:
        yield state["url"], state["grpc"]
    finally:
        state["server"].should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def controller(demo_checkpoint: Path) -> Iterator[tuple[str, str]]:
    with running_controller(demo_checkpoint) as where:
        yield where


@pytest.fixture(scope="module")
def deploy_controller(demo_checkpoint: Path) -> Iterator[tuple[str, str]]:
    """A controller of its own for the Deploy fuzzing: deployments it creates (some with instances
    to keep warm) must not take the capacity the other tests' requests need."""
    with running_controller(demo_checkpoint) as where:
        yield where


def _assert_client_error_or_answer(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"], what


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.one_of(shaped_body, json_value))
def test_http_json_bodies_never_cause_a_server_error(controller, route, body) -> None:
    url, _ = controller
    method, path = route
    with httpx.Client(base_url=url, timeout=30) as c:
        # json.dumps writes NaN/Infinity (non-standard, but Python's own parser reads them): the server must cope.
        r = c.request(method, path, content=json.dumps(body), headers={"content-type": "application/json"})
        _assert_client_error_or_answer(r, f"{method} {path} {body!r}")
        assert c.get("/healthz").status_code == 200


@FUZZ
@given(route=st.sampled_from(ROUTES), raw=st.binary(max_size=200),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_http_raw_bytes_never_cause_a_server_error(controller, route, raw, content_type) -> None:
    url, _ = controller
    method, path = route
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.request(method, path, content=raw, headers={"content-type": content_type} if content_type else {})
        _assert_client_error_or_answer(r, f"{method} {path} {raw!r}")


@FUZZ
@given(path=st.sampled_from(["/v1/instances", "/v1/deployments/{}", "/v1/models/{}", "/v1/instances/{}",
                             "/v1/nodes/{}", "/v1/migrations/{}", "/functions/{}/invoke"]),
       name=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
       params=st.dictionaries(st.sampled_from(["deployment", "wait", "x"]), st.text(max_size=20), max_size=3))
def test_http_paths_and_query_params_never_cause_a_server_error(controller, path, name, params) -> None:
    url, _ = controller
    from urllib.parse import quote

    target = path.format(quote(name, safe="") or "x")
    with httpx.Client(base_url=url, timeout=30) as c:
        method = "POST" if target.endswith("/invoke") else "GET"
        _assert_client_error_or_answer(c.request(method, target, params=params, json={"prompt": "hi"}),
                                       f"{method} {target} {params}")


OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
opt_int = st.one_of(st.none(), st.integers(min_value=-(2**31), max_value=2**31 - 1))
opt_float = st.one_of(st.none(), st.floats(width=32, allow_nan=True, allow_infinity=True))
text = st.text(max_size=30)


def _fields(**values):
    return {k: v for k, v in values.items() if v is not None}


@FUZZ
@given(name=text, checkpoint=text, backend=text, min_i=opt_int, max_i=opt_int, conc=opt_int, keep=opt_float,
       queue=opt_int)
def test_grpc_deploy_fields_never_cause_an_internal_error(deploy_controller, name, checkpoint, backend, min_i, max_i,
                                                          conc, keep, queue) -> None:
    _, address = deploy_controller
    request = cpb.DeployRequest(name=name, checkpoint=checkpoint, backend=backend, **_fields(
        min_instances=min_i, max_instances=max_i, target_concurrency=conc, keep_alive_s=keep, queue_limit=queue))
    with grpc.insecure_channel(address) as channel:
        stub = cpb_grpc.ControllerStub(channel)
        try:
            stub.Deploy(request, timeout=30)
            stub.Delete(cpb.DeleteRequest(name=name), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in OK_CODES, (request, exc.code(), exc.details())
        assert stub.List(cpb.ListRequest(), timeout=30) is not None


@FUZZ
@given(deployment=st.one_of(st.just("demo"), text), prompt=st.one_of(st.none(), text),
       messages=st.lists(st.tuples(text, text), max_size=3), max_tokens=opt_int, temperature=opt_float,
       top_p=opt_float, top_k=opt_int, seed=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
       stop=st.lists(text, max_size=3))
def test_grpc_invoke_fields_never_cause_an_internal_error(controller, deployment, prompt, messages, max_tokens,
                                                          temperature, top_p, top_k, seed, stop) -> None:
    _, address = controller
    sampling = wpb.SamplingParams(stop=stop, **_fields(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                                       top_k=top_k, seed=seed))
    request = cpb.InvokeRequest(deployment=deployment, sampling=sampling, **_fields(prompt=prompt))
    for role, content in messages:
        request.messages.add(role=role, content=content)
    with grpc.insecure_channel(address) as channel:
        try:
            for _ in cpb_grpc.ControllerStub(channel).Invoke(request, timeout=30):
                pass
        except grpc.RpcError as exc:
            assert exc.code() in OK_CODES, (request, exc.code(), exc.details())
