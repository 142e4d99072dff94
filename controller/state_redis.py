"""Redis state store: what clusters use (the Helm chart runs Redis next to the controller).

One hash per kind (`ember:deployments`, …) keyed by name/id, values JSON. HSETNX gives the
atomic create that makes a duplicate deployment name a 409 even with two controllers.
"""

from __future__ import annotations

import functools

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from ember.controller.state import StateStore, StoreDown, StoreUnavailable

CONNECT_TIMEOUT_S = 5.0
# A Redis that hangs (network partition, SIGSTOP) must fail calls, not stall them.
SOCKET_TIMEOUT_S = 5.0


def _down_on_error(fn):
    @functools.wraps(fn)
    async def wrapper(self: RedisStore, *args):
        try:
            return await fn(self, *args)
        except (RedisError, OSError) as exc:
            raise StoreDown(f"the state store (Redis) is unreachable: {exc}; this call needs it — retry when "
                            "Redis is back (requests to running models are still served)") from exc

    return wrapper


class RedisStore(StateStore):
    def __init__(self, client: aioredis.Redis, prefix: str = "ember") -> None:
        self._r = client
        self._prefix = prefix

    @classmethod
    async def open(cls, url: str, prefix: str = "ember") -> RedisStore:
        client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"cannot reach the Redis state store at {url}: {exc}",
                "check that Redis is running and the URL is redis://HOST:PORT/DB",
            ) from exc
        return cls(client, prefix)

    def _hash(self, kind: str) -> str:
        return f"{self._prefix}:{kind}"

    @_down_on_error
    async def _put(self, kind: str, key: str, value: str) -> None:
        await self._r.hset(self._hash(kind), key, value)

    @_down_on_error
    async def _put_new(self, kind: str, key: str, value: str) -> bool:
        return bool(await self._r.hsetnx(self._hash(kind), key, value))

    @_down_on_error
    async def _get(self, kind: str, key: str) -> str | None:
        return await self._r.hget(self._hash(kind), key)

    @_down_on_error
    async def _all(self, kind: str) -> list[str]:
        return list(await self._r.hvals(self._hash(kind)))

    @_down_on_error
    async def _delete(self, kind: str, key: str) -> bool:
        return bool(await self._r.hdel(self._hash(kind), key))

    @_down_on_error
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        await self._r.aclose()
