"""Limits: body size (413), field caps (400 naming the field), per-key rate and concurrent streams
(429 + Retry-After) on HTTP and gRPC, and which checkpoints a deployment may name (403)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
import pytest
from controller_fakes import FakeWorkers, close, http_server, make_controller, node_status, run, until

from ember.api import controller_pb2 as cpb
from ember.api import controller_pb2_grpc as cpb_grpc
from ember.api import worker_pb2 as wpb
from ember.controller.config import LimitsConfig


async def cluster(demo_checkpoint: Path, workers: FakeWorkers | None = None, **config):
    ctl = await make_controller(workers=workers or FakeWorkers(), **config)
    await ctl.node_report(node_status("n1"), register=True)
    from ember.controller.models import DeploymentSpec

    await ctl.create_deployment(DeploymentSpec(name="demo", checkpoint=str(demo_checkpoint)))
    return ctl


def test_bodies_and_fields_over_the_limits_are_refused_by_name(demo_checkpoint: Path) -> None:
    limits = LimitsConfig(max_body_bytes=2000, max_tokens=16, max_prompt_tokens=4, max_prompt_chars=100)

    async def body() -> None:
        ctl = await cluster(demo_checkpoint, limits=limits)
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                r = await c.post("/functions/demo/invoke", json={"prompt": "x" * 5000})
                assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

                async def chunks():  # no Content-Length: counted as it arrives
                    for _ in range(10):
                        yield b" " * 500

                r = await c.post("/functions/demo/invoke", content=chunks(), headers={"content-type": "application/json"})
                assert r.status_code == 413
                for path, payload, param in (
                    ("/functions/demo/invoke", {"prompt": "hi", "max_tokens": 17}, "max_tokens"),
                    ("/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 100}, "max_tokens"),
                    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "x"}],
                                              "max_completion_tokens": 100}, "max_tokens"),
                    ("/functions/demo/invoke", {"prompt": "y" * 101}, "prompt"),
                    ("/v1/completions", {"model": "demo", "prompt": [1, 2, 3, 4, 5]}, "prompt"),
                    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "z" * 101}]},
                     "messages"),
                ):
                    r = await c.post(path, json=payload)
                    assert r.status_code == 400, (path, r.text)
                    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
                r = await c.post("/functions/demo/invoke", json={"prompt": "hi", "max_tokens": 16})
                assert r.status_code == 200, r.text
        finally:
            await close(ctl)

    run(body)


def test_rate_limit_and_concurrent_streams_per_key(demo_checkpoint: Path) -> None:
    # A refill of one request per ~3 hours: nothing refills while the test runs.
    limits = LimitsConfig(rate_per_s=1e-4, burst=3, max_streams_per_key=1)
    workers = FakeWorkers()

    async def body() -> None:
        ctl = await cluster(demo_checkpoint, workers=workers, limits=limits)
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                workers.hold_generation = asyncio.Event()
                first = asyncio.create_task(c.post("/functions/demo/invoke", json={"prompt": "a"}))
                await until(lambda: workers.generating == 1, "the first generation to run")
                r = await c.post("/functions/demo/invoke", json={"prompt": "b"})
                assert r.status_code == 429 and "generations running" in r.json()["error"]["message"]
                assert int(r.headers["retry-after"]) >= 1
                # Another key has budgets of its own.
                other = asyncio.create_task(c.post("/functions/demo/invoke", json={"prompt": "c"},
                                                   headers={"authorization": "Bearer someone-else"}))
                await until(lambda: workers.generating == 2, "the other key's generation to run")
                workers.hold_generation.set()
                assert (await first).status_code == 200 and (await other).status_code == 200
                # A burst of three: "a", "d" and "e" (the refused "b" spent nothing); "f" is rate limited.
                for prompt in ("d", "e"):
                    assert (await c.post("/functions/demo/invoke", json={"prompt": prompt})).status_code == 200
                r = await c.post("/functions/demo/invoke", json={"prompt": "f"})
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
                assert int(r.headers["retry-after"]) > 60
                # Admin and health calls are not generation calls: never rate limited.
                assert (await c.get("/v1/deployments")).status_code == 200
        finally:
            await close(ctl)

    run(body)


def test_checkpoints_outside_the_allowed_roots_and_buckets_are_forbidden(demo_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    link = tmp_path / "sneaky"
    link.symlink_to("/etc")

    async def body() -> None:
        ctl = await make_controller(workers=FakeWorkers(), checkpoint_roots=[demo_checkpoint.parent],
                                    allowed_buckets=["models"])
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                for checkpoint in ("/etc/passwd", "file:///etc/passwd", str(link / "passwd"),
                                   str(demo_checkpoint.parent / ".." / "elsewhere"), "s3://other-bucket/m.ember"):
                    r = await c.post("/v1/deployments", json={"name": "bad", "checkpoint": checkpoint})
                    assert r.status_code == 403, (checkpoint, r.text)
                    err = r.json()["error"]
                    assert err["param"] == "checkpoint" and err["code"] == "checkpoint_not_allowed"
                    assert ("--checkpoint-root" in err["message"]) or ("--allowed-bucket" in err["message"])
                r = await c.post("/v1/deployments", json={"name": "bad name!", "checkpoint": str(demo_checkpoint)})
                assert r.status_code == 422 and r.json()["error"]["param"] == "name"
                r = await c.post("/v1/deployments", json={"name": "ok", "checkpoint": str(demo_checkpoint)})
                assert r.status_code == 201, r.text
                r = await c.patch("/v1/deployments/ok", json={"checkpoint": "/etc/passwd"})
                assert r.status_code == 403
        finally:
            await close(ctl)

    run(body)


def test_grpc_applies_the_same_limits(demo_checkpoint: Path, tmp_path: Path) -> None:
    from ember.controller.config import ControllerConfig
    from ember.controller.server import serve

    config = ControllerConfig(port=0, grpc_port=0, state=f"sqlite:///{tmp_path / 's.db'}",
                              limits=LimitsConfig(max_tokens=8, rate_per_s=1e-4, burst=2))

    async def scenario() -> None:
        stop = asyncio.Event()
        where: asyncio.Future = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(config, stop=stop, on_listening=where.set_result))
        listening = await asyncio.wait_for(where, 30)
        try:
            async with grpc.aio.insecure_channel(listening.grpc_address) as channel:
                stub = cpb_grpc.ControllerStub(channel)
                await stub.Deploy(cpb.DeployRequest(name="demo", checkpoint=str(demo_checkpoint)), timeout=30)
                too_long = cpb.InvokeRequest(deployment="demo", prompt="hi", sampling=wpb.SamplingParams(max_tokens=9))
                for _ in range(2):  # each takes from the key's burst of 2, then fails on the field
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in stub.Invoke(too_long, timeout=10):
                            pass
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "max_tokens" in info.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.Invoke(too_long, timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in info.value.details()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
