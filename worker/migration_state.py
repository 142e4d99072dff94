"""GenerationState on the wire (MigrationState) and the small state algebra migration needs.

The backend exports states; these functions carry them between workers unchanged: tokens,
sampling parameters (the original ones: max_tokens counts the tokens already generated), the
RNG state as opaque bytes and the text already sent. KV tensors travel separately as blocks
(ember.migration.protocol) and are joined back here.
"""

from __future__ import annotations

from ember.api import worker_pb2 as pb
from ember.worker.backend import GenerationState, KVState, SamplingParams


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=list(params.stop),
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_from_proto(msg: pb.SamplingParams, default_max_tokens: int = SamplingParams.max_tokens) -> SamplingParams:
    """Wire sampling → validated SamplingParams (raises InvalidRequestError on bad values)."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k if msg.HasField("top_k") else 0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
    )


def state_to_proto(state: GenerationState, kv_tokens: int) -> pb.MigrationState:
    msg = pb.MigrationState(
        request_id=state.request_id,
        prompt_token_ids=state.prompt_token_ids,
        output_token_ids=state.output_token_ids,
        sampling=sampling_to_proto(state.params),
        text_emitted=state.text_emitted,
        kv_tokens=kv_tokens,
    )
    if state.rng_state is not None:
        msg.rng_state = state.rng_state
    return msg


def state_from_proto(msg: pb.MigrationState, kv: KVState | None) -> GenerationState:
    return GenerationState(
        request_id=msg.request_id,
        prompt_token_ids=list(msg.prompt_token_ids),
        output_token_ids=list(msg.output_token_ids),
        params=sampling_from_proto(msg.sampling),
        rng_state=msg.rng_state if msg.HasField("rng_state") else None,
        text_emitted=msg.text_emitted,
        kv=kv,
    )


def join_kv(pieces: list[KVState]) -> KVState | None:
    """The pre-copied prefix and the stop-and-copy delta as one full KVState (None if incomplete)."""
    if not pieces or pieces[0].start != 0:
        return None
    for before, after in zip(pieces, pieces[1:]):
        if after.start != before.num_tokens:
            return None
    if len(pieces) == 1:
        return pieces[0]
    import torch

    layers = len(pieces[0].keys)
    return KVState(
        keys=[torch.cat([p.keys[i] for p in pieces], dim=1) for i in range(layers)],
        values=[torch.cat([p.values[i] for p in pieces], dim=1) for i in range(layers)],
        num_tokens=pieces[-1].num_tokens,
    )


def rng_state_after(params: SamplingParams, tokens: int) -> bytes | None:
    """The sampler's generator state after `tokens` sampled tokens of a seeded request.

    The sampler draws exactly one uniform per sampled token from the request's own generator,
    so a seeded request restarted from tokens continues the identical random stream. Unseeded
    sampling cannot be replayed (None: the destination draws fresh randomness); greedy needs none.
    """
    if params.temperature <= 0 or params.seed is None:
        return None
    import torch

    from ember.worker.sampling import generator_state, make_generator

    generator = make_generator(params.seed)
    for _ in range(tokens):  # draw exactly as ember.worker.sampling.sample does, one per token
        torch.rand(1, generator=generator)
    return generator_state(generator)
