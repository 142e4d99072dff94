"""Admin routes of API keys: POST /v1/keys (the key is in this answer only), GET, DELETE.

The app-wide auth dependency already requires an admin key for every /v1/keys call.
"""

from __future__ import annotations

from fastapi import APIRouter

from ember.controller.auth import Authenticator, KeyRequest


def keys_router(auth: Authenticator) -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.post("/v1/keys", status_code=201, summary="Create an API key (shown once)")
    async def create_key(body: KeyRequest) -> dict:
        key, record = await auth.create_key(body)
        return {**record.view(), "key": key}

    @router.get("/v1/keys")
    async def list_keys() -> dict:
        return {"object": "list", "data": [k.view() for k in await auth.list_keys()]}

    @router.delete("/v1/keys/{name}")
    async def revoke_key(name: str) -> dict:
        return {**(await auth.revoke(name)).view(), "revoked": True}

    return router
