"""One contract for every StateStore backend: embedded SQLite and a real redis-server."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from ember.controller.errors import ConfigError, Conflict
from ember.controller.models import (
    CachedCheckpoint,
    DeploymentRecord,
    DeviceInfo,
    InstanceRecord,
    InventoryRecord,
    NodeRecord,
    TierInfo,
)
from ember.controller.state import StateStore, StoreUnavailable, open_store

_db_numbers = itertools.count(1)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store URL of each kind (redis: a database number of its own)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    base = request.getfixturevalue("redis_server")
    return base.rsplit("/", 1)[0] + f"/{next(_db_numbers)}"


def with_store(url: str, body: Callable[[StateStore], Awaitable[None]]) -> None:
    async def scenario() -> None:
        store = await open_store(url)
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(scenario())


def deployment(name: str = "demo", **fields) -> DeploymentRecord:
    return DeploymentRecord(name=name, checkpoint=f"/models/{name}.ember", created_at=1.0, updated_at=1.0, **fields)


def test_deployments_create_get_list_update_delete(store_url: str) -> None:
    async def body(store: StateStore) -> None:
        assert await store.list_deployments() == []
        assert await store.get_deployment("demo") is None
        await store.create_deployment(deployment("demo", max_instances=3))
        await store.create_deployment(deployment("alpha"))
        assert [d.name for d in await store.list_deployments()] == ["alpha", "demo"]
        got = await store.get_deployment("demo")
        assert got is not None and got.max_instances == 3 and got.checkpoint == "/models/demo.ember"

        await store.put_deployment(got.model_copy(update={"max_instances": 5, "updated_at": 2.0}))
        updated = await store.get_deployment("demo")
        assert updated is not None and updated.max_instances == 5 and updated.updated_at == 2.0

        assert await store.delete_deployment("demo") is True
        assert await store.delete_deployment("demo") is False
        assert [d.name for d in await store.list_deployments()] == ["alpha"]

    with_store(store_url, body)


def test_creating_a_duplicate_name_is_a_conflict_and_keeps_the_first(store_url: str) -> None:
    async def body(store: StateStore) -> None:
        await store.create_deployment(deployment("demo", keep_alive_s=5))
        with pytest.raises(Conflict, match="demo"):
            await store.create_deployment(deployment("demo", keep_alive_s=99))
        got = await store.get_deployment("demo")
        assert got is not None and got.keep_alive_s == 5

    with_store(store_url, body)


def test_concurrent_creates_of_one_name_let_exactly_one_win(store_url: str) -> None:
    async def body(store: StateStore) -> None:
        results = await asyncio.gather(
            *(store.create_deployment(deployment("race", queue_limit=i + 1)) for i in range(8)),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 1
        assert all(isinstance(r, Conflict) for r in results if r is not None)

    with_store(store_url, body)


def test_nodes_instances_and_inventory_round_trip(store_url: str) -> None:
    async def body(store: StateStore) -> None:
        node = NodeRecord(
            id="node-a", address="10.0.0.1:50061", last_heartbeat=12.5, version="0.1.0",
            devices=[DeviceInfo(name="cuda:0", total_memory_bytes=80 << 30, free_memory_bytes=70 << 30)],
            s3_read_gbps=0.4,
        )
        await store.put_node(node)
        await store.put_node(NodeRecord(id="node-b", address="10.0.0.2:50061", state="down"))
        assert [n.id for n in await store.list_nodes()] == ["node-a", "node-b"]
        assert await store.get_node("node-a") == node

        inventory = InventoryRecord(
            node="node-a",
            tiers={
                "disk": TierInfo(capacity_bytes=100, used_bytes=40, read_gbps=1.5,
                                 checkpoints=[CachedCheckpoint(uri="s3://b/m", bytes=40, last_used=3.0)]),
                "dram": TierInfo(capacity_bytes=10),
            },
            updated_at=12.5,
        )
        await store.put_inventory(inventory)
        await store.put_inventory(InventoryRecord(node="node-b"))
        assert await store.get_inventory("node-a") == inventory
        assert [i.node for i in await store.list_inventory()] == ["node-a", "node-b"]

        first = InstanceRecord(id="i-1", deployment="demo", node="node-a", created_at=1.0)
        second = InstanceRecord(id="i-2", deployment="demo", node="node-b", created_at=2.0, state="ready",
                                ready_at=3.0, source_tier="disk", estimated_ready_s=1.5, actual_ready_s=1.0)
        other = InstanceRecord(id="i-3", deployment="other", node="node-a", created_at=0.5)
        for record in (second, other, first):
            await store.put_instance(record)
        assert [i.id for i in await store.list_instances("demo")] == ["i-1", "i-2"]
        assert len(await store.list_instances()) == 3
        assert await store.get_instance("i-2") == second
        await store.put_instance(first.model_copy(update={"state": "ready"}))
        got = await store.get_instance("i-1")
        assert got is not None and got.state == "ready"
        assert await store.delete_instance("i-1") is True
        assert await store.get_instance("i-1") is None

        assert await store.delete_node("node-a") is True
        assert await store.get_inventory("node-a") is None
        assert [n.id for n in await store.list_nodes()] == ["node-b"]

    with_store(store_url, body)


def test_a_reopened_store_has_everything_a_previous_one_wrote(store_url: str) -> None:
    async def write(store: StateStore) -> None:
        await store.create_deployment(deployment("persisted", min_instances=1, max_instances=2))
        await store.put_node(NodeRecord(id="node-a", address="127.0.0.1:1"))
        await store.put_instance(InstanceRecord(id="i-1", deployment="persisted", node="node-a", state="ready"))

    async def read(store: StateStore) -> None:
        got = await store.get_deployment("persisted")
        assert got is not None and (got.min_instances, got.max_instances) == (1, 2)
        assert [n.id for n in await store.list_nodes()] == ["node-a"]
        assert [i.id for i in await store.list_instances()] == ["i-1"]
        await store.ping()

    with_store(store_url, write)
    with_store(store_url, read)


def test_unreachable_or_malformed_stores_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="postgres://x/y") as info:
        asyncio.run(open_store("postgres://x/y"))
    assert "sqlite:///PATH" in info.value.hint and "redis://" in info.value.hint
    with pytest.raises(ConfigError, match="sqlite:///PATH"):
        asyncio.run(open_store("sqlite://relative.db"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreUnavailable, match=r"redis://127\.0\.0\.1"):
        asyncio.run(open_store(f"redis://127.0.0.1:{port}/0"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="state.db"):
        asyncio.run(open_store(f"sqlite:///{blocker / 'state.db'}"))


def test_api_keys_round_trip_and_survive_a_reopen(store_url: str) -> None:
    from ember.controller.auth import ApiKeyRecord, digest

    admin = ApiKeyRecord(id="a1", name="ops", scope="admin", sha256=digest("k1"), created_at=1.0)
    limited = ApiKeyRecord(id="b2", name="app", scope="invoke", deployments=["x", "y"], sha256=digest("k2"),
                           created_at=2.0)

    async def write(store: StateStore) -> None:
        assert await store.list_api_keys() == []
        assert await store.get_api_key("a1") is None
        await store.put_api_key(admin)
        await store.put_api_key(limited)
        assert [k.name for k in await store.list_api_keys()] == ["app", "ops"]

    async def read(store: StateStore) -> None:
        got = await store.get_api_key("b2")
        assert got == limited and got.deployments == ["x", "y"] and got.sha256 == digest("k2")
        assert await store.delete_api_key("a1") is True
        assert await store.delete_api_key("a1") is False
        assert [k.id for k in await store.list_api_keys()] == ["b2"]
        # Keys live apart from deployments: neither listing sees the other.
        assert await store.list_deployments() == []

    with_store(store_url, write)
    with_store(store_url, read)
