"""Typed Python client of the controller's HTTP API (what the CLI and the tests use).

It speaks the public wire shapes only — `{"data": [...]}` listings, OpenAI's error object —
so it works against any controller version that keeps the contract, and it imports nothing
from ember.controller (the CLI must not pull in the server). Errors come back as ApiError
carrying the server's message, HTTP status and, for 429, the Retry-After delay.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, TypedDict

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "EMBER_URL"
API_KEY_ENV = "EMBER_API_KEY"


class Deployment(TypedDict, total=False):
    name: str
    checkpoint: str
    backend: str
    min_instances: int
    max_instances: int
    target_concurrency: int
    keep_alive_s: float
    queue_limit: int
    request_timeout_s: float
    checkpoint_bytes: int
    created_at: float
    updated_at: float
    instances: dict[str, int]
    queued: int
    in_flight: int
    last_error: str | None


class Instance(TypedDict, total=False):
    id: str
    deployment: str
    node: str
    state: str
    address: str
    in_flight: int
    source_tier: str | None
    estimated_ready_s: float | None
    actual_ready_s: float | None


class Tier(TypedDict, total=False):
    capacity_bytes: int
    used_bytes: int
    checkpoints: list[dict[str, Any]]
    read_gbps: float


class Node(TypedDict, total=False):
    id: str
    address: str
    state: str
    last_heartbeat: float
    tiers: dict[str, Tier]
    instances: list[str]
    devices: list[dict[str, Any]]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InvokeResult(TypedDict, total=False):
    id: str
    deployment: str
    text: str
    finish_reason: str
    usage: Usage
    instance: str
    node: str
    cold_start: bool


class InvokeEvent(TypedDict, total=False):
    """One event of a streamed invocation: kind is "loading", "text" or "done"."""

    kind: str
    percent: float
    message: str
    text: str
    finish_reason: str
    usage: Usage
    instance: str
    node: str
    cold_start: bool


class ApiError(Exception):
    """The controller refused a call (or could not be reached: status 0)."""

    def __init__(self, message: str, status: int = 0, type: str | None = None, code: str | None = None,
                 param: str | None = None, retry_after_s: float | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s
        self.hint = hint


def _error_from(response: httpx.Response) -> ApiError:
    retry = response.headers.get("retry-after")
    try:
        body = response.json()
        err = body["error"]
        message = err.get("message") or response.reason_phrase
        return ApiError(message, response.status_code, err.get("type"), err.get("code"), err.get("param"),
                        float(retry) if retry else None)
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:500] or response.reason_phrase
        return ApiError(f"HTTP {response.status_code}: {text}", response.status_code,
                        retry_after_s=float(retry) if retry else None)


class EmberClient:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def __enter__(self) -> EmberClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _unreachable(self, exc: Exception) -> ApiError:
        return ApiError(f"cannot reach the Ember controller at {self.url}: {exc}",
                        hint="start one with `ember serve`, or point --url / EMBER_URL at a running controller")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json()

    # -- deployments ----------------------------------------------------------------------------

    def deploy(self, name: str, checkpoint: str, **settings: Any) -> Deployment:
        """settings: backend, min_instances, max_instances, target_concurrency, keep_alive_s, queue_limit,
        request_timeout_s (unset ones take the controller's defaults)."""
        body = {"name": name, "checkpoint": checkpoint, **{k: v for k, v in settings.items() if v is not None}}
        return self._request("POST", "/v1/deployments", json=body)

    def list_deployments(self) -> list[Deployment]:
        return self._request("GET", "/v1/deployments")["data"]

    def get_deployment(self, name: str) -> Deployment:
        return self._request("GET", f"/v1/deployments/{name}")

    def update_deployment(self, name: str, **changes: Any) -> Deployment:
        return self._request("PATCH", f"/v1/deployments/{name}",
                             json={k: v for k, v in changes.items() if v is not None})

    def delete_deployment(self, name: str) -> Deployment:
        return self._request("DELETE", f"/v1/deployments/{name}")

    def list_instances(self, deployment: str | None = None) -> list[Instance]:
        params = {"deployment": deployment} if deployment else None
        return self._request("GET", "/v1/instances", params=params)["data"]

    def list_nodes(self) -> list[Node]:
        return self._request("GET", "/v1/nodes")["data"]

    def status(self) -> dict[str, Any]:
        """Nodes, deployments, instances, recent cold starts and migrations in one snapshot (/v1/status)."""
        return self._request("GET", "/v1/status")

    # -- API keys (admin) -----------------------------------------------------------------------

    def create_key(self, name: str, scope: str = "invoke", deployments: list[str] | None = None) -> dict[str, Any]:
        """A new key: the answer's "key" is its only copy (the controller stores a hash)."""
        body: dict[str, Any] = {"name": name, "scope": scope}
        if deployments is not None:
            body["deployments"] = deployments
        return self._request("POST", "/v1/keys", json=body)

    def list_keys(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/keys")["data"]

    def revoke_key(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/keys/{name}")

    # -- live migration -------------------------------------------------------------------------

    def migrate_instance(self, instance_id: str, node: str | None = None, mode: str | None = None,
                         wait: bool = False) -> dict[str, Any]:
        """Move an instance and its running requests (to `node`, or where the scheduler says).

        Returns the migration record: at once (state "starting"), or when it ended with `wait`."""
        body = {k: v for k, v in (("node", node), ("mode", mode)) if v is not None}
        return self._request("POST", f"/v1/instances/{instance_id}/migrate", json=body,
                             params={"wait": "true"} if wait else None)

    def get_migration(self, migration_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/migrations/{migration_id}")

    def list_migrations(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/migrations")["data"]

    def drain_node(self, node_id: str, wait: bool = False) -> dict[str, Any]:
        """Move everything off a node; the record says "drained" once it is empty."""
        return self._request("POST", f"/v1/nodes/{node_id}/drain", params={"wait": "true"} if wait else None)

    def get_drain(self, node_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/nodes/{node_id}/drain")

    def undrain_node(self, node_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/nodes/{node_id}/undrain")

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models")["data"]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # -- inference ------------------------------------------------------------------------------

    @staticmethod
    def _invoke_body(prompt: str | None, messages: list[dict[str, str]] | None, **sampling: Any) -> dict:
        body: dict[str, Any] = {k: v for k, v in sampling.items() if v is not None}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        return body

    def invoke(self, name: str, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
               max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: list[str] | None = None) -> InvokeResult:
        body = self._invoke_body(prompt, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, stop=stop)
        return self._request("POST", f"/functions/{name}/invoke", json=body)

    def invoke_stream(self, name: str, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                      max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                      seed: int | None = None, stop: list[str] | None = None) -> Iterator[InvokeEvent]:
        """Events as they come: "loading" (cold start progress), "text" chunks, then one "done"."""
        body = self._invoke_body(prompt, messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 seed=seed, stop=stop, stream=True)
        try:
            with self._http.stream("POST", f"/functions/{name}/invoke", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response)
                for line in response.iter_lines():
                    event = _parse_sse_line(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None


def _parse_sse_line(line: str) -> InvokeEvent | None:
    if line.startswith(": loading"):
        text = line[len(": loading"):].strip()
        percent, _, message = text.partition("%")
        try:
            value = float(percent)
        except ValueError:
            return None
        return {"kind": "loading", "percent": value, "message": message.strip(" ()")}
    if not line.startswith("data: "):
        return None
    data = line[len("data: "):]
    if data == "[DONE]":
        return None
    payload = json.loads(data)
    if "error" in payload:
        err = payload["error"]
        raise ApiError(err.get("message", "error"), 0, err.get("type"), err.get("code"), err.get("param"))
    if "finish_reason" in payload:
        return {"kind": "done", **payload}
    return {"kind": "text", "text": payload.get("text", "")}
