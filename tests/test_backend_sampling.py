"""Per-row sampling: greedy, top-k/top-p filtering, seeded reproducibility, generator state transfer."""

from __future__ import annotations

import pytest
import torch

from ember.worker.backend import InvalidRequestError, SamplingParams
from ember.worker.sampling import generator_from_state, generator_state, make_generator, sample


def logits_rows(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    logits = logits_rows()
    params = [SamplingParams(temperature=0)] * 4
    assert sample(logits, params, [None] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6)])
def test_filters_that_keep_one_token_equal_greedy(params):
    logits = logits_rows()
    gens = [make_generator(i) for i in range(4)]
    assert sample(logits, [params] * 4, gens) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_never_pick_a_filtered_token():
    logits = logits_rows(rows=1, vocab=20)[0]
    order = logits.argsort(descending=True).tolist()
    probs = logits.softmax(-1)[order]
    nucleus = order[: int((probs.cumsum(0) - probs < 0.5).sum())]
    gen = make_generator(3)
    k_seen = {sample(logits[None], [SamplingParams(top_k=3)], [gen])[0] for _ in range(300)}
    p_seen = {sample(logits[None], [SamplingParams(top_p=0.5)], [gen])[0] for _ in range(300)}
    assert k_seen == set(order[:3])  # all three are reachable, nothing else is
    assert p_seen == set(nucleus)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    gen = make_generator(11)
    counts = torch.bincount(
        torch.tensor([sample(logits, [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(4000)]),
        minlength=4,
    )
    assert torch.allclose(counts / 4000, logits.softmax(-1)[0], atol=0.03)


def test_same_seed_same_tokens_alone_or_in_a_batch():
    logits = logits_rows(rows=3)
    params = SamplingParams(temperature=0.8, seed=5)
    alone = sample(logits[1:2], [params], [make_generator(5)])[0]
    batch_gens = [make_generator(1), make_generator(5), None]
    batched = sample(logits, [SamplingParams(temperature=1.3), params, SamplingParams(temperature=0)], batch_gens)
    assert batched[1] == alone
    assert batched[2] == logits[2].argmax().item()


def test_generator_state_round_trip_continues_the_same_sequence():
    logits = logits_rows(rows=1, vocab=200)
    params = [SamplingParams(temperature=1.0)]
    gen = make_generator(42)
    head = [sample(logits, params, [gen])[0] for _ in range(5)]
    state = generator_state(gen)
    tail = [sample(logits, params, [gen])[0] for _ in range(20)]
    moved = generator_from_state(state)
    assert [sample(logits, params, [moved])[0] for _ in range(20)] == tail
    assert len(set(head + tail)) > 5  # it really samples


def test_bad_generator_state_is_refused():
    with pytest.raises(InvalidRequestError, match="not a torch CPU generator state"):
        generator_from_state(b"nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be an integer"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
    ],
)
def test_sampling_params_are_validated(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)


def test_stop_accepts_a_string_or_a_list():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
