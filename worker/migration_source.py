"""The source side of a live migration: move one running request to a peer worker.

Order, for one request (the destination's answers in brackets):

1. begin: identity, checkpoint, KV layout, the request's reachable length  [ready: its recompute cost]
2. the mode: as asked, or the cost model's cheaper one (recompute a·tokens + b on the
   destination vs KV bytes / net bandwidth + c from this worker's transfers)
3. KV mode, pre-copy: snapshot the KV of the computed prefix (export_state; the request keeps
   decoding) and stream it in blocks; repeat with only the positions added meanwhile until
   that delta is small (STOP_COPY_TOKENS) or MAX_PRECOPY_ROUNDS were sent  [kv_ack per round]
4. stop-and-copy: stop_and_export at a token boundary, send only the KV delta since the last
   snapshot (KV mode) and the generation state  [accepted: resumed, first token produced]
5. half-close  [status OK]: the destination owns the request now; the source's stream ends
   "migrated" with a Handover naming where the client attaches.

Nothing is lost on failure: before step 4 the request was never stopped; after it, the exported
state (pre-copied prefix + delta joined back, or tokens only) is resumed on this worker's own
backend (StayHere), so the client's stream just pauses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.migration.protocol import CHUNK_BYTES, chunk_nbytes, encode_kv, layout_proto
from ember.worker.backend import BackendError, GenerationState, KVState, UnknownRequestError
from ember.worker.migration_costs import RecomputeCost, TransferProfile, cost_model
from ember.worker.migration_state import join_kv, state_to_proto
from ember.worker.migration_streams import Handover, StayHere, TrackedRequest

log = logging.getLogger(__name__)

#: Stop pre-copying once fewer new KV positions than this are pending: the stop-and-copy sends them.
STOP_COPY_TOKENS = 16
MAX_PRECOPY_ROUNDS = 4
#: Seconds to wait for the destination's ready / kv_ack.
REPLY_TIMEOUT_S = 120.0
#: Seconds from the stop to the destination's first token before the request stays here.
ACCEPT_TIMEOUT_S = 60.0

MODE_NAMES = {pb.MIGRATION_MODE_KV: "kv", pb.MIGRATION_MODE_TOKENS: "tokens", pb.MIGRATION_MODE_AUTO: "auto"}


class MigrationAborted(Exception):
    """The destination refused, failed or went away; the message says which and why."""


@dataclass(frozen=True)
class Destination:
    migration_id: str
    address: str
    instance_id: str
    node_id: str
    checkpoint: str  # the source instance's checkpoint URI
    stub: pb_grpc.WorkerStub
    metadata: tuple[tuple[str, str], ...]


class OutboundMigration:
    """Moves one tracked request; `run` returns the final MigrateOutEvent and never raises."""

    def __init__(
        self,
        entry: TrackedRequest,
        destination: Destination,
        requested_mode: int,
        transfer: TransferProfile,
        emit: Callable[[pb.MigrateOutEvent], None],
    ) -> None:
        self.entry = entry
        self.dest = destination
        self.requested_mode = requested_mode
        self.mode = requested_mode
        self.transfer = transfer
        self.emit = emit
        self.started = time.monotonic()
        self.bytes_sent = 0
        self.tokens = 0
        self.estimates: tuple[float, float] = (0.0, 0.0)
        self.stop_s = 0.0
        self._call: grpc.aio.StreamStreamCall | None = None

    @property
    def request_id(self) -> str:
        return self.entry.request_id

    def event(self, phase: int, message: str = "", handover: pb.Handover | None = None) -> pb.MigrateOutEvent:
        return pb.MigrateOutEvent(
            request_id=self.request_id,
            phase=phase,
            mode=self.mode,
            bytes=self.bytes_sent,
            tokens=self.tokens,
            stop_s=self.stop_s,
            total_s=time.monotonic() - self.started,
            message=message,
            estimated_kv_s=self.estimates[0],
            estimated_recompute_s=self.estimates[1],
            handover=handover,
        )

    async def run(self) -> pb.MigrateOutEvent:
        entry = self.entry
        if entry.migrating:  # leave that migration's bookkeeping alone
            return self.event(pb.MIGRATION_PHASE_STAYED, "a migration of this request is already in progress")
        entry.migrating = True
        try:
            return await self._run()
        except UnknownRequestError:
            return self.event(pb.MIGRATION_PHASE_FINISHED, "the request finished before it could move")
        except MigrationAborted as exc:  # before the stop: the request never left
            return self.event(pb.MIGRATION_PHASE_STAYED, str(exc))
        except BackendError as exc:  # e.g. the instance is being unloaded: its streams end anyway
            return self.event(pb.MIGRATION_PHASE_FINISHED, f"the source backend refused: {exc}")
        finally:
            if entry.outcome is None:
                entry.migrating = False
            if self._call is not None and not self._call.done():
                self._call.cancel()

    async def _run(self) -> pb.MigrateOutEvent:
        entry, backend = self.entry, self.entry.backend
        peek = await backend.export_state(self.request_id, include_kv=False)
        self.tokens = len(peek.prompt_token_ids) + len(peek.output_token_ids)
        layout = backend.kv_layout()
        reachable = min(len(peek.prompt_token_ids) + peek.params.max_tokens, backend.max_context)
        self._call = self.dest.stub.MigrateIn(metadata=self.dest.metadata)
        await self._write(
            pb.MigrateInMessage(
                begin=pb.MigrationBegin(
                    migration_id=self.dest.migration_id,
                    instance_id=self.dest.instance_id,
                    request_id=self.request_id,
                    mode=self.requested_mode,
                    checkpoint=self.dest.checkpoint,
                    layout=layout_proto(layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype),
                    max_tokens=reachable,
                )
            )
        )
        ready = (await self._reply("ready", REPLY_TIMEOUT_S)).ready
        self.mode = self._choose(ready, peek, layout.bytes_per_token)

        pieces: list[KVState] = []
        if self.mode == pb.MIGRATION_MODE_KV:
            pieces = await self._precopy()
        if entry.closed:
            return self.event(pb.MIGRATION_PHASE_FINISHED, "its client went away")

        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        entry.outcome = future
        sent = pieces[-1].num_tokens if pieces else 0
        try:
            final = await backend.stop_and_export(
                self.request_id, include_kv=self.mode == pb.MIGRATION_MODE_KV, kv_from=sent
            )
        except BaseException:
            entry.outcome = None
            raise
        stopped = time.monotonic()
        self.tokens = len(final.prompt_token_ids) + len(final.output_token_ids)
        try:
            accepted = await self._stop_and_copy(final)
        except Exception as exc:  # whatever broke, the stopped request must go on somewhere: here
            if not isinstance(exc, (MigrationAborted, grpc.aio.AioRpcError)):
                log.exception("migration of %s failed after the stop", self.request_id)
            reason = _reason(exc)
            state = final
            if final.kv is not None:
                state = dataclasses.replace(final, kv=join_kv([*pieces, final.kv]))
            future.set_result(StayHere(state, f"destination {self.dest.address}: {reason}"))
            return self.event(pb.MIGRATION_PHASE_STAYED, f"destination {self.dest.address} failed after the stop: "
                              f"{reason}; resumed here")
        self.stop_s = time.monotonic() - stopped
        handover = pb.Handover(
            address=self.dest.address,
            instance_id=self.dest.instance_id,
            resume_id=accepted.resume_id,
            migration_id=self.dest.migration_id,
            mode=self.mode,
            node_id=self.dest.node_id,
        )
        future.set_result(Handover(handover))
        return self.event(pb.MIGRATION_PHASE_HANDED_OVER, handover=handover)

    def _choose(self, ready: pb.MigrationReady, state: GenerationState, bytes_per_token: int) -> int:
        if self.requested_mode != pb.MIGRATION_MODE_AUTO:
            return self.requested_mode
        recompute = None
        if ready.samples > 0:
            recompute = RecomputeCost(ready.recompute_a_s_per_token, ready.recompute_b_s, ready.samples)
        model = cost_model(recompute, self.transfer.fit())
        tokens_in, tokens_out = len(state.prompt_token_ids), len(state.output_token_ids)
        kv_bytes = max(0, tokens_in + tokens_out - 1) * bytes_per_token
        if model is None:
            return pb.MIGRATION_MODE_TOKENS  # nothing measured: the mode that needs no KV path
        kv_s = model.kv_transfer_s(kv_bytes) if "kv" in model.methods else 0.0
        recompute_s = model.recompute_s(tokens_in, tokens_out) if "recompute" in model.methods else 0.0
        self.estimates = (kv_s, recompute_s)
        best = model.best(tokens_in, tokens_out, kv_bytes)
        return pb.MIGRATION_MODE_KV if best.method == "kv" else pb.MIGRATION_MODE_TOKENS

    async def _precopy(self) -> list[KVState]:
        backend = self.entry.backend
        pieces: list[KVState] = []
        sent = 0
        for round_no in range(MAX_PRECOPY_ROUNDS):
            if round_no > 0:
                peek = await backend.export_state(self.request_id, include_kv=False)
                pending = len(peek.prompt_token_ids) + len(peek.output_token_ids) - 1 - sent
                if pending <= STOP_COPY_TOKENS:
                    break
            snapshot = await backend.export_state(self.request_id, include_kv=True, kv_from=sent)
            if snapshot.kv is None:  # not in the running batch yet: nothing computed to copy
                self.mode = pb.MIGRATION_MODE_TOKENS
                return []
            started = time.perf_counter()
            nbytes = await self._send_kv(snapshot.kv, round_end=True)
            ack = (await self._reply("kv_ack", REPLY_TIMEOUT_S)).kv_ack
            self.transfer.observe(nbytes, time.perf_counter() - started)
            if ack.tokens_received != snapshot.kv.num_tokens:
                raise MigrationAborted(
                    f"the destination holds {ack.tokens_received} KV tokens after a round that ended at "
                    f"{snapshot.kv.num_tokens}"
                )
            pieces.append(snapshot.kv)
            sent = snapshot.kv.num_tokens
            self.tokens = len(snapshot.prompt_token_ids) + len(snapshot.output_token_ids)
            self.emit(self.event(pb.MIGRATION_PHASE_PRECOPY, f"round {round_no + 1}: KV tokens [0, {sent}) sent"))
        return pieces

    async def _stop_and_copy(self, final: GenerationState) -> pb.MigrationAccepted:
        kv_tokens = 0
        if final.kv is not None:
            await self._send_kv(final.kv, round_end=False)
            kv_tokens = final.kv.num_tokens
        commit = pb.MigrationCommit(state=state_to_proto(final, kv_tokens))
        self.bytes_sent += commit.ByteSize()
        await self._write(pb.MigrateInMessage(commit=commit))
        self.emit(self.event(pb.MIGRATION_PHASE_STOP_AND_COPY, f"stopped at {len(final.output_token_ids)} output tokens"))
        accepted = (await self._reply("accepted", ACCEPT_TIMEOUT_S)).accepted
        # Half-close and wait for the destination's OK: only then does it own the request (it
        # cancels the resumed request if the stream breaks before), so no outcome leaves it twice.
        assert self._call is not None
        await self._call.done_writing()
        try:
            extra = await asyncio.wait_for(self._call.read(), REPLY_TIMEOUT_S)
            code = await asyncio.wait_for(self._call.code(), REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise MigrationAborted("the destination did not confirm the hand-over in time") from None
        except grpc.aio.AioRpcError as exc:
            raise MigrationAborted(_reason(exc)) from exc
        if extra is not grpc.aio.EOF or code != grpc.StatusCode.OK:
            raise MigrationAborted(f"the destination did not confirm the hand-over: {await self._status_reason()}")
        return accepted

    async def _send_kv(self, kv: KVState, *, round_end: bool) -> int:
        """Encode blocks off the event loop (a long context is hundreds of MB) and write them in order."""
        chunks = iter(encode_kv(kv.keys, kv.values, kv.start, round_end=round_end, chunk_bytes=CHUNK_BYTES))
        nbytes = 0
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return nbytes
            size = chunk_nbytes(chunk)
            nbytes += size
            self.bytes_sent += size
            await self._write(pb.MigrateInMessage(kv=chunk))

    async def _write(self, message: pb.MigrateInMessage) -> None:
        assert self._call is not None
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise MigrationAborted(_reason(exc)) from exc
        except asyncio.InvalidStateError as exc:  # the call already ended: its status says why
            raise MigrationAborted(await self._status_reason()) from exc

    async def _reply(self, kind: str, timeout_s: float) -> pb.MigrateInReply:
        assert self._call is not None
        try:
            reply = await asyncio.wait_for(self._call.read(), timeout_s)
        except asyncio.TimeoutError:
            raise MigrationAborted(f"no {kind} from the destination within {timeout_s:.0f} s") from None
        except grpc.aio.AioRpcError as exc:
            raise MigrationAborted(_reason(exc)) from exc
        if reply is grpc.aio.EOF:
            raise MigrationAborted(await self._status_reason())
        if reply.WhichOneof("body") != kind:
            raise MigrationAborted(f"the destination answered {reply.WhichOneof('body')} where {kind} was due")
        return reply

    async def _status_reason(self) -> str:
        assert self._call is not None
        try:
            code = await self._call.code()
            details = await self._call.details()
        except grpc.aio.AioRpcError as exc:
            return _reason(exc)
        return f"{code.name}: {details}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def mode_name(mode: int) -> str:
    return MODE_NAMES.get(mode, "auto")
