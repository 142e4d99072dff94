from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_PHASE_UNSPECIFIED: _ClassVar[LoadPhase]
    LOAD_PHASE_FETCH: _ClassVar[LoadPhase]
    LOAD_PHASE_LOAD: _ClassVar[LoadPhase]
    LOAD_PHASE_INIT: _ClassVar[LoadPhase]
    LOAD_PHASE_READY: _ClassVar[LoadPhase]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_LOADING: _ClassVar[InstanceState]
    INSTANCE_STATE_READY: _ClassVar[InstanceState]
    INSTANCE_STATE_UNLOADING: _ClassVar[InstanceState]
    INSTANCE_STATE_FAILED: _ClassVar[InstanceState]

class MigrationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_MODE_AUTO: _ClassVar[MigrationMode]
    MIGRATION_MODE_KV: _ClassVar[MigrationMode]
    MIGRATION_MODE_TOKENS: _ClassVar[MigrationMode]

class MigrationPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_PHASE_UNSPECIFIED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_PRECOPY: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_STOP_AND_COPY: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_HANDED_OVER: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_STAYED: _ClassVar[MigrationPhase]
    MIGRATION_PHASE_FINISHED: _ClassVar[MigrationPhase]
LOAD_PHASE_UNSPECIFIED: LoadPhase
LOAD_PHASE_FETCH: LoadPhase
LOAD_PHASE_LOAD: LoadPhase
LOAD_PHASE_INIT: LoadPhase
LOAD_PHASE_READY: LoadPhase
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_LOADING: InstanceState
INSTANCE_STATE_READY: InstanceState
INSTANCE_STATE_UNLOADING: InstanceState
INSTANCE_STATE_FAILED: InstanceState
MIGRATION_MODE_AUTO: MigrationMode
MIGRATION_MODE_KV: MigrationMode
MIGRATION_MODE_TOKENS: MigrationMode
MIGRATION_PHASE_UNSPECIFIED: MigrationPhase
MIGRATION_PHASE_PRECOPY: MigrationPhase
MIGRATION_PHASE_STOP_AND_COPY: MigrationPhase
MIGRATION_PHASE_HANDED_OVER: MigrationPhase
MIGRATION_PHASE_STAYED: MigrationPhase
MIGRATION_PHASE_FINISHED: MigrationPhase

