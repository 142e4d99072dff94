"""TransformersBackend end to end on a tiny real Llama, loaded through the Ember format and loader.

References come from `model.generate` on the same weights loaded the Hugging Face way, so the
tests also check that the loader's model computes what transformers computes. They run on CPU;
EMBER_TEST_DEVICE=cuda runs the same tests on a GPU.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember.ckpt_format import open_checkpoint
from ember.worker.backend import (
    BackendError,
    ContextTooLongError,
    GenerationRequest,
    InferenceError,
    InvalidRequestError,
    NotLoadedError,
    SamplingParams,
    TokenEvent,
    UnknownRequestError,
)
from ember.worker.backends import BACKENDS, make_backend
from ember.worker.transformers_backend import TransformersBackend

DEVICE = os.environ.get("EMBER_TEST_DEVICE", "cpu")


def greedy(max_tokens: int, **options) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **options)


GREEDY = greedy(24)
PROMPTS = [
    "The",
    "The quick brown fox jumps over",
    "Zürich café 🙂",
    "Ember serves large language models as functions that start from zero.",
]


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    events: list[TokenEvent] = field(default_factory=list)

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason


async def collect(
    stream: AsyncIterator[TokenEvent], on_event: Callable[[Result], Awaitable[None]] | None = None
) -> Result:
    result = Result()
    async for event in stream:
        result.tokens += event.token_ids
        result.text += event.text
        result.events.append(event)
        if on_event is not None:
            await on_event(result)
    return result


async def wait_until(condition: Callable[[], bool]) -> None:
    """Yield to the engine until `condition` holds (a hang guard, not a timing assertion)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout=60)


async def loaded(checkpoint: Path, **options) -> TransformersBackend:
    backend = TransformersBackend(**options)
    await backend.load(checkpoint, DEVICE)
    return backend


@pytest.fixture(scope="module")
def hf(backend_hf_dir):
    """(model, tokenizer) loaded the Hugging Face way: the reference implementation."""
    model = AutoModelForCausalLM.from_pretrained(backend_hf_dir, dtype=torch.float32).to(DEVICE).eval()
    return model, AutoTokenizer.from_pretrained(backend_hf_dir)


def reference(hf, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model, tokenizer = hf
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids], device=DEVICE),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=DEVICE),
            do_sample=False,
            max_new_tokens=max_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(prompt_ids) :].tolist()


def ids(hf, prompt: str) -> list[int]:
    return hf[1](prompt)["input_ids"]


def expected_finish(hf, tokens: list[int], max_tokens: int) -> str:
    return "stop" if tokens[-1] == hf[1].eos_token_id else "length"


# ---- load, sizing, registry --------------------------------------------------------------------


def test_load_reports_and_memory_formula(backend_checkpoint):
    async def body() -> None:
        backend = make_backend("transformers", max_batch_size=4, kv_cache_tokens=512)
        report = await backend.load(backend_checkpoint, DEVICE)
        index = open_checkpoint(backend_checkpoint)
        assert report.device == DEVICE and report.max_context == backend.max_context == 256
        assert report.tier in ("disk", "dram") and report.bytes == index.total_bytes
        assert report.load_s > 0 and report.init_s > 0
        # weights + min(512, 4 × 256) KV tokens × 2 layers × 2 kv heads × 16 head_dim × (K,V) × fp32 + logits
        config = index.config
        expected = index.total_bytes + 512 * (2 * 2 * 16 * 2 * 4) + 4 * config["vocab_size"] * 4 * 2
        assert backend.memory_needed(index, "cpu") == expected
        smaller = TransformersBackend(max_batch_size=1, kv_cache_tokens=512)
        assert smaller.memory_needed(index, "cpu") == index.total_bytes + 256 * 512 + config["vocab_size"] * 8
        await backend.unload()

    asyncio.run(body())


def test_registry_names_its_backends():
    assert BACKENDS["transformers"] is TransformersBackend
    with pytest.raises(BackendError, match="unknown backend 'vllm2'.*transformers"):
        make_backend("vllm2")


# ---- batching ----------------------------------------------------------------------------------


