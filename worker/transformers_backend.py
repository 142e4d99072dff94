"""Inference with Hugging Face transformers (CPU and CUDA), batched at iteration level.

The backend owns request validation and tokenization; batch_engine.py owns the loop. Design
choices, each for a reason:

- Continuous batching over ONE right-aligned, zero-padded KV cache (batching.py) rather than
  per-request caches stitched together every step: decode attention already reads every row's
  KV once per step, and stitching would copy all of it again each step. New requests are
  prefilled alone (batch 1, no padding), so their first token is bit-identical to `generate`;
  decode rows differ from a lone run only by masked padding and GEMM shapes (~1e-5 in fp32
  logits, measured), so greedy tokens equal `model.generate(do_sample=False)`.
- Sampling draws one uniform per token from a per-request CPU generator (sampling.py): seeded
  requests give the same tokens batched or alone, and the generator state migrates as bytes.
- Detokenization is incremental with held-back text for unfinished characters and stop-string
  prefixes (detokenizer.py); its state is rebuilt from tokens after a migration.

Memory (memory_needed), in bytes:
    weights   = index.total_bytes                   (the loader's device buffer, padding included)
    kv_tokens = min(kv_cache_tokens, max_batch_size × max_context)
    kv        = kv_tokens × num_layers × num_kv_heads × head_dim × 2 (K and V) × weight itemsize
    logits    = max_batch_size × vocab_size × 4 × 2  (fp32 logits + the sampler's sorted copy)
    total     = weights + kv + logits
The engine never admits a request that could push the padded cache past kv_cache_tokens
(rows × longest final length), and max_context is capped at kv_cache_tokens, so the KV term
is a real bound. Transient activations are not counted: a prefill holds about
prompt_tokens × (4 × hidden + 3 × intermediate) × itemsize at once (logits only for the last
position), e.g. ~0.35 GB for a 4096-token prompt on a Llama-3-8B, against a 4 GB KV term.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ember.ckpt_format.spec import DTYPE_ITEMSIZE
from ember.worker.backend import (
    AlreadyFinishedError,
    Backend,
    BackendError,
    ContextTooLongError,
    GenerationRequest,
    GenerationState,
    InvalidRequestError,
    KVLayout,
    KVState,
    LoadReport,
    NotLoadedError,
    TokenEvent,
)

_imports_lock = threading.Lock()


def import_libraries() -> None:
    """Import torch, transformers' auto classes and the loader, once for the process.

    The worker's warm-up does this in a thread at start while a Load may do it in another, and
    transformers' lazy module is not safe to import from two threads at once (a load racing the
    warm-up failed with "cannot import name 'AutoTokenizer'"): the second caller waits here.
    """
    with _imports_lock:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        import ember.loader  # noqa: F401


if TYPE_CHECKING:
    import torch

    from ember.ckpt_format.index import CheckpointIndex
    from ember.worker.batch_engine import BatchEngine, Sequence


class ModelGeometry:
    """The config numbers the KV cache and validation depend on."""

    def __init__(self, config: dict[str, Any], where: str) -> None:
        try:
            heads = int(config["num_attention_heads"])
            self.num_layers = int(config["num_hidden_layers"])
            self.num_kv_heads = int(config.get("num_key_value_heads") or heads)
            self.head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            self.vocab_size = int(config["vocab_size"])
            self.max_positions = int(config["max_position_embeddings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(
                f"{where}: model config lacks a decoder-only transformer field ({exc})",
                hint="the transformers backend serves causal LMs whose config.json has num_hidden_layers, "
                "num_attention_heads, hidden_size, vocab_size and max_position_embeddings",
            ) from exc

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * itemsize


class TransformersBackend(Backend):
    name: ClassVar[str] = "transformers"

    def __init__(self, *, max_batch_size: int = 16, kv_cache_tokens: int = 32768, max_prefill_tokens: int = 4096):
        for option, value in (
            ("max_batch_size", max_batch_size),
            ("kv_cache_tokens", kv_cache_tokens),
            ("max_prefill_tokens", max_prefill_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise BackendError(f"{option} must be a positive integer, got {value!r}")
        self.max_batch_size = max_batch_size
        self.kv_cache_tokens = kv_cache_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_context = 0
        self._engine: BatchEngine | None = None
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._geometry: ModelGeometry | None = None

    # ---- sizing and lifecycle -----------------------------------------------------------------

    def memory_needed(self, index: CheckpointIndex, device: str) -> int:
        if index.config is None:
            raise BackendError(
                f"{index.path}: the checkpoint has no model config",
                hint="convert it from a directory that has config.json",
            )
        geometry = ModelGeometry(index.config, str(index.path))
        max_context = min(geometry.max_positions, self.kv_cache_tokens)
        kv_tokens = min(self.kv_cache_tokens, self.max_batch_size * max_context)
        logits = self.max_batch_size * geometry.vocab_size * 4 * 2
        return index.total_bytes + kv_tokens * geometry.kv_bytes_per_token(_weight_itemsize(index)) + logits

    async def load(self, checkpoint_dir: Path, device: str, *, pool: Any = None, tracker: Any = None) -> LoadReport:
        if self._engine is not None:
            raise BackendError("a model is already loaded on this backend", hint="unload it first")
        # A one-time wait for the process's imports is not this model's init time: the controller
        # learns init_s to estimate later starts, which will not wait for it.
        await asyncio.to_thread(import_libraries)
        started = time.perf_counter()
        tokenizer = await asyncio.to_thread(_load_tokenizer, Path(checkpoint_dir))
        tokenized = time.perf_counter()
        model, stats = await asyncio.to_thread(_load_weights, Path(checkpoint_dir), device, pool, tracker)
        loaded = time.perf_counter()
        self.start(model, tokenizer)
        return LoadReport(
            load_s=loaded - tokenized,
            init_s=(tokenized - started) + (time.perf_counter() - loaded),
            bytes=stats.nbytes,
            tier=stats.tier,
            device=device,
            max_context=self.max_context,
            stats=stats,
        )

    def start(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Serve an already materialized model (load() calls this after the loader)."""
        if self._engine is not None:
            raise BackendError("a model is already loaded on this backend", hint="unload it first")
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        from ember.worker.batch_engine import BatchEngine

        config = model.config
        layer_kinds = {type(layer) for layer in DynamicCache(config=config).layers}
        if layer_kinds != {DynamicLayer}:
            names = ", ".join(sorted(k.__name__ for k in layer_kinds))
            raise BackendError(
                f"{config.model_type}: cache layers {names} are not supported by the transformers backend",
                hint="it batches full-attention decoder models (Llama, Mistral without sliding window, Qwen2, …)",
            )
        # The event loop encodes prompts while the engine thread decodes outputs with the same fast
        # tokenizer. Both only take shared borrows of the Rust object; the one call that mutates it
        # (dropping truncation/padding saved in tokenizer.json) happens on the first encode, so make
        # that encode now, before there is a second thread ("RuntimeError: Already borrowed").
        tokenizer("warm up")
        self._geometry = ModelGeometry(config.to_dict(), config.model_type)
        self.max_context = min(self._geometry.max_positions, self.kv_cache_tokens)
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._engine = BatchEngine(
            model,
            eos_ids=_eos_ids(model, tokenizer),
            max_context=self.max_context,
            max_batch_size=self.max_batch_size,
            kv_cache_tokens=self.kv_cache_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
        )

    async def unload(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()
        on_cuda = self._model is not None and next(self._model.parameters()).is_cuda
        self._model = self._tokenizer = self._geometry = None
        gc.collect()
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    def queue_depth(self) -> int:
        return self._engine.queue_depth() if self._engine is not None else 0

    def active_requests(self) -> int:
        return self._engine.active_requests() if self._engine is not None else 0

    # ---- requests -----------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from ember.worker.batch_engine import Sequence
        from ember.worker.detokenizer import TextStream
        from ember.worker.sampling import make_generator

        engine = self._require_loaded()
        _check_request_id(request.request_id)
        params = request.params
        prompt_ids = self._prompt_ids(request)
        if len(prompt_ids) >= self.max_context:
            raise ContextTooLongError(len(prompt_ids), self.max_context)
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            output_ids=[],
            params=params,
            generator=make_generator(params.seed) if params.temperature > 0 else None,
            stream=TextStream(self._tokenizer, prompt_ids, params.stop),
        )
        return _stream(engine, seq)

    def resume(self, state: GenerationState) -> AsyncIterator[TokenEvent]:
        from ember.worker.batch_engine import Sequence
        from ember.worker.detokenizer import TextStream
        from ember.worker.sampling import generator_from_state, make_generator

        engine = self._require_loaded()
        _check_request_id(state.request_id)
        params = state.params
        prompt, output = list(state.prompt_token_ids), list(state.output_token_ids)
        if not prompt:
            raise InvalidRequestError("the state has no prompt tokens")
        self._check_ids(prompt + output, "state token")
        if len(prompt) + len(output) >= self.max_context:
            raise ContextTooLongError(len(prompt) + len(output), self.max_context)
        stream = TextStream.replay(self._tokenizer, prompt, output, params.stop)
        finished = (output and output[-1] in engine.eos_ids) or stream.stopped
        if finished or len(output) >= params.max_tokens:
            raise AlreadyFinishedError(
                f"request {state.request_id!r} already finished ({len(output)} of {params.max_tokens} tokens)",
                "stop" if finished else "length",
                hint="only running requests can be resumed",
            )
        if stream.emitted_text != state.text_emitted:
            raise InvalidRequestError(
                f"request {state.request_id!r}: the text already sent does not match its tokens decoded here",
                hint="resume on a worker that serves the same checkpoint (same tokenizer) as the source",
            )
        generator = None
        if params.temperature > 0:
            generator = generator_from_state(state.rng_state) if state.rng_state else make_generator(params.seed)
        kv = state.kv if output else None  # without output there is no token to feed after the KV
        if kv is not None:
            self._check_kv(kv, len(prompt) + len(output) - 1)
        seq = Sequence(
            request_id=state.request_id,
            prompt_ids=prompt,
            output_ids=output,
            params=params,
            generator=generator,
            stream=stream,
            imported_kv=kv,
        )
        return _stream(engine, seq)

    async def export_state(self, request_id: str, *, include_kv: bool, kv_from: int = 0) -> GenerationState:
        return await self._require_loaded().export_state(request_id, include_kv=include_kv, stop=False, kv_from=kv_from)

    async def stop_and_export(self, request_id: str, *, include_kv: bool, kv_from: int = 0) -> GenerationState:
        return await self._require_loaded().export_state(request_id, include_kv=include_kv, stop=True, kv_from=kv_from)

    def kv_layout(self) -> KVLayout:
        if self._geometry is None or self._model is None:
            raise NotLoadedError("no model is loaded on this backend", hint="call load() first")
        weight = next(self._model.parameters())
        g = self._geometry
        return KVLayout(
            num_layers=g.num_layers,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            dtype=str(weight.dtype).removeprefix("torch."),
            itemsize=weight.element_size(),
        )

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        self._require_loaded()
        return self._prompt_ids(request)

    # ---- validation ---------------------------------------------------------------------------

    def _require_loaded(self) -> BatchEngine:
        if self._engine is None:
            raise NotLoadedError("no model is loaded on this backend", hint="call load() first")
        return self._engine

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        given = [name for name in ("prompt", "messages", "prompt_token_ids") if getattr(request, name) is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                f"request {request.request_id!r} sets {', '.join(given) or 'none'} of prompt, messages, "
                "prompt_token_ids; set exactly one"
            )
        if request.prompt is not None:
            if not isinstance(request.prompt, str):
                raise InvalidRequestError(f"prompt must be a string, got {type(request.prompt).__name__}")
            ids = list(self._tokenizer(request.prompt)["input_ids"])
        elif request.messages is not None:
            ids = self._chat_ids(request.messages)
        else:
            ids = list(request.prompt_token_ids or [])
            self._check_ids(ids, "prompt token")
        if not ids:
            raise InvalidRequestError("the prompt is empty", hint="send at least one token of text")
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model's tokenizer has no chat template, so chat messages cannot be formatted",
                hint="send a plain prompt instead, or add a chat_template to the checkpoint's tokenizer files",
            )
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise InvalidRequestError(
                "messages must be a non-empty list of {'role': str, 'content': str} objects",
                hint='e.g. [{"role": "user", "content": "Hello"}]',
            )
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja templates raise their own errors (e.g. role order)
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_ids(self, ids: list[int], what: str) -> None:
        assert self._geometry is not None
        vocab = self._geometry.vocab_size
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < vocab:
                raise InvalidRequestError(f"{what} id {i!r} is outside the vocabulary [0, {vocab})")

    def _check_kv(self, kv: KVState, num_tokens: int) -> None:
        geometry = self._geometry
        assert geometry is not None
        if kv.start != 0:
            raise InvalidRequestError(
                f"the KV state starts at token {kv.start}; resume needs the whole prefix from token 0",
                hint="join the pre-copied blocks and the final delta before resuming",
            )
        if kv.num_tokens != num_tokens:
            raise InvalidRequestError(
                f"the KV state covers {kv.num_tokens} tokens but prompt + output[:-1] is {num_tokens} tokens",
                hint="export KV and tokens in the same snapshot, or resume without KV (recompute)",
            )
        expected = (geometry.num_kv_heads, num_tokens, geometry.head_dim)
        if len(kv.keys) != geometry.num_layers or len(kv.values) != geometry.num_layers:
            raise InvalidRequestError(
                f"the KV state has {len(kv.keys)} key / {len(kv.values)} value layers; "
                f"this model has {geometry.num_layers}",
                hint="resume on a worker serving the same checkpoint, or resume without KV (recompute)",
            )
        for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
            for what, t in (("keys", k), ("values", v)):
                if tuple(t.shape) != expected:
                    raise InvalidRequestError(
                        f"KV layer {layer} {what} have shape {tuple(t.shape)}; this model expects {expected}",
                        hint="resume on a worker serving the same checkpoint, or resume without KV (recompute)",
                    )


