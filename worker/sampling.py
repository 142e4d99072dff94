"""Next-token choice for a batch of rows that each have their own parameters and RNG.

Every sampled token consumes exactly one uniform draw from the request's own CPU
`torch.Generator` and picks the token by inverse CDF over the sorted, filtered distribution.
That makes the stream a function of (logits, seed) alone: the same seed gives the same tokens
whether the request runs alone or in a batch, on CPU or CUDA, and a generator state exported
between two tokens continues the identical sequence on another worker. Greedy rows
(temperature 0) take the argmax and draw nothing, so they match `generate(do_sample=False)`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from ember.worker.backend import InvalidRequestError, SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: its state is small, portable bytes, independent of the model's device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def generator_state(generator: torch.Generator) -> bytes:
    return generator.get_state().numpy().tobytes()


def generator_from_state(state: bytes) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    try:
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    except RuntimeError as exc:
        raise InvalidRequestError(
            f"rng_state ({len(state)} bytes) is not a torch CPU generator state: {exc}",
            hint="export the state with the same Ember version on the source worker",
        ) from exc
    return generator


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """Choose one token per row of `logits` [rows, vocab]."""
    chosen = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        device = logits.device
        vocab = logits.shape[-1]
        sub = logits[rows].float()
        temperature = torch.tensor([params[i].temperature for i in rows], device=device)
        top_k = torch.tensor([params[i].top_k or vocab for i in rows], device=device)
        top_p = torch.tensor([params[i].top_p for i in rows], device=device)

        sorted_logits, sorted_ids = (sub / temperature[:, None]).sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass strictly before it is below top_p: the top token always stays.
        keep = (probs.cumsum(dim=-1) - probs) < top_p[:, None]
        probs = probs * keep
        cdf = probs.cumsum(dim=-1)
        kept = keep.sum(dim=-1)

        uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(device)
        pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None]).squeeze(-1)
        pick = torch.minimum(pick, kept - 1)
        chosen[rows] = sorted_ids.gather(-1, pick[:, None]).squeeze(-1)
    return chosen.tolist()