def test_concurrent_greedy_requests_equal_generate(backend_checkpoint, hf):
    """Requests of different lengths join a running batch one after another and leave at different
    times; each one's tokens equal generate(do_sample=False) on its own."""
    max_tokens = [40, 25, 33, 12]
    expected = [reference(hf, ids(hf, p), n) for p, n in zip(PROMPTS, max_tokens)]

    async def body() -> tuple[list[Result], int]:
        backend = await loaded(backend_checkpoint)
        started = [asyncio.Event() for _ in PROMPTS]
        most_active = 0

        async def on_event(result: Result, i: int) -> None:
            nonlocal most_active
            most_active = max(most_active, backend.active_requests())
            if len(result.tokens) >= 3:
                started[i].set()

        async def one(i: int) -> Result:
            if i:
                await started[i - 1].wait()
            params = greedy(max_tokens[i])
            stream = backend.generate(GenerationRequest(f"r{i}", prompt=PROMPTS[i], params=params))
            return await collect(stream, lambda r: on_event(r, i))

        results = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        await backend.unload()
        return results, most_active

    results, most_active = asyncio.run(body())
    assert most_active >= 3, "requests should have shared decode steps"
    for result, want, n in zip(results, expected, max_tokens):
        assert result.tokens == want
        assert result.finish == expected_finish(hf, want, n)
        assert result.text == hf[1].decode(want, skip_special_tokens=True)
        assert [e.completion_tokens for e in result.events] == list(range(1, len(want) + 1))


def test_queue_waits_for_a_free_slot(backend_checkpoint, hf):
    expected = [reference(hf, ids(hf, p), 10) for p in PROMPTS]

    async def body() -> tuple[list[Result], int, int]:
        backend = await loaded(backend_checkpoint, max_batch_size=2)
        deepest, busiest = 0, 0

        async def observe(_: Result) -> None:
            nonlocal deepest, busiest
            deepest, busiest = max(deepest, backend.queue_depth()), max(busiest, backend.active_requests())

        streams = [
            backend.generate(GenerationRequest(f"q{i}", prompt=p, params=greedy(10)))
            for i, p in enumerate(PROMPTS)
        ]
        results = await asyncio.gather(*(collect(s, observe) for s in streams))
        assert backend.queue_depth() == 0 and backend.active_requests() == 0
        await backend.unload()
        return results, deepest, busiest

    results, deepest, busiest = asyncio.run(body())
    assert busiest == 2 and deepest >= 1
    assert [r.tokens for r in results] == expected


# ---- sampling, stop conditions ----------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_batched(backend_checkpoint):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7, max_tokens=20)

    async def body() -> tuple[Result, Result, Result]:
        backend = await loaded(backend_checkpoint)
        alone = await collect(backend.generate(GenerationRequest("a", prompt="The quick", params=params)))
        others = [
            backend.generate(GenerationRequest("g", prompt=PROMPTS[3], params=GREEDY)),
            backend.generate(
                GenerationRequest("o", prompt="The lazy dog", params=SamplingParams(temperature=1.0, seed=8))
            ),
        ]
        batched, *_ = await asyncio.gather(
            collect(backend.generate(GenerationRequest("b", prompt="The quick", params=params))),
            *(collect(s) for s in others),
        )
        other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=8, max_tokens=20)
        different = await collect(backend.generate(GenerationRequest("c", prompt="The quick", params=other_seed)))
        await backend.unload()
        return alone, batched, different

    alone, batched, different = asyncio.run(body())
    assert batched.tokens == alone.tokens and batched.text == alone.text
    assert different.tokens != alone.tokens


def test_stop_string_truncates_the_text(backend_checkpoint, hf):
    async def body() -> tuple[Result, Result, str]:
        backend = await loaded(backend_checkpoint)
        params = greedy(40)
        full = await collect(backend.generate(GenerationRequest("full", prompt=PROMPTS[1], params=params)))
        start = next(i for i in range(6, len(full.text) - 2) if "\ufffd" not in full.text[i : i + 2])
        stop = full.text[start : start + 2]
        cut = await collect(
            backend.generate(
                GenerationRequest("cut", prompt=PROMPTS[1], params=greedy(40, stop=(stop,)))
            )
        )
        await backend.unload()
        return full, cut, stop

    full, cut, stop = asyncio.run(body())
    assert cut.finish == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.tokens == full.tokens[: len(cut.tokens)] and len(cut.tokens) < len(full.tokens)


