"""gRPC services of the controller: ember.v1.NodeRegistry (workers call it) and ember.v1.Controller
(the public API, mirroring the HTTP admin and function endpoints).

Errors are the controller's own (errors.py) mapped to status codes, with the same messages the
HTTP API gives. When EMBER_WORKER_TOKEN is set, NodeRegistry calls must carry it as a bearer
token, as the worker sends it.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from pydantic import ValidationError

from ember.api import controller_pb2 as cpb
from ember.api import controller_pb2_grpc as cpb_grpc
from ember.api import worker_pb2 as pb
from ember.api import worker_pb2_grpc as pb_grpc
from ember.controller.app import Controller
from ember.controller.errors import BadRequest, ControllerError
from ember.controller.inference import Generation, Progress
from ember.controller.limits import check_generate_input
from ember.controller.models import Deployment, DeploymentSpec, InvokeRequest
from ember.controller.worker_client import GenerateInput

log = logging.getLogger("ember.controller.grpc")


async def _abort(context: grpc.aio.ServicerContext, exc: ControllerError) -> None:
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"invalid value for '{where}': {err['msg']}" if where else err["msg"]


class NodeRegistryService(pb_grpc.NodeRegistryServicer):
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        token = ctl.config.resolved_worker_token()
        self._expected = f"Bearer {token}" if token else None

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected is None:
            return
        presented = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not hmac.compare_digest(presented.encode(), self._expected.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong worker token: set the same EMBER_WORKER_TOKEN on workers and controller")

    async def RegisterNode(self, request: pb.RegisterNodeRequest, context) -> pb.RegisterNodeResponse:
        await self._check(context)
        try:
            await self.ctl.node_report(request.status, register=True)
        except ControllerError as exc:
            await _abort(context, exc)
        return pb.RegisterNodeResponse(node_id=request.status.node_id,
                                       heartbeat_interval_s=self.ctl.config.heartbeat_interval_s)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatResponse:
        await self._check(context)
        try:
            known = await self.ctl.node_report(request.status, register=False)
        except ControllerError as exc:
            await _abort(context, exc)
        return pb.HeartbeatResponse(known=known, heartbeat_interval_s=self.ctl.config.heartbeat_interval_s)


def deployment_message(d: Deployment) -> cpb.Deployment:
    return cpb.Deployment(
        name=d.name, checkpoint=d.checkpoint, backend=d.backend, min_instances=d.min_instances,
        max_instances=d.max_instances, target_concurrency=d.target_concurrency, keep_alive_s=d.keep_alive_s,
        queue_limit=d.queue_limit, request_timeout_s=d.request_timeout_s, checkpoint_bytes=d.checkpoint_bytes,
        created_at_unix=d.created_at, instances=d.instances, queued=d.queued, in_flight=d.in_flight,
        last_error=d.last_error or "",
    )


class ControllerService(cpb_grpc.ControllerServicer):
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    async def Deploy(self, request: cpb.DeployRequest, context) -> cpb.Deployment:
        fields = {"name": request.name, "checkpoint": request.checkpoint}
        if request.backend:
            fields["backend"] = request.backend
        for name in ("min_instances", "max_instances", "target_concurrency", "keep_alive_s", "queue_limit",
                     "request_timeout_s"):
            if request.HasField(name):
                fields[name] = getattr(request, name)
        try:
            spec = DeploymentSpec.model_validate(fields)
            return deployment_message(await self.ctl.create_deployment(spec))
        except ValidationError as exc:
            await _abort(context, BadRequest(_validation_message(exc)))
        except ControllerError as exc:
            await _abort(context, exc)

    async def Delete(self, request: cpb.DeleteRequest, context) -> cpb.Deployment:
        try:
            return deployment_message(await self.ctl.delete_deployment(request.name))
        except ControllerError as exc:
            await _abort(context, exc)

    async def List(self, request: cpb.ListRequest, context) -> cpb.ListResponse:
        return cpb.ListResponse(deployments=[deployment_message(d) for d in self.ctl.list_deployments()])

    async def Get(self, request: cpb.GetRequest, context) -> cpb.Deployment:
        try:
            return deployment_message(self.ctl.deployment_view(request.name))
        except ControllerError as exc:
            await _abort(context, exc)

    async def Invoke(self, request: cpb.InvokeRequest, context) -> AsyncIterator[cpb.InvokeEvent]:
        s = request.sampling
        fields: dict = {}
        if request.HasField("prompt"):
            fields["prompt"] = request.prompt
        if request.messages:
            fields["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
            if s.HasField(name):
                fields[name] = getattr(s, name)
        if s.stop:
            fields["stop"] = list(s.stop)
        try:
            body = InvokeRequest.model_validate(fields)
        except ValidationError as exc:
            await _abort(context, BadRequest(_validation_message(exc)))
            return
        inp = GenerateInput(
            prompt=body.prompt, messages=[(m.role, m.text()) for m in body.messages] if body.messages else None,
            max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            seed=body.seed, stop=body.stop_list(), request_id=uuid.uuid4().hex,
        )
        try:
            check_generate_input(inp, self.ctl.config.limits)
        except ControllerError as exc:
            await _abort(context, exc)
            return
        gen = Generation(self.ctl, request.deployment, inp, progress=True)
        try:
            await gen.admit()
            async for event in gen.events():
                if isinstance(event, Progress):
                    yield cpb.InvokeEvent(loading=cpb.LoadingProgress(percent=event.percent, message=event.message))
                else:
                    yield cpb.InvokeEvent(chunk=cpb.InvokeChunk(
                        text=event.text, token_ids=event.token_ids, finish_reason=event.finish_reason or "",
                        prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                        instance=gen.instance or "", node=gen.node or "", cold_start=gen.cold_start,
                    ))
        except ControllerError as exc:
            await _abort(context, exc)
        finally:
            gen.close()

    async def Status(self, request: cpb.StatusRequest, context) -> cpb.StatusResponse:
        ctl = self.ctl
        return cpb.StatusResponse(
            deployments=[deployment_message(d) for d in ctl.list_deployments()],
            instances=[
                cpb.InstanceInfo(id=i.id, deployment=i.deployment, node=i.node, state=i.state, address=i.address,
                                 in_flight=i.in_flight, source_tier=i.source_tier or "",
                                 estimated_ready_s=i.estimated_ready_s or 0.0, actual_ready_s=i.actual_ready_s or 0.0)
                for i in ctl.list_instances()
            ],
            nodes=[
                cpb.NodeInfo(
                    id=n.id, address=n.address, state=n.state, last_heartbeat_unix=n.last_heartbeat,
                    instances=n.instances,
                    tiers={name: pb.Tier(capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes,
                                         read_gbps=t.read_gbps,
                                         checkpoints=[pb.CachedCheckpoint(uri=c.uri, bytes=c.bytes)
                                                      for c in t.checkpoints])
                           for name, t in n.tiers.items()},
                )
                for n in ctl.list_nodes()
            ],
        )


def add_services(server: grpc.aio.Server, ctl: Controller) -> None:
    pb_grpc.add_NodeRegistryServicer_to_server(NodeRegistryService(ctl), server)
    cpb_grpc.add_ControllerServicer_to_server(ControllerService(ctl), server)
