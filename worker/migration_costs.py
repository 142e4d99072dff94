"""Measured inputs of the migration cost model (ember.migration.cost_model) on one worker.

Which mode moves a request faster depends on the model, the hardware and the network, so the
constants come from measurements, never from guesses:

- Recompute (destination side, per instance): seconds to prefill n tokens. The first migration
  into an instance that asks for costs times a few real prefills of different lengths through
  the backend (a max_tokens=1 request each, while the source still decodes, so off the stream's
  pause); every token-mode resume adds its own (tokens, seconds) afterwards.
- KV transfer (source side, per worker): seconds to move n bytes of KV blocks to a peer. Until
  real transfers exist, the prior is the measured cost of the KV wire path on this host (encode
  → serialize → parse → assemble of two sizes), a lower bound for any network; every pre-copy
  round then adds its (bytes, seconds) to the destination's acknowledgement, and the prior is
  dropped once two real sizes are known.
Lines are fitted by least squares (`fit_line`), as the cost model's own fit does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

from ember.migration.cost_model import CostModelError, MigrationCostModel, fit_line
from ember.worker.backend import Backend, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

#: Prompt lengths timed when an instance's recompute cost is first needed (capped by its context).
PROBE_LENGTHS = (32, 256, 1024)
#: Bytes pushed through the KV wire path for the transfer prior (each size timed COPY_PROBE_REPEATS
#: times, the fastest kept: the machine's rate, not a busy moment's).
COPY_PROBE_BYTES = (256 << 10, 1 << 20, 4 << 20)
COPY_PROBE_REPEATS = 3
MAX_SAMPLES = 64


@dataclass(frozen=True)
class RecomputeCost:
    a_s_per_token: float
    b_s: float
    samples: int


class RecomputeProfile:
    """(tokens, seconds) of prefills on one instance → a·tokens + b."""

    def __init__(self) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=MAX_SAMPLES)
        self._probing = asyncio.Lock()

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.samples.append((tokens, seconds))

    def cost(self) -> RecomputeCost | None:
        try:
            a, b = fit_line(self.samples, "recompute (tokens, seconds)")
        except CostModelError:
            return None
        if a <= 0:  # noise on too-close sizes: no usable slope yet
            return None
        return RecomputeCost(a, max(0.0, b), len(self.samples))

    async def ensure(self, backend: Backend) -> RecomputeCost | None:
        """Fit from what was seen, timing a few prefills first if that is not enough."""
        async with self._probing:
            cost = self.cost()
            if cost is None:
                await self._probe(backend)
                cost = self.cost()
            return cost

    async def _probe(self, backend: Backend) -> None:
        limit = max(2, backend.max_context - 2)
        lengths = sorted({min(n, limit) for n in PROBE_LENGTHS})
        for n in lengths:
            request = GenerationRequest(
                request_id=f"ember-calibrate-{uuid.uuid4().hex[:12]}",
                prompt_token_ids=[0] * n,
                params=SamplingParams(max_tokens=1, temperature=0.0),
            )
            started = time.perf_counter()
            try:
                async for _ in backend.generate(request):
                    pass
            except Exception as exc:  # calibration must never fail a migration
                log.warning("recompute calibration prefill of %d tokens failed: %s", n, exc)
                return
            self.observe(n, time.perf_counter() - started)


class TransferProfile:
    """(bytes, seconds) of KV transfers from this worker → net bandwidth and fixed overhead."""

    def __init__(self) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=MAX_SAMPLES)
        self.prior: list[tuple[int, float]] = []

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.samples.append((nbytes, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(net_gbps, overhead_s), or None when nothing was measured.

        Noise can tilt a line through few points the wrong way (a busy moment during the small
        transfer); then the average rate with no fixed overhead is the honest answer."""
        real = list(self.samples)
        points = real if len({n for n, _ in real}) >= 2 else real + self.prior
        if not points:
            return None
        try:
            per_byte, overhead = fit_line(points, "KV transfer (bytes, seconds)")
        except CostModelError:
            per_byte = 0.0
        if per_byte > 0:
            return 1.0 / per_byte / 1e9, max(0.0, overhead)
        return sum(n for n, _ in points) / sum(t for _, t in points) / 1e9, 0.0

    async def ensure_prior(self) -> None:
        if not self.prior:
            self.prior = await asyncio.to_thread(measure_copy_path)


def measure_copy_path() -> list[tuple[int, float]]:
    """Seconds to push n bytes of KV through encode → serialize → parse → assemble, here."""
    import torch

    from ember.api import worker_pb2 as pb
    from ember.migration.protocol import KVAssembler, encode_kv, layout_proto

    samples = []
    heads, dim = 8, 128
    for nbytes in COPY_PROBE_BYTES:
        tokens = max(1, nbytes // (2 * heads * dim * 4))
        keys, values = [torch.randn(heads, tokens, dim)], [torch.randn(heads, tokens, dim)]
        best = float("inf")
        for _ in range(COPY_PROBE_REPEATS):
            assembler = KVAssembler(layout_proto(1, heads, dim, "float32"), tokens)
            started = time.perf_counter()
            for chunk in encode_kv(keys, values, 0):
                assembler.add(pb.KVChunk.FromString(chunk.SerializeToString()))
            best = min(best, time.perf_counter() - started)
        samples.append((assembler.bytes_received, best))
    return samples


def cost_model(recompute: RecomputeCost | None, transfer: tuple[float, float] | None) -> MigrationCostModel | None:
    """The model over the methods that have measurements (None when neither has)."""
    methods = tuple(m for m, known in (("recompute", recompute), ("kv", transfer)) if known is not None)
    if not methods:
        return None
    a, b = (recompute.a_s_per_token, recompute.b_s) if recompute else (0.0, 0.0)
    gbps, c = transfer if transfer else (1.0, 0.0)
    return MigrationCostModel(a, b, gbps, c, methods)