def test_eos_finishes_with_stop(backend_hf_dir, hf):
    """A model whose EOS is a token it emits greedily: the stream ends right there, like generate."""
    model = AutoModelForCausalLM.from_pretrained(backend_hf_dir, dtype=torch.float32).to(DEVICE).eval()
    tokenizer = AutoTokenizer.from_pretrained(backend_hf_dir)
    prompt = ids(hf, PROMPTS[1])
    free_run = reference(hf, prompt, 20)
    at = next(i for i in range(2, 20) if free_run[i] not in free_run[:i])
    model.generation_config.eos_token_id = free_run[at]
    with torch.inference_mode():
        stopped = model.generate(torch.tensor([prompt], device=DEVICE), do_sample=False, max_new_tokens=20)
    stopped = stopped[0, len(prompt) :].tolist()

    async def body() -> Result:
        backend = TransformersBackend()
        backend.start(model, tokenizer)
        result = await collect(
            backend.generate(GenerationRequest("eos", prompt_token_ids=prompt, params=greedy(20)))
        )
        await backend.unload()
        return result

    result = asyncio.run(body())
    assert result.tokens == stopped == free_run[: at + 1]
    assert result.finish == "stop"


def test_chat_messages_use_the_chat_template(backend_checkpoint, hf):
    messages = [{"role": "user", "content": "hello"}]
    _, tokenizer = hf
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<s>assistant:")
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]

    async def body() -> Result:
        backend = await loaded(backend_checkpoint)
        result = await collect(backend.generate(GenerationRequest("chat", messages=messages, params=GREEDY)))
        await backend.unload()
        return result

    result = asyncio.run(body())
    assert result.events[0].prompt_tokens == len(prompt)
    assert result.tokens == reference(hf, prompt, GREEDY.max_tokens)