async def _stream(engine: BatchEngine, seq: Sequence) -> AsyncIterator[TokenEvent]:
    """The client side of a sequence; leaving it early (aclose, task cancel) frees the slot."""
    engine.submit(seq)
    try:
        while True:
            item = await seq.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        engine.cancel(seq)


def _check_request_id(request_id: object) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")


def _load_tokenizer(checkpoint_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint_dir))
    except (OSError, ValueError) as exc:
        raise BackendError(
            f"{checkpoint_dir}: cannot load the tokenizer: {exc}",
            hint="convert the checkpoint from a model directory that has its tokenizer files (tokenizer.json, …)",
        ) from exc


def _load_weights(checkpoint_dir: Path, device: str, pool: Any, tracker: Any) -> tuple[torch.nn.Module, Any]:
    """Runs in one thread: the loader's stats are per thread."""
    from ember.loader import last_load_stats, load_model

    model = load_model(checkpoint_dir, device, pool=pool, tracker=tracker)
    return model, last_load_stats()


def _weight_itemsize(index: CheckpointIndex) -> int:
    """Itemsize of the floating dtype holding most weight bytes: the model computes (and caches KV) in it."""
    by_dtype: dict[str, int] = {}
    for t in index.tensors.values():
        if t.dtype.startswith(("float", "bfloat")):
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    return DTYPE_ITEMSIZE[max(by_dtype, key=by_dtype.__getitem__)] if by_dtype else 2


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer (any of them ends a stream)."""
    ids: set[int] = set()
    for value in (
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
