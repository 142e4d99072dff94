"""The status page and /v1/status on a real uvicorn server, with fake workers (browser test: *_browser.py)."""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from controller_fakes import FakeWorkers, close, http_server, make_controller, node_status, run

from ember.controller.recent_events import ColdStart, Migration, RecentEvents
from ember.controller.status_page import STATIC_DIR, ago, human_bytes, redact_url, seconds, short_uri


async def _cluster(node_id: str = "n1"):
    ctl = await make_controller(workers=FakeWorkers())
    await ctl.node_report(node_status(node_id), register=True)
    return ctl


def test_status_json_shows_nodes_deployments_instances_and_the_cold_start(demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await _cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
                r = await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                assert r.status_code == 201, r.text
                before = (await c.get("/v1/status")).json()
                assert before["object"] == "status"
                assert before["summary"] == {"nodes": 1, "nodes_up": 1, "deployments": 1, "instances": {},
                                             "queued": 0, "in_flight": 0}
                assert before["cold_starts"] == [] and before["migrations"] == []
                assert (await c.post("/functions/demo/invoke", json={"prompt": "hi"})).status_code == 200
                status = (await c.get("/v1/status")).json()
        finally:
            await close(ctl)
        assert [n["id"] for n in status["nodes"]] == ["n1"]
        assert set(status["nodes"][0]["tiers"]) == {"dram", "disk"}
        assert [d["name"] for d in status["deployments"]] == ["demo"]
        assert status["deployments"][0]["instances"] == {"ready": 1}
        [instance] = status["instances"]
        assert instance["deployment"] == "demo" and instance["node"] == "n1" and instance["state"] == "ready"
        [cold] = status["cold_starts"]
        assert cold["instance"] == instance["id"] and cold["deployment"] == "demo" and cold["node"] == "n1"
        assert cold["tier"] == "disk" and cold["load_s"] == pytest.approx(0.01) and cold["init_s"] == pytest.approx(0.02)
        assert cold["estimated_s"] == pytest.approx(instance["estimated_ready_s"])
        assert cold["actual_s"] >= 0 and cold["finished_at"] <= time.time()
        assert status["summary"]["instances"] == {"ready": 1}
        assert status["controller"]["state_store"] == "sqlite:///:memory:"

    run(body)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_the_page_renders_everything_escaped_and_needs_nothing_from_outside(demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await _cluster("n<b>1</b>")
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
                empty = await c.get("/")
                assert "Nothing deployed yet" in empty.text and "No migrations yet" in empty.text
                await c.post("/v1/deployments", json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                await c.post("/functions/demo/invoke", json={"prompt": "hi"})
                ctl.recent.migration(Migration(id="m1", instance="demo-1", deployment="demo", source="n<b>1</b>",
                                               target="n2", mode="kv", reason="drain", state="done", requests=2,
                                               started_at=time.time() - 3, finished_at=time.time()))
                page = await c.get("/")
                fragment = await c.get("/status/fragment")
                assets = {name: await c.get(f"/static/{name}") for name in ("status.css", "status.js", "ember.svg")}
        finally:
            await close(ctl)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        html = page.text
        assert "<b>1</b>" not in html and "n&lt;b&gt;1&lt;/b&gt;" in html
        assert 'data-deployment="demo"' in html and "tiny.ember" in html
        assert re.search(r'data-cold-start="demo-[0-9a-f]+"', html)
        assert 'data-migration="m1"' in html and "No migrations yet" not in html
        # The fragment is the page's body without the page around it: what the script swaps in.
        assert "<html" not in fragment.text and 'data-deployment="demo"' in fragment.text
        links = _Links()
        links.feed(html)
        assert links.urls and all(not re.match(r"^[a-z]+:|^//", u) for u in links.urls), links.urls
        for name, response in assets.items():
            assert response.status_code == 200, name
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", response.text), f"{name} links outside"
        assert assets["status.js"].headers["content-type"].startswith("text/javascript")
        assert "status/fragment" in assets["status.js"].text

    run(body)


def test_static_files_outside_the_folder_are_refused() -> None:
    async def body() -> None:
        ctl = await _cluster()
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                for name in ("..%2Fstatus_page.py", "missing.css", ".hidden.css", "status_page.py"):
                    r = await c.get(f"/static/{name}")
                    assert r.status_code == 404, name
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        finally:
            await close(ctl)

    run(body)


def test_the_status_route_is_in_the_openapi_schema() -> None:
    async def body() -> None:
        ctl = await _cluster()
        try:
            from ember.controller.http_api import create_app

            paths = create_app(ctl).openapi()["paths"]
        finally:
            await close(ctl)
        assert "/v1/status" in paths and "/" not in paths and "/status/fragment" not in paths

    run(body)


def test_recent_events_are_bounded_newest_first_and_migrations_update_in_place() -> None:
    recent = RecentEvents(limit=3)
    for i in range(5):
        recent.cold_start(ColdStart(instance=f"i{i}", deployment="d", node="n", tier="disk", actual_s=1.0,
                                    finished_at=float(i)))
    assert [c.instance for c in recent.cold_starts()] == ["i4", "i3", "i2"]
    for i in range(4):
        recent.migration(Migration(id=f"m{i}", instance="i", deployment="d", source="a", started_at=float(i)))
    recent.migration(Migration(id="m2", instance="i", deployment="d", source="a", started_at=2.0, state="done",
                               finished_at=3.0))
    assert [(m.id, m.state) for m in recent.migrations()] == [("m3", "running"), ("m2", "done"), ("m1", "running")]


def test_formatting_helpers() -> None:
    assert human_bytes(8_548_352) == "8.5 MB" and human_bytes(0) == "0 B" and human_bytes(512) == "512 B"
    assert seconds(0.0213) == "21 ms" and seconds(2.114) == "2.11 s" and seconds(5) == "5 s"
    assert seconds(600) == "10 min" and seconds(61) == "1 min 1 s" and seconds(None) == "—"
    assert ago(100.0, 130.0) == "30 s ago" and ago(0, 5.0) == "never" and ago(10.0, 10.2) == "just now"
    assert short_uri("/tmp/models/tiny.ember/") == "tiny.ember"
    assert short_uri("s3://bucket/models/llama") == "s3://…/llama"
    assert redact_url("redis://:secret@cache:6379/0") == "redis://cache:6379/0"
    assert redact_url("redis://user:pw@cache/1") == "redis://cache/1"
    assert redact_url("sqlite:////var/lib/ember.db") == "sqlite:////var/lib/ember.db"
    assert {p.name for p in STATIC_DIR.iterdir()} >= {"status.css", "status.js", "ember.svg"}


def _locked_app(ctl, key: str):
    """The status router alone, behind a bearer-key check (what the controller's auth plugs in)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from ember.controller.errors import ControllerError
    from ember.controller.status_page import status_router

    class Unauthorized(ControllerError):
        status = 401
        type = "authentication_error"
        code = "invalid_api_key"

    async def authorize(request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {key}":
            raise Unauthorized("this controller requires an API key: send 'Authorization: Bearer <key>'")

    app = FastAPI()
    app.add_exception_handler(ControllerError, lambda request, exc: JSONResponse(exc.body(), status_code=exc.status))
    app.include_router(status_router(ctl, authorize=authorize))
    return app


def test_with_api_keys_the_page_asks_for_one_and_the_data_needs_it() -> None:
    async def body() -> None:
        ctl = await _cluster("secret-node")
        try:
            transport = httpx.ASGITransport(app=_locked_app(ctl, "k" * 20))
            async with httpx.AsyncClient(transport=transport, base_url="http://ctl") as c:
                page = await c.get("/")
                fragment = await c.get("/status/fragment")
                status = await c.get("/v1/status")
                css = await c.get("/static/status.css")
                good = await c.get("/status/fragment", headers={"authorization": "Bearer " + "k" * 20})
        finally:
            await close(ctl)
        assert page.status_code == 401 and 'data-locked="1"' in page.text and "API key required" in page.text
        assert "secret-node" not in page.text and "requires an API key" in page.text
        assert fragment.status_code == 401 and fragment.json()["error"]["code"] == "invalid_api_key"
        assert status.status_code == 401 and css.status_code == 200
        assert good.status_code == 200 and 'data-node="secret-node"' in good.text

    run(body)
