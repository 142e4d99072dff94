"""API keys: who may call the controller, checked the same way on HTTP and gRPC.

A key is `ember_<id>_<secret>`: the id finds the record in the state store in one lookup and the
whole key's SHA-256 is compared with hmac.compare_digest. A plain (fast) hash is enough because
the secret is 256 random bits: slow hashes (bcrypt, argon2) exist to make guessing low-entropy
passwords expensive, and nobody can enumerate 2^256 candidates however cheap each one is — while
a fast hash keeps the check affordable on every request. The store never holds a usable key.

Scopes: `admin` may do everything (deploy, delete, migrate, drain, keys, listings); `invoke` may
call endpoints, optionally only those of named deployments. The bootstrap admin key comes from
EMBER_ADMIN_KEY or a file (`--admin-key-file`, the Helm chart mounts one) and is never stored.

Records are cached in memory for a few seconds so a revoke on another controller takes effect
soon, and a stale record keeps serving when the store is unreachable: warm traffic does not
depend on Redis being up.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, Field

from ember.controller.config import ADMIN_KEY_ENV
from ember.controller.errors import BadRequest, ConfigError, Conflict, ControllerError, NotFound, Unavailable
from ember.controller.models import NAME_PATTERN

log = logging.getLogger("ember.controller.auth")

KEY_PREFIX = "ember"
MIN_ADMIN_KEY_CHARS = 16
CACHE_TTL_S = 5.0
ADMIN, INVOKE = "admin", "invoke"
Scope = Literal["admin", "invoke"]


class Unauthorized(ControllerError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    grpc_code = "UNAUTHENTICATED"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ControllerError):
    status = 403
    type = "permission_error"
    code = "forbidden"
    grpc_code = "PERMISSION_DENIED"


class KeyRequest(BaseModel):
    """POST /v1/keys."""

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_' or '-'; at most 63")
    scope: Scope = INVOKE
    deployments: list[str] | None = Field(None, max_length=1000,
                                          description="invoke keys only: the deployments it may call (all if absent)")


class ApiKeyRecord(BaseModel):
    id: str
    name: str
    scope: Scope
    deployments: list[str] | None = None
    sha256: str
    created_at: float

    def view(self) -> dict:
        return self.model_dump(exclude={"sha256"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: a stored key, the bootstrap admin key, or anyone (auth off)."""

    name: str
    scope: str
    deployments: frozenset[str] | None = None
    key_id: str = ""

    def require(self, action: str, deployment: str | None = None) -> None:
        if action == ADMIN and self.scope != ADMIN:
            raise Forbidden(f"the API key {self.name!r} has scope {self.scope!r}; this call needs an admin key")
        if (action == INVOKE and deployment is not None and self.deployments is not None
                and deployment not in self.deployments):
            raise Forbidden(f"the API key {self.name!r} may not call {deployment!r} "
                            f"(it may call: {', '.join(sorted(self.deployments)) or 'nothing'})", param="model")


ANONYMOUS = Principal("anonymous", ADMIN)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_id(key: str) -> str | None:
    prefix, sep, rest = key.partition("_")
    key_id, sep2, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not sep or not sep2 or not key_id or not secret:
        return None
    return key_id


