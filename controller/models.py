"""Wire and storage types of the controller (pydantic), shared by HTTP, gRPC and the state store.

The admin shapes are a contract (DESIGN.md, "Public surface"): scripts and the CLI read
`{"data": [...]}` listings of deployments, instances and nodes with exactly these field names.
Records (what the store keeps) and views (what the API answers) are separate because a view
adds live numbers — queue length, requests in flight — that are never persisted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DEFAULT_BACKEND = "transformers"


# ---- deployments ------------------------------------------------------------------------------


class DeploymentSettings(BaseModel):
    """Everything about a deployment that can change after it is created."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(DEFAULT_BACKEND, min_length=1, max_length=64)
    min_instances: int = Field(0, ge=0, le=1000)
    max_instances: int = Field(4, ge=1, le=1000)
    # Also the cap on requests in flight per instance: further requests wait in the queue.
    target_concurrency: int = Field(8, ge=1, le=10_000)
    keep_alive_s: float = Field(60.0, ge=0)
    queue_limit: int = Field(100, ge=1, le=1_000_000)
    # How long a request may wait in the queue for an instance (a cold start included) before it
    # is answered 503; a generation that has started is not cut short.
    request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _min_le_max(self) -> DeploymentSettings:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) must not exceed max_instances ({self.max_instances})"
            )
        return self


class DeploymentSpec(DeploymentSettings):
    """POST /v1/deployments: name and checkpoint are required, the rest has defaults."""

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_' or '-'; at most 63")
    checkpoint: str = Field(min_length=1, max_length=2048)


class DeploymentUpdate(BaseModel):
    """PATCH /v1/deployments/{name}: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, min_length=1, max_length=2048)
    backend: str | None = Field(None, min_length=1, max_length=64)
    min_instances: int | None = Field(None, ge=0, le=1000)
    max_instances: int | None = Field(None, ge=1, le=1000)
    target_concurrency: int | None = Field(None, ge=1, le=10_000)
    keep_alive_s: float | None = Field(None, ge=0)
    queue_limit: int | None = Field(None, ge=1, le=1_000_000)
    request_timeout_s: float | None = Field(None, gt=0)


class DeploymentRecord(DeploymentSpec):
    """What the store keeps: the spec plus what the controller learned when checking it."""

    model_config = ConfigDict(extra="ignore")

    checkpoint_bytes: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0


class Deployment(DeploymentRecord):
    """The API view: the record plus live numbers."""

    instances: dict[str, int] = Field(default_factory=dict)  # state -> count
    queued: int = 0
    in_flight: int = 0
    last_error: str | None = None


# ---- instances --------------------------------------------------------------------------------

InstanceState = Literal["starting", "loading", "ready", "stopping"]


class InstanceRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    deployment: str
    node: str
    state: InstanceState = "starting"
    checkpoint: str = ""
    backend: str = DEFAULT_BACKEND
    created_at: float = 0.0
    ready_at: float | None = None
    source_tier: str | None = None
    estimated_ready_s: float | None = None  # the scheduler's time-to-ready estimate
    actual_ready_s: float | None = None


class Instance(InstanceRecord):
    address: str = ""
    in_flight: int = 0


# ---- nodes and their cache inventory ----------------------------------------------------------


class CachedCheckpoint(BaseModel):
    uri: str
    bytes: int = 0
    last_used: float = 0.0


class TierInfo(BaseModel):
    capacity_bytes: int = 0
    used_bytes: int = 0
    checkpoints: list[CachedCheckpoint] = Field(default_factory=list)
    read_gbps: float = 0.0


class DeviceInfo(BaseModel):
    name: str
    total_memory_bytes: int = 0
    free_memory_bytes: int = 0
    description: str = ""


NodeState = Literal["up", "down", "draining", "drained"]


class NodeRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    address: str
    state: NodeState = "up"
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    version: str = ""
    devices: list[DeviceInfo] = Field(default_factory=list)
    s3_read_gbps: float = 0.0
    queued_requests: int = 0
    active_requests: int = 0


class InventoryRecord(BaseModel):
    """What one node's cache tiers hold ("dram", "disk"), as of its last heartbeat."""

    model_config = ConfigDict(extra="ignore")

    node: str
    tiers: dict[str, TierInfo] = Field(default_factory=dict)
    updated_at: float = 0.0


class Node(NodeRecord):
    tiers: dict[str, TierInfo] = Field(default_factory=dict)
    instances: list[str] = Field(default_factory=list)


# ---- OpenAI-compatible requests ---------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Sampling parameters OpenAI's APIs share; anything unknown is ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False


class FunctionChatRequest(SamplingFields):
    """/functions/{name}/v1/chat/completions: the model is the path's function."""

    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class InvokeRequest(SamplingFields):
    """POST /functions/{name}/invoke: exactly one of prompt or messages."""

    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> InvokeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self