class LoadRequest(_message.Message):
    __slots__ = ("instance_id", "deployment", "checkpoint_uri", "backend", "device")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    deployment: str
    checkpoint_uri: str
    backend: str
    device: str
    def __init__(self, instance_id: _Optional[str] = ..., deployment: _Optional[str] = ..., checkpoint_uri: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("phase", "source_tier", "bytes_done", "bytes_total", "message", "fetch_s", "load_s", "init_s", "instance_id", "memory_bytes")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FETCH_S_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    INIT_S_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    phase: LoadPhase
    source_tier: str
    bytes_done: int
    bytes_total: int
    message: str
    fetch_s: float
    load_s: float
    init_s: float
    instance_id: str
    memory_bytes: int
    def __init__(self, phase: _Optional[_Union[LoadPhase, str]] = ..., source_tier: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., message: _Optional[str] = ..., fetch_s: _Optional[float] = ..., load_s: _Optional[float] = ..., init_s: _Optional[float] = ..., instance_id: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ("instance_id", "freed_bytes")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    freed_bytes: int
    def __init__(self, instance_id: _Optional[str] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("instance_id", "request_id", "prompt", "messages", "prompt_token_ids", "sampling", "resume_id", "continue_from")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUME_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FROM_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    request_id: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    resume_id: str
    continue_from: Continuation
    def __init__(self, instance_id: _Optional[str] = ..., request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., resume_id: _Optional[str] = ..., continue_from: _Optional[_Union[Continuation, _Mapping]] = ...) -> None: ...

class Continuation(_message.Message):
    __slots__ = ("output_token_ids", "text_emitted")
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMITTED_FIELD_NUMBER: _ClassVar[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_emitted: str
    def __init__(self, output_token_ids: _Optional[_Iterable[int]] = ..., text_emitted: _Optional[str] = ...) -> None: ...

class Handover(_message.Message):
    __slots__ = ("address", "instance_id", "resume_id", "migration_id", "mode", "node_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    instance_id: str
    resume_id: str
    migration_id: str
    mode: MigrationMode
    node_id: str
    def __init__(self, address: _Optional[str] = ..., instance_id: _Optional[str] = ..., resume_id: _Optional[str] = ..., migration_id: _Optional[str] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., node_id: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "request_id", "handover")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    handover: Handover
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., request_id: _Optional[str] = ..., handover: _Optional[_Union[Handover, _Mapping]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ...) -> None: ...

class InventoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ok", "node_id", "uptime_s", "version", "instances")
    OK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    node_id: str
    uptime_s: float
    version: str
    instances: int
    def __init__(self, ok: _Optional[bool] = ..., node_id: _Optional[str] = ..., uptime_s: _Optional[float] = ..., version: _Optional[str] = ..., instances: _Optional[int] = ...) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("name", "total_memory_bytes", "free_memory_bytes", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    description: str
    def __init__(self, name: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., free_memory_bytes: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("id", "deployment", "checkpoint", "state", "active_requests", "queued_requests", "backend", "device", "memory_bytes", "source_tier", "peak_batch_size", "generated_tokens", "ready_at_unix", "kv_bytes_per_token", "recompute_s_per_token", "recompute_overhead_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TIER_FIELD_NUMBER: _ClassVar[int]
    PEAK_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    READY_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    deployment: str
    checkpoint: str
    state: InstanceState
    active_requests: int
    queued_requests: int
    backend: str
    device: str
    memory_bytes: int
    source_tier: str
    peak_batch_size: int
    generated_tokens: int
    ready_at_unix: float
    kv_bytes_per_token: int
    recompute_s_per_token: float
    recompute_overhead_s: float
    def __init__(self, id: _Optional[str] = ..., deployment: _Optional[str] = ..., checkpoint: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., source_tier: _Optional[str] = ..., peak_batch_size: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., ready_at_unix: _Optional[float] = ..., kv_bytes_per_token: _Optional[int] = ..., recompute_s_per_token: _Optional[float] = ..., recompute_overhead_s: _Optional[float] = ...) -> None: ...

class CachedCheckpoint(_message.Message):
    __slots__ = ("uri", "bytes", "last_used_unix")
    URI_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    uri: str
    bytes: int
    last_used_unix: float
    def __init__(self, uri: _Optional[str] = ..., bytes: _Optional[int] = ..., last_used_unix: _Optional[float] = ...) -> None: ...

class Tier(_message.Message):
    __slots__ = ("capacity_bytes", "used_bytes", "checkpoints", "read_gbps")
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    READ_GBPS_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes: int
    used_bytes: int
    checkpoints: _containers.RepeatedCompositeFieldContainer[CachedCheckpoint]
    read_gbps: float
    def __init__(self, capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., checkpoints: _Optional[_Iterable[_Union[CachedCheckpoint, _Mapping]]] = ..., read_gbps: _Optional[float] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "devices", "instances", "tiers", "queued_requests", "active_requests", "s3_read_gbps", "timestamp_unix", "version", "loads_by_tier", "migrations_in_flight", "migration_net_gbps", "migration_overhead_s")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tier
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tier, _Mapping]] = ...) -> None: ...
    class LoadsByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    S3_READ_GBPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADS_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_NET_GBPS_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    tiers: _containers.MessageMap[str, Tier]
    queued_requests: int
    active_requests: int
    s3_read_gbps: float
    timestamp_unix: float
    version: str
    loads_by_tier: _containers.ScalarMap[str, int]
    migrations_in_flight: int
    migration_net_gbps: float
    migration_overhead_s: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ..., tiers: _Optional[_Mapping[str, Tier]] = ..., queued_requests: _Optional[int] = ..., active_requests: _Optional[int] = ..., s3_read_gbps: _Optional[float] = ..., timestamp_unix: _Optional[float] = ..., version: _Optional[str] = ..., loads_by_tier: _Optional[_Mapping[str, int]] = ..., migrations_in_flight: _Optional[int] = ..., migration_net_gbps: _Optional[float] = ..., migration_overhead_s: _Optional[float] = ...) -> None: ...

class MigrateOutRequest(_message.Message):
    __slots__ = ("instance_id", "request_ids", "destination_address", "destination_instance_id", "mode", "migration_id", "destination_node_id")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    destination_address: str
    destination_instance_id: str
    mode: MigrationMode
    migration_id: str
    destination_node_id: str
    def __init__(self, instance_id: _Optional[str] = ..., request_ids: _Optional[_Iterable[str]] = ..., destination_address: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., migration_id: _Optional[str] = ..., destination_node_id: _Optional[str] = ...) -> None: ...

class MigrateOutEvent(_message.Message):
    __slots__ = ("request_id", "phase", "mode", "bytes", "tokens", "stop_s", "total_s", "message", "estimated_kv_s", "estimated_recompute_s", "handover")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_KV_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_RECOMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    phase: MigrationPhase
    mode: MigrationMode
    bytes: int
    tokens: int
    stop_s: float
    total_s: float
    message: str
    estimated_kv_s: float
    estimated_recompute_s: float
    handover: Handover
    def __init__(self, request_id: _Optional[str] = ..., phase: _Optional[_Union[MigrationPhase, str]] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., stop_s: _Optional[float] = ..., total_s: _Optional[float] = ..., message: _Optional[str] = ..., estimated_kv_s: _Optional[float] = ..., estimated_recompute_s: _Optional[float] = ..., handover: _Optional[_Union[Handover, _Mapping]] = ...) -> None: ...

class MigrateInMessage(_message.Message):
    __slots__ = ("begin", "kv", "commit")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    begin: MigrationBegin
    kv: KVChunk
    commit: MigrationCommit
    def __init__(self, begin: _Optional[_Union[MigrationBegin, _Mapping]] = ..., kv: _Optional[_Union[KVChunk, _Mapping]] = ..., commit: _Optional[_Union[MigrationCommit, _Mapping]] = ...) -> None: ...

class MigrationBegin(_message.Message):
    __slots__ = ("migration_id", "instance_id", "request_id", "mode", "checkpoint", "layout", "max_tokens")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    instance_id: str
    request_id: str
    mode: MigrationMode
    checkpoint: str
    layout: KVLayout
    max_tokens: int
    def __init__(self, migration_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., request_id: _Optional[str] = ..., mode: _Optional[_Union[MigrationMode, str]] = ..., checkpoint: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KVBlock(_message.Message):
    __slots__ = ("layer", "token_start", "token_count", "dtype", "shape", "keys", "values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    token_start: int
    token_count: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    keys: bytes
    values: bytes
    def __init__(self, layer: _Optional[int] = ..., token_start: _Optional[int] = ..., token_count: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("blocks", "round_end")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ROUND_END_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[KVBlock]
    round_end: bool
    def __init__(self, blocks: _Optional[_Iterable[_Union[KVBlock, _Mapping]]] = ..., round_end: _Optional[bool] = ...) -> None: ...

class MigrationState(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "sampling", "rng_state", "text_emitted", "kv_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RNG_STATE_FIELD_NUMBER: _ClassVar[int]
    TEXT_EMITTED_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    rng_state: bytes
    text_emitted: str
    kv_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., rng_state: _Optional[bytes] = ..., text_emitted: _Optional[str] = ..., kv_tokens: _Optional[int] = ...) -> None: ...

class MigrationCommit(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: MigrationState
    def __init__(self, state: _Optional[_Union[MigrationState, _Mapping]] = ...) -> None: ...

class MigrateInReply(_message.Message):
    __slots__ = ("ready", "kv_ack", "accepted")
    READY_FIELD_NUMBER: _ClassVar[int]
    KV_ACK_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ready: MigrationReady
    kv_ack: KVAck
    accepted: MigrationAccepted
    def __init__(self, ready: _Optional[_Union[MigrationReady, _Mapping]] = ..., kv_ack: _Optional[_Union[KVAck, _Mapping]] = ..., accepted: _Optional[_Union[MigrationAccepted, _Mapping]] = ...) -> None: ...

class MigrationReady(_message.Message):
    __slots__ = ("recompute_a_s_per_token", "recompute_b_s", "samples")
    RECOMPUTE_A_S_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_B_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    recompute_a_s_per_token: float
    recompute_b_s: float
    samples: int
    def __init__(self, recompute_a_s_per_token: _Optional[float] = ..., recompute_b_s: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("tokens_received", "bytes_received")
    TOKENS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    tokens_received: int
    bytes_received: int
    def __init__(self, tokens_received: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class MigrationAccepted(_message.Message):
    __slots__ = ("resume_id", "tokens_generated")
    RESUME_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    resume_id: str
    tokens_generated: int
    def __init__(self, resume_id: _Optional[str] = ..., tokens_generated: _Optional[int] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: NodeStatus
    def __init__(self, status: _Optional[_Union[NodeStatus, _Mapping]] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node_id", "heartbeat_interval_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    heartbeat_interval_s: float
    def __init__(self, node_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: NodeStatus
    def __init__(self, status: _Optional[_Union[NodeStatus, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "heartbeat_interval_s")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    known: bool
    heartbeat_interval_s: float
    def __init__(self, known: _Optional[bool] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...