def test_chat_without_a_template_is_refused(backend_hf_dir):
    model = AutoModelForCausalLM.from_pretrained(backend_hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(backend_hf_dir)
    tokenizer.chat_template = None

    async def body() -> None:
        backend = TransformersBackend()
        backend.start(model, tokenizer)
        with pytest.raises(InvalidRequestError, match="no chat template"):
            backend.generate(GenerationRequest("c", messages=[{"role": "user", "content": "hi"}]))
        await backend.unload()

    asyncio.run(body())


def test_demo_model_serves_chat_and_prompts_like_generate(demo_checkpoint, demo_hf_dir):
    """The shared demo model (its own tokenizer, chat template and EOS list) through the backend."""
    demo = (
        AutoModelForCausalLM.from_pretrained(demo_hf_dir).to(DEVICE).eval(),
        AutoTokenizer.from_pretrained(demo_hf_dir),
    )
    tokenizer = demo[1]
    messages = [{"role": "user", "content": "What is Ember?"}]
    chat_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    expected = [reference(demo, chat_ids, 20), reference(demo, tokenizer("The quick brown fox")["input_ids"], 20)]

    async def body() -> list[Result]:
        backend = await loaded(demo_checkpoint)
        results = await asyncio.gather(
            collect(backend.generate(GenerationRequest("chat", messages=messages, params=greedy(20)))),
            collect(backend.generate(GenerationRequest("text", prompt="The quick brown fox", params=greedy(20)))),
        )
        await backend.unload()
        return results

    results = asyncio.run(body())
    assert [r.tokens for r in results] == expected
    assert results[0].events[0].prompt_tokens == len(chat_ids)


# ---- validation --------------------------------------------------------------------------------


def test_bad_requests_are_refused_with_clear_errors(backend_checkpoint):
    async def body() -> None:
        backend = TransformersBackend()
        with pytest.raises(NotLoadedError, match="no model is loaded"):
            backend.generate(GenerationRequest("x", prompt="hi"))
        await backend.load(backend_checkpoint, DEVICE)
        with pytest.raises(ContextTooLongError, match="300 tokens long but the model's context is 256") as info:
            backend.generate(GenerationRequest("long", prompt_token_ids=[5] * 300))
        assert (info.value.prompt_tokens, info.value.max_context) == (300, 256)
        with pytest.raises(InvalidRequestError, match="max_tokens must be a positive integer, got 0"):
            backend.generate(GenerationRequest("zero", prompt="hi", params=SamplingParams(max_tokens=0)))
        with pytest.raises(InvalidRequestError, match="sets prompt, messages"):
            backend.generate(GenerationRequest("two", prompt="hi", messages=[{"role": "user", "content": "hi"}]))
        with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
            backend.generate(GenerationRequest("oov", prompt_token_ids=[1, 10_000]))
        with pytest.raises(InvalidRequestError, match="the prompt is empty"):
            backend.generate(GenerationRequest("empty", prompt=""))
        with pytest.raises(UnknownRequestError, match="'nope' is not running"):
            await backend.export_state("nope", include_kv=False)
        first = backend.generate(GenerationRequest("dup", prompt="The", params=greedy(50)))
        await first.__anext__()
        with pytest.raises(InvalidRequestError, match="'dup' is already running"):
            await collect(backend.generate(GenerationRequest("dup", prompt="The")))
        assert backend.active_requests() == 1  # the refused duplicate did not disturb the first
        await first.aclose()
        await backend.unload()

    asyncio.run(body())


# ---- cancellation and unload -------------------------------------------------------------------


def test_closing_a_stream_frees_its_slot(backend_checkpoint, hf):
    expected = [reference(hf, ids(hf, p), 30) for p in PROMPTS[:3]]

    async def body() -> tuple[list[Result], Result]:
        backend = await loaded(backend_checkpoint)
        params = greedy(30)
        streams = [
            backend.generate(GenerationRequest(f"c{i}", prompt=p, params=params)) for i, p in enumerate(PROMPTS[:3])
        ]
        leaver = Result()

        async def leave_early() -> Result:
            async for event in streams[1]:
                leaver.tokens += event.token_ids
                if len(leaver.tokens) == 5:
                    await streams[1].aclose()  # the client hangs up
                    await wait_until(lambda: backend.active_requests() == 2)
                    break
            return leaver

        stayers = asyncio.gather(collect(streams[0]), collect(streams[2]))
        await leave_early()
        results = await stayers

        # A consumer task that is cancelled frees its slot too.
        task = asyncio.create_task(collect(backend.generate(GenerationRequest("t", prompt="The", params=params))))
        await wait_until(lambda: backend.active_requests() == 1)
        task.cancel()
        await wait_until(lambda: backend.active_requests() == 0)
        await backend.unload()
        return results, leaver

    results, leaver = asyncio.run(body())
    assert [r.tokens for r in results] == [expected[0], expected[2]]
    assert leaver.tokens == expected[1][:5]


def test_unload_ends_running_streams_as_cancelled(backend_checkpoint):
    async def body() -> tuple[Result, TransformersBackend]:
        backend = await loaded(backend_checkpoint)
        stream = backend.generate(GenerationRequest("u", prompt="The", params=greedy(200)))

        async def unload_midway(result: Result) -> None:
            if len(result.tokens) == 3:
                await backend.unload()

        return await collect(stream, unload_midway), backend

    result, backend = asyncio.run(body())
    assert result.finish == "cancelled" and result.events[-1].token_ids == []
    assert 3 <= len(result.tokens) < 200
    assert backend.active_requests() == 0 and backend.queue_depth() == 0
    with pytest.raises(NotLoadedError):
        backend.generate(GenerationRequest("after", prompt="The"))


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(backend_hf_dir, hf):
    """Fault injection in transformers' forward (think CUDA OOM): the requests in that step end with
    InferenceError instead of hanging, and the next request is served normally."""
    model = AutoModelForCausalLM.from_pretrained(backend_hf_dir, dtype=torch.float32).to(DEVICE).eval()
    tokenizer = AutoTokenizer.from_pretrained(backend_hf_dir)
    forward, calls = model.forward, 0

    def failing_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("out of memory (injected)")
        return forward(*args, **kwargs)

    model.forward = failing_forward

    async def body() -> Result:
        backend = TransformersBackend()
        backend.start(model, tokenizer)
        streams = [
            backend.generate(GenerationRequest(f"f{i}", prompt=p, params=greedy(20))) for i, p in enumerate(PROMPTS[:2])
        ]
        outcomes = await asyncio.gather(*(collect(s) for s in streams), return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, InferenceError)
            assert "inference step failed: RuntimeError: out of memory (injected)" in str(outcome)
        assert backend.active_requests() == 0
        after = await collect(backend.generate(GenerationRequest("after", prompt=PROMPTS[1], params=greedy(20))))
        await backend.unload()
        return after

    assert asyncio.run(body()).tokens == reference(hf, ids(hf, PROMPTS[1]), 20)


# ---- migration ---------------------------------------------------------------------------------


async def run_migration(
    checkpoint: Path, prompt: str, params: SamplingParams, *, after: int, include_kv: bool
) -> tuple[Result, Result, Result, object]:
    """Unmigrated run; then the same request stopped after `after` tokens on one backend and
    resumed on a second, freshly loaded one, with other requests running on both."""
    source = await loaded(checkpoint)
    unmigrated = await collect(source.generate(GenerationRequest("ref", prompt=prompt, params=params)))
    busy = greedy(60)
    neighbour = asyncio.create_task(collect(source.generate(GenerationRequest("n1", prompt=PROMPTS[1], params=busy))))
    state = None

    async def migrate_at(result: Result) -> None:
        nonlocal state
        if len(result.tokens) == after:
            state = await source.stop_and_export("m", include_kv=include_kv)

    head = await collect(source.generate(GenerationRequest("m", prompt=prompt, params=params)), migrate_at)
    await neighbour
    await source.unload()

    destination = await loaded(checkpoint)
    other = asyncio.create_task(collect(destination.generate(GenerationRequest("n2", prompt=PROMPTS[3], params=busy))))
    await wait_until(lambda: destination.active_requests() == 1)
    tail = await collect(destination.resume(state))
    await other
    await destination.unload()
    return unmigrated, head, tail, state


@pytest.mark.parametrize("include_kv", [True, False], ids=["kv", "recompute"])
@pytest.mark.parametrize(
    "params",
    [greedy(30), SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30)],
    ids=["greedy", "seeded"],
)
def test_migrated_request_continues_the_identical_stream(backend_checkpoint, params, include_kv):
    unmigrated, head, tail, state = asyncio.run(
        run_migration(backend_checkpoint, PROMPTS[2], params, after=8, include_kv=include_kv)
    )
    # The source stream delivers exactly the exported tokens, then says "migrated".
    assert head.finish == "migrated" and head.events[-1].token_ids == []
    assert head.tokens == state.output_token_ids and len(head.tokens) >= 8
    assert head.text == state.text_emitted
    # The destination goes on with exactly the remaining tokens and text of the unmigrated run.
    assert head.tokens + tail.tokens == unmigrated.tokens
    assert head.text + tail.text == unmigrated.text
    assert tail.finish == unmigrated.finish
    assert tail.events[-1].completion_tokens == len(unmigrated.tokens)
    assert (state.rng_state is None) == (params.temperature == 0)
    if include_kv:
        kv = state.kv
        assert kv.num_tokens == len(state.prompt_token_ids) + len(state.output_token_ids) - 1
        assert len(kv.keys) == len(kv.values) == 2
        for t in (*kv.keys, *kv.values):
            assert t.shape == (2, kv.num_tokens, 16) and t.device.type == "cpu" and t.is_contiguous()
    else:
        assert state.kv is None


