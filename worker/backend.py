"""The contract between the worker agent and an inference backend.

The agent knows nothing of tensors and a backend knows nothing of gRPC: the agent turns wire
messages into these dataclasses, and a backend turns them into tokens. Everything here is
torch-free at import time so that the agent (and the migration code that moves
`GenerationState` between workers) can be imported and type-checked without the `worker` extra.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ember.ckpt_format.index import CheckpointIndex

#: Every value TokenEvent.finish_reason takes once a stream ends.
#: "migrated" ends the *source* stream of a request handed over by stop_and_export: the client's
#: stream goes on from the destination, so the agent must not close it.
FINISH_REASONS = ("stop", "length", "cancelled", "migrated")


class BackendError(Exception):
    """A request or model the backend refuses; the message says what is wrong, `hint` what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class InvalidRequestError(BackendError, ValueError):
    """Bad sampling parameters or prompt (maps to gRPC INVALID_ARGUMENT)."""


class ContextTooLongError(BackendError):
    """Prompt (+ already generated tokens) does not fit the model's context (maps to OUT_OF_RANGE)."""

    def __init__(self, prompt_tokens: int, max_context: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens long but the model's context is {max_context} tokens",
            hint=f"shorten the prompt to at most {max_context - 1} tokens",
        )
        self.prompt_tokens = prompt_tokens
        self.max_context = max_context


class UnknownRequestError(BackendError, LookupError):
    """export_state / stop_and_export named a request this backend is not running (NOT_FOUND)."""


class AlreadyFinishedError(InvalidRequestError):
    """resume() of a state whose output is already complete; `finish_reason` says how it ended."""

    def __init__(self, message: str, finish_reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.finish_reason = finish_reason


class InferenceError(BackendError):
    """An inference step failed (e.g. out of device memory): the batch's requests end with it (INTERNAL)."""


class NotLoadedError(BackendError):
    """generate/resume before load() finished or after unload() (maps to UNAVAILABLE)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; validated at construction so bad input never reaches the engine."""

    max_tokens: int = 16  # > 0
    temperature: float = 1.0  # 0 → greedy (argmax, no RNG drawn)
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 → off
    seed: int | None = None  # per-request RNG → reproducible sampling, batched or not
    stop: tuple[str, ...] = ()  # output is truncated before the first stop string

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
                hint="ask for at least 1 token",
            )
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}", hint="use 0 for greedy")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", hint="use 1.0 to turn it off")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}", hint="use 0 to turn it off")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {self.stop!r}")


@dataclass
class GenerationRequest:
    """Exactly one of prompt, messages, prompt_token_ids must be set."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # chat → tokenizer chat template, generation prompt added
    prompt_token_ids: list[int] | None = None  # pre-tokenized (used by migration and tests)
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class TokenEvent:
    token_ids: list[int]  # new token ids in this event (1 while running; [] in a "migrated"/"cancelled" end)
    text: str  # detokenized delta; "" while a multi-byte char or a possible stop string is pending
    finish_reason: str | None  # None while running; one of FINISH_REASONS on the last event
    prompt_tokens: int
    completion_tokens: int  # all tokens generated so far, including those before a migration


@dataclass
class KVState:
    """Key/value tensors of a request's computed prefix, per layer, on CPU and contiguous.

    keys[i] and values[i] are torch tensors of shape [num_kv_heads, num_tokens - start, head_dim]
    in the model's dtype. A full state (start 0) covers prompt + output[:-1]: the last sampled
    token has not been through the model yet, so the destination feeds it as its first decode
    input. An export with kv_from > 0 holds only positions [start, num_tokens): the delta a
    multi-stage migration sends after its pre-copy; resume() takes full states only.
    """

    keys: list[Any]
    values: list[Any]
    num_tokens: int
    start: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class KVLayout:
    """Per layer, keys and values are [num_kv_heads, tokens, head_dim] of `dtype` (a torch dtype name)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16", …
    itemsize: int

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * self.itemsize


@dataclass
class GenerationState:
    """Everything needed to continue a request elsewhere with an identical token stream."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams  # the original params: max_tokens counts the tokens already generated
    rng_state: bytes | None  # torch CPU Generator state; None for greedy requests
    text_emitted: str  # text already sent to the client (the detokenizer state is rebuilt from tokens)
    kv: KVState | None  # None → the destination recomputes KV from prompt + output in one prefill


@dataclass(frozen=True)
class LoadReport:
    load_s: float  # loader: checkpoint bytes → tensors on the device
    init_s: float  # the rest: tokenizer, engine start
    bytes: int  # checkpoint bytes moved
    tier: str  # where the bytes came from, as the loader reports it ("disk" | "dram" | …)
    device: str
    max_context: int
    stats: Any = None  # the loader's LoadStats (ember.loader.stats), e.g. for a BandwidthTracker


class Backend(ABC):
    """One loaded model serving many concurrent requests.

    generate() and resume() validate eagerly: they raise BackendError subclasses at call time,
    before returning the async iterator. Closing the iterator (aclose, or cancelling the task
    iterating it) frees the request's slot at the next step boundary.
    """

    name: ClassVar[str]
    max_context: int

    @abstractmethod
    def memory_needed(self, index: CheckpointIndex, device: str) -> int:
        """Bytes of device memory this backend needs for the checkpoint: weights + KV budget."""

    @abstractmethod
    async def load(self, checkpoint_dir: Path, device: str, *, pool: Any = None, tracker: Any = None) -> LoadReport:
        """Load weights with ember.loader (`pool`: a DramPool, `tracker`: a BandwidthTracker)."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    @abstractmethod
    async def unload(self) -> None:
        """Free the model; running streams end with finish_reason "cancelled"."""

    @abstractmethod
    async def export_state(self, request_id: str, *, include_kv: bool, kv_from: int = 0) -> GenerationState:
        """Snapshot of a running request at a token boundary; the request keeps running.

        kv_from > 0 exports only KV positions from there on (what an earlier snapshot lacks)."""

    @abstractmethod
    async def stop_and_export(self, request_id: str, *, include_kv: bool, kv_from: int = 0) -> GenerationState:
        """Stop a request at a token boundary; its stream ends with finish_reason "migrated"."""

    @abstractmethod
    def kv_layout(self) -> KVLayout:
        """Shape of the loaded model's KV cache: what a KV migration moves, checked on both ends."""

    @abstractmethod
    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt as generate() would tokenize it (a restart from tokens needs the ids)."""

    @abstractmethod
    def resume(self, state: GenerationState) -> AsyncIterator[TokenEvent]:
        """Continue a request from a state: KV imported, or recomputed from tokens in one prefill."""

    @abstractmethod
    def queue_depth(self) -> int:
        """Requests accepted but not yet in the running batch."""

    @abstractmethod
    def active_requests(self) -> int:
        """Requests in the running batch."""
