"""KV block framing, state conversion and the backend's delta export, without processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from ember.api import worker_pb2 as pb
from ember.migration.protocol import (
    KVAssembler,
    ProtocolError,
    chunk_nbytes,
    encode_kv,
    layout_proto,
    layouts_differ,
)
from ember.worker.backend import GenerationRequest, GenerationState, KVState, SamplingParams
from ember.worker.migration_state import join_kv, rng_state_after, state_from_proto, state_to_proto


def kv_tensors(layers: int, heads: int, tokens: int, dim: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, tokens, dim, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(heads, tokens, dim, generator=g).to(dtype) for _ in range(layers)]
    return keys, values


def wire(chunks):
    """Through protobuf bytes, as gRPC would carry them."""
    return [pb.KVChunk.FromString(c.SerializeToString()) for c in chunks]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blocks_reassemble_bit_exactly_in_stages(dtype) -> None:
    keys, values = kv_tensors(3, 2, 300, 8, dtype)
    name = str(dtype).removeprefix("torch.")
    assembler = KVAssembler(layout_proto(3, 2, 8, name), capacity=400)
    # Stage 1: the prefix [0, 200) in small chunks; stage 2: the delta [200, 300).
    first = wire(encode_kv([k[:, :200] for k in keys], [v[:, :200] for v in values], 0, round_end=True,
                           chunk_bytes=4096))
    assert len(first) > 3 and first[-1].round_end and not any(c.round_end for c in first[:-1])
    assert all(0 < chunk_nbytes(c) <= 4096 for c in first)
    for chunk in first:
        assembler.add(chunk)
    assert assembler.tokens == 200
    for chunk in wire(encode_kv([k[:, 200:] for k in keys], [v[:, 200:] for v in values], 200)):
        assembler.add(chunk)
    got_keys, got_values = assembler.tensors(300)
    for want, got in zip([*keys, *values], [*got_keys, *got_values]):
        assert got.dtype == dtype and torch.equal(want, got)
    assert assembler.bytes_received == sum(t.numel() * t.element_size() for t in [*keys, *values])


def test_an_empty_round_still_carries_its_end_marker() -> None:
    chunks = list(encode_kv([torch.zeros(2, 0, 4)], [torch.zeros(2, 0, 4)], 5, round_end=True))
    assert len(chunks) == 1 and chunks[0].round_end and not chunks[0].blocks


def test_gaps_overlaps_and_bad_blocks_are_refused() -> None:
    keys, values = kv_tensors(2, 2, 10, 4)
    layout = layout_proto(2, 2, 4, "float32")
    chunk = next(encode_kv(keys, values, 0))

    assembler = KVAssembler(layout, capacity=20)
    assembler.add(chunk)
    with pytest.raises(ProtocolError, match="starts at token 0; that layer holds tokens \\[0, 10\\)"):
        assembler.add(chunk)  # the same blocks again: overlap
    gap = next(encode_kv(keys, values, 11))
    with pytest.raises(ProtocolError, match="without gaps"):
        KVAssembler(layout, capacity=40).add(gap)
    with pytest.raises(ProtocolError, match="beyond the announced capacity 5"):
        KVAssembler(layout, capacity=5).add(chunk)

    bad = pb.KVChunk()
    bad.CopyFrom(chunk)
    bad.blocks[0].keys = bad.blocks[0].keys[:-4]
    with pytest.raises(ProtocolError, match="its shape needs"):
        KVAssembler(layout, capacity=20).add(bad)
    bad.CopyFrom(chunk)
    bad.blocks[0].dtype = "float16"
    with pytest.raises(ProtocolError, match="dtype"):
        KVAssembler(layout, capacity=20).add(bad)
    bad.CopyFrom(chunk)
    bad.blocks[0].layer = 7
    with pytest.raises(ProtocolError, match="layer 7; the model has 2 layers"):
        KVAssembler(layout, capacity=20).add(bad)
    with pytest.raises(ProtocolError, match="int8"):
        KVAssembler(layout_proto(2, 2, 4, "int8"), capacity=20)

    half = KVAssembler(layout, capacity=20)
    half.add(pb.KVChunk(blocks=[b for b in chunk.blocks if b.layer == 0]))
    with pytest.raises(ProtocolError, match="the layers hold \\[0, 10\\] tokens"):
        half.tensors(10)


def test_layouts_differ_names_the_field() -> None:
    a = layout_proto(2, 2, 16, "float32")
    assert layouts_differ(a, layout_proto(2, 2, 16, "float32")) is None
    assert layouts_differ(a, layout_proto(4, 2, 16, "bfloat16")) == "num_layers 2 vs 4, dtype float32 vs bfloat16"


def test_state_round_trips_and_kv_stages_join() -> None:
    keys, values = kv_tensors(2, 2, 9, 4)
    state = GenerationState(
        request_id="r",
        prompt_token_ids=[1, 2, 3, 4],
        output_token_ids=[5, 6, 7, 8, 9, 10],
        params=SamplingParams(max_tokens=40, temperature=0.75, top_p=0.5, top_k=5, seed=11, stop=("x",)),
        rng_state=b"\x01\x02",
        text_emitted="héllo",
        kv=None,
    )
    msg = pb.MigrationState.FromString(state_to_proto(state, kv_tokens=9).SerializeToString())
    back = state_from_proto(msg, None)
    assert back == state
    greedy = GenerationState("g", [1], [], SamplingParams(temperature=0.0), None, "", None)
    assert state_from_proto(state_to_proto(greedy, 0), None) == greedy

    pieces = [
        KVState([k[:, :4] for k in keys], [v[:, :4] for v in values], num_tokens=4, start=0),
        KVState([k[:, 4:7] for k in keys], [v[:, 4:7] for v in values], num_tokens=7, start=4),
        KVState([k[:, 7:] for k in keys], [v[:, 7:] for v in values], num_tokens=9, start=7),
    ]
    joined = join_kv(pieces)
    assert joined is not None and joined.num_tokens == 9 and joined.start == 0
    assert all(torch.equal(a, b) for a, b in zip(joined.keys + joined.values, keys + values))
    assert join_kv([pieces[0], pieces[2]]) is None  # a gap
    assert join_kv(pieces[1:]) is None  # no prefix


def test_rng_state_after_replays_the_samplers_draws() -> None:
    from ember.worker.sampling import generator_from_state, make_generator, sample

    params = SamplingParams(max_tokens=50, temperature=1.0, seed=42)
    generator = make_generator(42)
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(1))
    drawn = [sample(logits, [params], [generator])[0] for _ in range(7)]
    assert len(set(drawn)) > 1
    resumed = generator_from_state(rng_state_after(params, 7))
    assert [sample(logits, [params], [resumed])[0] for _ in range(5)] == [
        sample(logits, [params], [generator])[0] for _ in range(5)
    ]
    assert rng_state_after(SamplingParams(temperature=0.0, seed=1), 3) is None
    assert rng_state_after(SamplingParams(temperature=1.0), 3) is None


def test_backend_exports_only_the_kv_delta_after_a_snapshot(migration_checkpoint: Path) -> None:
    from ember.worker.transformers_backend import TransformersBackend

    async def run():
        backend = TransformersBackend()
        await backend.load(migration_checkpoint, "cpu")
        try:
            layout = backend.kv_layout()
            assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype) == (2, 2, 16, "float32")
            assert layout.bytes_per_token == 2 * 2 * 16 * 2 * 4
            request = GenerationRequest("d", prompt="Once upon a time", params=SamplingParams(max_tokens=60,
                                                                                             temperature=0.0))
            assert backend.prompt_token_ids(request) == backend.prompt_token_ids(request) != []
            stream = backend.generate(request)
            seen = 0
            async for event in stream:
                seen += len(event.token_ids)
                if seen == 10:
                    first = await backend.export_state("d", include_kv=True)
                if seen == 20:
                    final = await backend.stop_and_export("d", include_kv=True, kv_from=first.kv.num_tokens)
                    break
            await stream.aclose()
            return first, final
        finally:
            await backend.unload()

    first, final = asyncio.run(run())
    assert first.kv.start == 0 and final.kv.start == first.kv.num_tokens
    assert final.kv.num_tokens == len(final.prompt_token_ids) + len(final.output_token_ids) - 1
    delta = final.kv.num_tokens - final.kv.start
    assert delta > 0 and final.kv.keys[0].shape == (2, delta, 16)
    assert join_kv([first.kv, final.kv]).num_tokens == final.kv.num_tokens


def test_cost_inputs_fit_from_measurements_and_survive_noise() -> None:
    from ember.worker.migration_costs import RecomputeCost, RecomputeProfile, TransferProfile, cost_model

    transfer = TransferProfile()
    assert transfer.fit() is None
    transfer.prior = [(1_000_000, 0.011), (9_000_000, 0.019)]  # 1 GB/s + 10 ms
    gbps, overhead = transfer.fit()
    assert gbps == pytest.approx(1.0) and overhead == pytest.approx(0.010)
    # Two real sizes replace the prior; a line tilted the wrong way by noise falls back to the mean rate.
    transfer.observe(2_000_000, 0.004)
    transfer.observe(4_000_000, 0.003)
    gbps, overhead = transfer.fit()
    assert gbps == pytest.approx(6_000_000 / 0.007 / 1e9) and overhead == 0.0

    recompute = RecomputeProfile()
    assert recompute.cost() is None
    for tokens in (100, 200, 400):
        recompute.observe(tokens, 0.002 + tokens * 1e-4)
    cost = recompute.cost()
    assert cost.a_s_per_token == pytest.approx(1e-4) and cost.b_s == pytest.approx(0.002) and cost.samples == 3

    assert cost_model(None, None) is None
    only_tokens = cost_model(RecomputeCost(1e-4, 0.0, 3), None)
    assert only_tokens.methods == ("recompute",) and only_tokens.best(100, 10, 10**9).method == "recompute"
    both = cost_model(RecomputeCost(1e-3, 0.0, 3), (1.0, 0.001))
    # 1000 tokens: recompute 1 s vs 1 MB over 1 GB/s + 1 ms: KV wins; 1 token: recompute wins.
    assert both.best(990, 10, 1_000_000).method == "kv"
    assert both.best(1, 0, 10**9).method == "recompute"
