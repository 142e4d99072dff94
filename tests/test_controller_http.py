"""The HTTP API on a real uvicorn server, with fake workers: shapes, errors, SSE, 429, metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
from controller_fakes import FakeWorkers, close, http_server, make_controller, node_status, run, until


async def cluster(workers: FakeWorkers | None = None):
    ctl = await make_controller(workers=workers or FakeWorkers())
    await ctl.node_report(node_status("n1"), register=True)
    return ctl


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_admin_endpoints_create_list_get_update_delete(demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                r = await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                assert r.status_code == 201, r.text
                d = r.json()
                for field, value in {"name": "demo", "checkpoint": str(demo_checkpoint.resolve()),
                                     "backend": "transformers", "min_instances": 0, "max_instances": 4,
                                     "target_concurrency": 8, "keep_alive_s": 60.0, "queue_limit": 100}.items():
                    assert d[field] == value, field
                assert d["checkpoint_bytes"] > 0
                listed = (await c.get("/v1/deployments")).json()
                assert [x["name"] for x in listed["data"]] == ["demo"]
                r = await c.patch("/v1/deployments/demo", json={"max_instances": 2, "keep_alive_s": 5})
                assert r.status_code == 200 and (r.json()["max_instances"], r.json()["keep_alive_s"]) == (2, 5)
                r = await c.patch("/v1/deployments/demo", json={"min_instances": 3})
                assert r.status_code == 400 and "min_instances" in error_of(r)["message"]
                assert (await c.get("/v1/deployments/demo")).json()["max_instances"] == 2
                # A zero-instance deployment is listed as a model, never a 404.
                models = (await c.get("/v1/models")).json()
                assert models["data"][0]["id"] == "demo" and models["data"][0]["object"] == "model"
                nodes = (await c.get("/v1/nodes")).json()["data"]
                assert nodes[0]["id"] == "n1" and nodes[0]["state"] == "up"
                assert set(nodes[0]["tiers"]) == {"dram", "disk"}
                assert set(nodes[0]["tiers"]["disk"]) >= {"capacity_bytes", "used_bytes", "checkpoints", "read_gbps"}
                assert (await c.get("/v1/instances")).json() == {"object": "list", "data": []}
                r = await c.delete("/v1/deployments/demo")
                assert r.status_code == 200 and r.json()["deleted"] is True
                r = await c.get("/v1/deployments/demo")
                assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
                r = await c.delete("/v1/deployments/demo")
                assert r.status_code == 404
        finally:
            await close(ctl)

    run(body)


def test_bad_deployments_are_refused_with_the_reason(demo_checkpoint: Path, tmp_path: Path) -> None:
    not_a_checkpoint = tmp_path / "plain-dir"
    not_a_checkpoint.mkdir()
    truncated = tmp_path / "truncated.ember"
    shutil.copytree(demo_checkpoint, truncated)
    part = truncated / "part-00000.bin"
    part.write_bytes(part.read_bytes()[:1000])

    async def body() -> None:
        ctl = await cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                async def deploy(**fields) -> httpx.Response:
                    return await c.post("/v1/deployments", json={"name": "demo", **fields})

                r = await deploy(checkpoint=str(tmp_path / "missing"))
                err = error_of(r)
                assert r.status_code == 400 and str(tmp_path / "missing") in err["message"]
                assert "does not exist" in err["message"] and err["param"] == "checkpoint"
                r = await deploy(checkpoint=str(not_a_checkpoint))
                assert r.status_code == 400 and "ember.json" in error_of(r)["message"]
                r = await deploy(checkpoint=str(truncated))
                assert r.status_code == 400 and "part-00000.bin" in error_of(r)["message"]
                r = await deploy(checkpoint="ftp://host/model")
                assert r.status_code == 400 and "scheme" in error_of(r)["message"]
                r = await deploy(checkpoint=str(demo_checkpoint), min_instances=2, max_instances=1)
                assert r.status_code == 422 and "max_instances" in error_of(r)["message"]
                r = await c.post("/v1/deployments", json={"name": "bad name!", "checkpoint": str(demo_checkpoint)})
                assert r.status_code == 422 and error_of(r)["param"] == "name"
                r = await c.post("/v1/deployments", json={"name": "demo"})
                assert r.status_code == 422 and error_of(r)["param"] == "checkpoint"
                assert "required" in error_of(r)["message"]
                r = await deploy(checkpoint=str(demo_checkpoint), max_instnaces=3)
                assert r.status_code == 422 and error_of(r)["param"] == "max_instnaces"
                assert (await deploy(checkpoint=str(demo_checkpoint))).status_code == 201
                r = await deploy(checkpoint=str(demo_checkpoint))
                assert r.status_code == 409 and "already exists" in error_of(r)["message"]
        finally:
            await close(ctl)

    run(body)


def test_s3_checkpoints_are_checked_at_deploy(demo_checkpoint: Path, s3_server: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="http-deploy-check")
    for f in demo_checkpoint.iterdir():
        s3.upload_file(str(f), "http-deploy-check", f"models/tiny/{f.name}")

    async def body() -> None:
        ctl = await cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                r = await c.post("/v1/deployments", json={"name": "s3", "checkpoint": "s3://http-deploy-check/models/tiny/"})
                assert r.status_code == 201, r.text
                assert r.json()["checkpoint"] == "s3://http-deploy-check/models/tiny"
                assert r.json()["checkpoint_bytes"] == sum(
                    f.stat().st_size for f in demo_checkpoint.glob("part-*.bin"))
                r = await c.post("/v1/deployments", json={"name": "s3b", "checkpoint": "s3://http-deploy-check/nope"})
                err = error_of(r)
                assert r.status_code == 400 and "s3://http-deploy-check/nope/ember.json" in err["message"]
                r = await c.post("/v1/deployments", json={"name": "s3c", "checkpoint": "s3://no-such-bucket-x/m"})
                assert r.status_code == 400 and "no-such-bucket-x" in error_of(r)["message"]
        finally:
            await close(ctl)

    run(body)


def test_openai_errors_name_the_model_or_field(demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
                r = await c.post("/v1/chat/completions", json={**chat, "model": "nope"})
                err = error_of(r)
                assert r.status_code == 404 and err["code"] == "model_not_found" and "'nope'" in err["message"]
                assert "demo" in err["message"]  # says what exists
                r = await c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
                assert r.status_code == 404
                r = await c.post("/functions/nope/invoke", json={"prompt": "x"})
                assert r.status_code == 404
                r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
                assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
                r = await c.post("/v1/chat/completions", json={**chat, "temperature": 7})
                assert r.status_code == 422 and error_of(r)["param"] == "temperature"
                r = await c.post("/v1/chat/completions", json={"model": "demo"})
                assert r.status_code == 422 and error_of(r)["param"] == "messages"
                r = await c.post("/v1/chat/completions", json={**chat, "messages": [{"role": "robot", "content": "x"}]})
                assert r.status_code == 422 and error_of(r)["param"] == "messages.0.role"
                r = await c.post("/v1/chat/completions", json={**chat, "n": 2})
                assert r.status_code == 422 and error_of(r)["param"] == "n"
                r = await c.post("/functions/demo/invoke", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
                assert r.status_code == 422 and "exactly one" in error_of(r)["message"]
                r = await c.get("/v1/nowhere")
                assert r.status_code == 404 and "/v1/nowhere" in error_of(r)["message"]
        finally:
            await close(ctl)

    run(body)


def test_completions_chat_and_invoke_answer_in_openai_shapes(demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                r = await c.post("/v1/chat/completions",
                                 json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
                body = r.json()
                assert r.status_code == 200 and body["object"] == "chat.completion"
                assert body["choices"][0]["message"] == {"role": "assistant", "content": "t0 t1 t2 "}
                assert body["choices"][0]["finish_reason"] == "length"
                assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
                assert r.headers["x-ember-node"] == "n1"
                r = await c.post("/v1/completions", json={"model": "demo", "prompt": ["a", "b"], "max_tokens": 3})
                body = r.json()
                assert [ch["index"] for ch in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 6
                r = await c.post("/functions/demo/invoke", json={"prompt": "hi"})
                body = r.json()
                assert body["text"] == "t0 t1 t2 " and body["node"] == "n1" and body["cold_start"] is False
                r = await c.post("/functions/demo/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200 and r.json()["model"] == "demo"
        finally:
            await close(ctl)

    run(body)


def test_a_streaming_client_waiting_on_a_cold_start_gets_progress_comments(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await cluster(workers)
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
                await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                lines: list[str] = []
                request = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                           "stream_options": {"include_usage": True}}
                async with c.stream("POST", "/v1/chat/completions", json=request) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if line.startswith(": loading") and not workers.load_gates.get("released"):
                            workers.release_loads()
                            workers.load_gates["released"] = asyncio.Event()
                comments = [line for line in lines if line.startswith(":")]
                data = [line[6:] for line in lines if line.startswith("data: ")]
                assert comments and comments[0].startswith(": loading ") and "%" in comments[0]
                assert lines.index(comments[0]) < lines.index("data: " + data[0])
                chunks = [json.loads(d) for d in data[:-1]]
                assert data[-1] == "[DONE]"
                assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
                text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
                assert text == "t0 t1 t2 "
                assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []
                assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
        finally:
            await close(ctl)

    run(body)


def test_a_full_queue_is_a_429_with_retry_after(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_loads = True
        ctl = await cluster(workers)
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
                await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint),
                                                      "queue_limit": 1, "max_instances": 1})
                first = asyncio.create_task(c.post("/functions/demo/invoke", json={"prompt": "a"}))
                await until(lambda: ctl.deployment_view("demo").queued == 1, "first queued")
                r = await c.post("/functions/demo/invoke", json={"prompt": "b"})
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert error_of(r)["type"] == "rate_limit_error"
                r = await c.post("/v1/chat/completions", json={"model": "demo", "stream": True,
                                                               "messages": [{"role": "user", "content": "c"}]})
                assert r.status_code == 429  # refused before the stream starts, not inside it
                workers.release_loads()
                assert (await first).status_code == 200
        finally:
            await close(ctl)

    run(body)


def test_a_client_that_disconnects_cancels_its_request(demo_checkpoint: Path) -> None:
    async def body() -> None:
        workers = FakeWorkers()
        workers.hold_generation = asyncio.Event()
        ctl = await cluster(workers)
        try:
            async with http_server(ctl) as url:
                async with httpx.AsyncClient(base_url=url) as c:
                    await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                for stream in (False, True):
                    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                        task = asyncio.create_task(c.post("/functions/demo/invoke", json={"prompt": "a", "stream": stream}))
                        await until(lambda: workers.generating == 1, "generating")
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                    await until(lambda: workers.generating == 0, f"worker stream cancelled (stream={stream})")
                    assert ctl.deployment_view("demo").in_flight == 0
                assert workers.cancelled == 2
        finally:
            await close(ctl)

    run(body)


def test_health_readiness_and_metrics(demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                assert (await c.get("/healthz")).json() == {"status": "ok"}
                ready = await c.get("/readyz")
                assert ready.status_code == 200 and ready.json()["nodes_up"] == 1
                await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                await c.post("/functions/demo/invoke", json={"prompt": "a"})
                await c.post("/functions/demo/invoke", json={"prompt": "a"})
                text = (await c.get("/metrics")).text
                for name in ("ember_controller_queue_length", "ember_controller_cold_starts_total",
                             'ember_controller_cold_start_phase_seconds_count{phase="queue_wait",tier="disk"}',
                             'phase="scheduling"', 'phase="fetch"', 'phase="load"', 'phase="init"',
                             'phase="first_token"', 'ember_controller_time_to_ready_seconds_count{kind="estimated"',
                             'kind="actual"', "ember_controller_time_to_ready_actual_over_estimated",
                             "ember_controller_time_to_first_token_seconds_bucket",
                             "ember_controller_inter_token_latency_seconds_bucket",
                             "ember_controller_scheduling_decision_seconds"):
                    assert name in text, name
                assert 'ember_controller_cold_starts_total{deployment="demo",tier="disk"} 1.0' in text
        finally:
            await close(ctl)

    run(body)
