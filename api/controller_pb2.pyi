from ember.api import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeployRequest(_message.Message):
    __slots__ = ("name", "checkpoint", "backend", "min_instances", "max_instances", "target_concurrency", "keep_alive_s", "queue_limit", "request_timeout_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MIN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    backend: str
    min_instances: int
    max_instances: int
    target_concurrency: int
    keep_alive_s: float
    queue_limit: int
    request_timeout_s: float
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ..., backend: _Optional[str] = ..., min_instances: _Optional[int] = ..., max_instances: _Optional[int] = ..., target_concurrency: _Optional[int] = ..., keep_alive_s: _Optional[float] = ..., queue_limit: _Optional[int] = ..., request_timeout_s: _Optional[float] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "checkpoint", "backend", "min_instances", "max_instances", "target_concurrency", "keep_alive_s", "queue_limit", "request_timeout_s", "checkpoint_bytes", "created_at_unix", "instances", "queued", "in_flight", "last_error")
    class InstancesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MIN_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MAX_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
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
    created_at_unix: float
    instances: _containers.ScalarMap[str, int]
    queued: int
    in_flight: int
    last_error: str
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ..., backend: _Optional[str] = ..., min_instances: _Optional[int] = ..., max_instances: _Optional[int] = ..., target_concurrency: _Optional[int] = ..., keep_alive_s: _Optional[float] = ..., queue_limit: _Optional[int] = ..., request_timeout_s: _Optional[float] = ..., checkpoint_bytes: _Optional[int] = ..., created_at_unix: _Optional[float] = ..., instances: _Optional[_Mapping[str, int]] = ..., queued: _Optional[int] = ..., in_flight: _Optional[int] = ..., last_error: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("deployment", "prompt", "messages", "sampling")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_worker_pb2.ChatMessage]
    sampling: _worker_pb2.SamplingParams
    def __init__(self, deployment: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_worker_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_worker_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class LoadingProgress(_message.Message):
    __slots__ = ("percent", "message")
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    percent: float
    message: str
    def __init__(self, percent: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class InvokeChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "instance", "node", "cold_start")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    instance: str
    node: str
    cold_start: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., instance: _Optional[str] = ..., node: _Optional[str] = ..., cold_start: _Optional[bool] = ...) -> None: ...

class InvokeEvent(_message.Message):
    __slots__ = ("loading", "chunk")
    LOADING_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    loading: LoadingProgress
    chunk: InvokeChunk
    def __init__(self, loading: _Optional[_Union[LoadingProgress, _Mapping]] = ..., chunk: _Optional[_Union[InvokeChunk, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("id", "deployment", "node", "state", "address", "in_flight", "source_tier", "estimated_ready_s", "actual_ready_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_READY_S_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_READY_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    deployment: str
    node: str
    state: str
    address: str
    in_flight: int
    source_tier: str
    estimated_ready_s: float
    actual_ready_s: float
    def __init__(self, id: _Optional[str] = ..., deployment: _Optional[str] = ..., node: _Optional[str] = ..., state: _Optional[str] = ..., address: _Optional[str] = ..., in_flight: _Optional[int] = ..., source_tier: _Optional[str] = ..., estimated_ready_s: _Optional[float] = ..., actual_ready_s: _Optional[float] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("id", "address", "state", "last_heartbeat_unix", "tiers", "instances")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _worker_pb2.Tier
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_worker_pb2.Tier, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    state: str
    last_heartbeat_unix: float
    tiers: _containers.MessageMap[str, _worker_pb2.Tier]
    instances: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ..., last_heartbeat_unix: _Optional[float] = ..., tiers: _Optional[_Mapping[str, _worker_pb2.Tier]] = ..., instances: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("deployments", "instances", "nodes")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...
