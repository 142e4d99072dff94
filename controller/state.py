"""StateStore: where deployments, nodes, instances and cache inventories outlive the controller.

Two backends sit behind one interface — embedded SQLite for one machine, Redis for clusters —
and one contract test suite runs against both. Both are key-value stores of JSON documents by
kind, so a backend implements five primitives and the typed methods live here once. The
controller keeps its working view in memory and writes through; the store is read at start
(a restarted controller rebuilds its view from it and from the workers' next heartbeats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

from pydantic import BaseModel

from ember.controller.auth import ApiKeyRecord
from ember.controller.config import parse_state_url
from ember.controller.errors import Conflict, Unavailable
from ember.controller.models import DeploymentRecord, InstanceRecord, InventoryRecord, NodeRecord

M = TypeVar("M", bound=BaseModel)

DEPLOYMENTS = "deployments"
NODES = "nodes"
INSTANCES = "instances"
INVENTORY = "inventory"
API_KEYS = "api_keys"
KINDS = (DEPLOYMENTS, NODES, INSTANCES, INVENTORY, API_KEYS)


class StoreUnavailable(RuntimeError):
    """The state store cannot be opened or reached; the message names it and the cause."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class StoreDown(Unavailable):
    """A call to an opened store failed (Redis went away): 503 / UNAVAILABLE, retry later.

    Only calls that need the store fail: warm traffic is served from memory meanwhile."""

    code = "state_store_unavailable"


class StateStore(ABC):
    """Async, typed access to the persisted state; backends implement the five primitives."""

    url: str = ""

    # -- primitives (one JSON document per (kind, key)) ------------------------------------------

    @abstractmethod
    async def _put(self, kind: str, key: str, value: str) -> None: ...

    @abstractmethod
    async def _put_new(self, kind: str, key: str, value: str) -> bool:
        """Store only if the key is absent (atomically); False when it existed."""

    @abstractmethod
    async def _get(self, kind: str, key: str) -> str | None: ...

    @abstractmethod
    async def _all(self, kind: str) -> list[str]: ...

    @abstractmethod
    async def _delete(self, kind: str, key: str) -> bool: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises when the store cannot be reached (used by /readyz)."""
        await self._get(DEPLOYMENTS, "")

    # -- typed helpers -----------------------------------------------------------------------------

    async def _get_model(self, kind: str, key: str, model: type[M]) -> M | None:
        raw = await self._get(kind, key)
        return None if raw is None else model.model_validate_json(raw)

    async def _all_models(self, kind: str, model: type[M]) -> list[M]:
        return [model.model_validate_json(raw) for raw in await self._all(kind)]

    # -- deployments ---------------------------------------------------------------------------------

    async def create_deployment(self, record: DeploymentRecord) -> None:
        """Raises Conflict when a deployment of that name exists (even from another controller)."""
        if not await self._put_new(DEPLOYMENTS, record.name, record.model_dump_json()):
            raise Conflict(f"a deployment named {record.name!r} already exists; delete it first or pick another name")

    async def put_deployment(self, record: DeploymentRecord) -> None:
        await self._put(DEPLOYMENTS, record.name, record.model_dump_json())

    async def get_deployment(self, name: str) -> DeploymentRecord | None:
        return await self._get_model(DEPLOYMENTS, name, DeploymentRecord)

    async def list_deployments(self) -> list[DeploymentRecord]:
        return sorted(await self._all_models(DEPLOYMENTS, DeploymentRecord), key=lambda d: d.name)

    async def delete_deployment(self, name: str) -> bool:
        return await self._delete(DEPLOYMENTS, name)

    # -- nodes ------------------------------------------------------------------------------------

    async def put_node(self, record: NodeRecord) -> None:
        await self._put(NODES, record.id, record.model_dump_json())

    async def get_node(self, node_id: str) -> NodeRecord | None:
        return await self._get_model(NODES, node_id, NodeRecord)

    async def list_nodes(self) -> list[NodeRecord]:
        return sorted(await self._all_models(NODES, NodeRecord), key=lambda n: n.id)

    async def delete_node(self, node_id: str) -> bool:
        """Also forgets the node's cache inventory."""
        await self._delete(INVENTORY, node_id)
        return await self._delete(NODES, node_id)

    # -- instances ----------------------------------------------------------------------------------

    async def put_instance(self, record: InstanceRecord) -> None:
        await self._put(INSTANCES, record.id, record.model_dump_json())

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        return await self._get_model(INSTANCES, instance_id, InstanceRecord)

    async def list_instances(self, deployment: str | None = None) -> list[InstanceRecord]:
        records = await self._all_models(INSTANCES, InstanceRecord)
        if deployment is not None:
            records = [r for r in records if r.deployment == deployment]
        return sorted(records, key=lambda r: (r.deployment, r.created_at, r.id))

    async def delete_instance(self, instance_id: str) -> bool:
        return await self._delete(INSTANCES, instance_id)

    # -- cache inventory ------------------------------------------------------------------------------

    async def put_inventory(self, record: InventoryRecord) -> None:
        await self._put(INVENTORY, record.node, record.model_dump_json())

    async def get_inventory(self, node_id: str) -> InventoryRecord | None:
        return await self._get_model(INVENTORY, node_id, InventoryRecord)

    async def list_inventory(self) -> list[InventoryRecord]:
        return sorted(await self._all_models(INVENTORY, InventoryRecord), key=lambda r: r.node)

    # -- API keys (hashed: see ember.controller.auth) ------------------------------------------------

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        await self._put(API_KEYS, record.id, record.model_dump_json())

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return await self._get_model(API_KEYS, key_id, ApiKeyRecord)

    async def list_api_keys(self) -> list[ApiKeyRecord]:
        return sorted(await self._all_models(API_KEYS, ApiKeyRecord), key=lambda k: (k.name, k.id))

    async def delete_api_key(self, key_id: str) -> bool:
        return await self._delete(API_KEYS, key_id)


async def open_store(url: str) -> StateStore:
    """The store a --state URL names, opened and reachable (raises ConfigError/StoreUnavailable)."""
    parsed = parse_state_url(url)
    if parsed.kind == "sqlite":
        from ember.controller.state_sqlite import SqliteStore

        store: StateStore = await SqliteStore.open(parsed.target)
    else:
        from ember.controller.state_redis import RedisStore

        store = await RedisStore.open(parsed.target)
    store.url = url
    return store