def read_admin_key(path: Path | None) -> str | None:
    """The bootstrap admin key: --admin-key-file wins over EMBER_ADMIN_KEY; None when neither is set."""
    import os

    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --admin-key-file {path}: {exc.strerror}",
                              "point it at a file holding the admin key (one line)") from exc
        if not key:
            raise ConfigError(f"--admin-key-file {path} is empty", "write the admin key into it")
    else:
        key = os.environ.get(ADMIN_KEY_ENV, "").strip()
        if not key:
            return None
    if len(key) < MIN_ADMIN_KEY_CHARS:
        raise ConfigError(f"the admin key is {len(key)} characters; at least {MIN_ADMIN_KEY_CHARS} are required",
                          "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return key


class Authenticator:
    """Turns an `Authorization: Bearer …` value into a Principal, or refuses it."""

    def __init__(self, store, admin_key: str | None, enabled: bool, clock=time.monotonic) -> None:
        self.store = store
        self.enabled = enabled
        self._admin_digest = digest(admin_key) if admin_key else None
        self._cache: dict[str, tuple[ApiKeyRecord | None, float]] = {}
        self._clock = clock

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("this controller requires an API key: send 'Authorization: Bearer <key>' "
                               "(the CLI sends EMBER_API_KEY)")
        presented = digest(key)
        if self._admin_digest is not None and hmac.compare_digest(presented, self._admin_digest):
            return Principal("admin", ADMIN)
        key_id = parse_key_id(key)
        record = await self._record(key_id) if key_id else None
        if record is None or not hmac.compare_digest(presented, record.sha256):
            raise Unauthorized("the API key is not valid (wrong, revoked or mistyped)")
        deployments = frozenset(record.deployments) if record.deployments is not None else None
        return Principal(record.name, record.scope, deployments, record.id)

    async def authorize(self, authorization: str | None, action: str, deployment: str | None = None) -> Principal:
        principal = await self.authenticate(authorization)
        principal.require(action, deployment)
        return principal

    async def _record(self, key_id: str) -> ApiKeyRecord | None:
        cached = self._cache.get(key_id)
        now = self._clock()
        if cached is not None and now - cached[1] < CACHE_TTL_S:
            return cached[0]
        try:
            record = await self.store.get_api_key(key_id)
        except Exception as exc:  # store down: a known key keeps working, an unknown one cannot be checked
            if cached is not None:
                return cached[0]
            log.warning("cannot verify API key %s: state store unreachable: %s", key_id, exc)
            raise Unavailable("cannot verify the API key: the state store is unreachable; retry shortly") from exc
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key_id] = (record, now)
        return record

    # -- key management (admin) ----------------------------------------------------------------

    async def create_key(self, request: KeyRequest) -> tuple[str, ApiKeyRecord]:
        """The new key (shown once) and its stored record."""
        if request.scope == ADMIN and request.deployments is not None:
            raise BadRequest("--deployments limits invoke keys only; an admin key may do everything",
                             param="deployments")
        if any(k.name == request.name for k in await self.store.list_api_keys()):
            raise Conflict(f"an API key named {request.name!r} exists; revoke it first or pick another name")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKeyRecord(id=key_id, name=request.name, scope=request.scope,
                              deployments=sorted(set(request.deployments)) if request.deployments is not None else None,
                              sha256=digest(key), created_at=time.time())
        await self.store.put_api_key(record)
        return key, record

    async def list_keys(self) -> list[ApiKeyRecord]:
        return await self.store.list_api_keys()

    async def revoke(self, name_or_id: str) -> ApiKeyRecord:
        for record in await self.store.list_api_keys():
            if name_or_id in (record.name, record.id):
                await self.store.delete_api_key(record.id)
                self._cache[record.id] = (None, self._clock())
                return record
        raise NotFound(f"no API key named {name_or_id!r}; `ember keys list` shows them")


def bearer(request: Request) -> str | None:
    return request.headers.get("authorization")


# -- which call needs what: one table for HTTP, one for gRPC -------------------------------------

# "/" is the status page: a browser cannot send a key on a page load, so the page's own handler
# checks the key (through admin_check) and answers a locked page that asks for one.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/"})
PUBLIC_PREFIXES = ("/static/",)
# Routes whose deployment is the body's "model" field.
MODEL_IN_BODY = frozenset({"/v1/completions", "/v1/chat/completions"})
GENERATION_PATHS = MODEL_IN_BODY


def is_generation(method: str, path: str) -> bool:
    return method == "POST" and (path in GENERATION_PATHS or path.startswith("/functions/"))


def http_action(method: str, path: str) -> tuple[str | None, str | None]:
    """(action, deployment) a call needs; action None: public. Unlisted routes need admin."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return None, None
    if path.startswith("/functions/"):
        return INVOKE, path.split("/")[2] or None
    if method == "GET" and path == "/v1/models":
        return INVOKE, None
    if method == "GET" and path.startswith("/v1/models/"):
        return INVOKE, path[len("/v1/models/"):] or None
    if method == "POST" and path in MODEL_IN_BODY:
        return INVOKE, None
    return ADMIN, None


async def _model_in_body(request: Request) -> str | None:
    import json

    try:
        body = json.loads(await request.body())
    except ValueError:
        return None  # the route answers the malformed body with its own 400
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def http_guard(auth: Authenticator):
    """The FastAPI dependency every route runs (set on the app, so routers added later get it too)."""

    async def guard(request: Request) -> Principal:
        path = request.url.path
        action, deployment = http_action(request.method, path)
        if action is None or not auth.enabled:
            return ANONYMOUS
        if action == INVOKE and request.method == "POST" and path in MODEL_IN_BODY:
            deployment = await _model_in_body(request)
        principal = await auth.authorize(bearer(request), action, deployment)
        request.state.principal = principal
        return principal

    return guard


def admin_check(auth: Authenticator):
    """`authorize(request)` for routers that check the key themselves (the status page)."""

    async def check(request: Request) -> Principal:
        return await auth.authorize(bearer(request), ADMIN)

    return check


def grpc_action(method: str) -> str | None:
    """Action a gRPC method needs; None: the worker token guards it instead (NodeRegistry)."""
    if method.startswith("/ember.v1.NodeRegistry/"):
        return None
    if method == "/ember.v1.Controller/Invoke":
        return INVOKE
    return ADMIN