def test_export_state_snapshots_without_stopping(backend_checkpoint, hf):
    prompt = ids(hf, PROMPTS[1])
    expected = reference(hf, prompt, 30)

    async def body():
        backend = await loaded(backend_checkpoint)
        snapshot = None

        async def snap(result: Result) -> None:
            nonlocal snapshot
            if len(result.tokens) == 6:
                snapshot = await backend.export_state("s", include_kv=True)

        params = greedy(30)
        result = await collect(backend.generate(GenerationRequest("s", prompt_token_ids=prompt, params=params)), snap)
        await backend.unload()
        return result, snapshot

    result, snapshot = asyncio.run(body())
    assert result.tokens == expected  # the snapshot did not disturb the request
    assert snapshot.output_token_ids == expected[: len(snapshot.output_token_ids)]
    assert len(snapshot.output_token_ids) >= 6
    # The exported KV is the KV of prompt + output[:-1], as a fresh forward computes it.
    model, _ = hf
    prefix = snapshot.prompt_token_ids + snapshot.output_token_ids[:-1]
    with torch.inference_mode():
        cache = model(torch.tensor([prefix], device=DEVICE), use_cache=True).past_key_values
    for layer, (k, v) in enumerate(zip(snapshot.kv.keys, snapshot.kv.values)):
        torch.testing.assert_close(k, cache.layers[layer].keys[0].cpu(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, cache.layers[layer].values[0].cpu(), atol=1e-4, rtol=1e-4)


def test_resume_refuses_states_that_do_not_fit(backend_checkpoint):
    async def body() -> None:
        source = await loaded(backend_checkpoint)
        state = None

        async def grab(result: Result) -> None:
            nonlocal state
            if len(result.tokens) == 4:
                state = await source.stop_and_export("r", include_kv=True)

        await collect(source.generate(GenerationRequest("r", prompt="The", params=greedy(20))), grab)
        with pytest.raises(InvalidRequestError, match="does not match its tokens"):
            source.resume(type(state)(**{**state.__dict__, "text_emitted": state.text_emitted + "x"}))
        bad_kv = type(state.kv)(keys=state.kv.keys[:1], values=state.kv.values[:1], num_tokens=state.kv.num_tokens)
        with pytest.raises(InvalidRequestError, match="1 key / 1 value layers; this model has 2"):
            source.resume(type(state)(**{**state.__dict__, "kv": bad_kv}))
        done = greedy(len(state.output_token_ids))
        with pytest.raises(InvalidRequestError, match="already finished"):
            source.resume(type(state)(**{**state.__dict__, "params": done}))
        await source.unload()

    asyncio.run(body())
