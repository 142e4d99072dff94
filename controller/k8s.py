"""Everything the controller asks the Kubernetes API, behind one small module.

Two questions only, so the chart's ClusterRole can stay at `nodes: list, watch`:
- which nodes are cordoned (a `kubectl drain` starts with a cordon): `NodeWatcher` reports each
  change so the controller can migrate instances off a node before its pods are evicted;
- what GPUs each node has (`gpu_inventory`), as the device plugin advertises them.

Objects are read as plain JSON (`_preload_content=False`) rather than the client's generated
models: the models' attribute names change between client releases (`_continue` became
`var_continue`), the wire format does not.

The watcher runs the blocking client on its own thread: the list+watch protocol (list, then
watch from the list's resourceVersion, relist after 410 Gone) is simple enough to own here, and
owning the socket is what lets `stop()` return at once instead of after the server's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.controller.errors import ConfigError

log = logging.getLogger("ember.controller.k8s")

GPU_RESOURCE = "nvidia.com/gpu"
# Labels from NVIDIA's GPU feature discovery (gpu.product, gpu.memory, gpu.count, cuda.driver…).
GPU_LABEL_PREFIX = "nvidia.com/"
LIST_PAGE_SIZE = 500
HTTP_GONE = 410

NodeCallback = Callable[[str], Any]


class KubernetesConfigError(ConfigError):
    """No way to reach the Kubernetes API was found, or the one given is unusable."""


@dataclass(frozen=True)
class NodeGpuInfo:
    capacity_gpus: int
    allocatable_gpus: int
    labels: dict[str, str] = field(default_factory=dict)  # only the nvidia.com/* ones
    unschedulable: bool = False


def api_client(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    host: str | None = None,
    token: str | None = None,
):
    """A `kubernetes.client.ApiClient`.

    `host` (with an optional bearer `token`) wins: it is how tests and `kubectl proxy` are
    reached. Otherwise `kubeconfig` if given; otherwise the pod's service account when running
    in a cluster; otherwise $KUBECONFIG or ~/.kube/config.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if host is not None:
        configuration = client.Configuration(host=host)
        if token:
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return client.ApiClient(configuration)
    try:
        if kubeconfig is not None:
            path = Path(kubeconfig).expanduser()
            if not path.is_file():
                raise KubernetesConfigError(f"kubeconfig {path} does not exist", "pass the path of a readable kubeconfig")
            return config.new_client_from_config(config_file=str(path), context=context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config(context=context)
    except ConfigException as exc:
        raise KubernetesConfigError(
            f"cannot configure the Kubernetes client: {exc}",
            "run the controller in a pod with a service account (the Helm chart does), "
            "or point KUBECONFIG at a kubeconfig",
        ) from exc


def _core(api) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api)


def _read_json(response) -> dict[str, Any]:
    try:
        return json.loads(response.read())
    finally:
        response.release_conn()


def list_nodes(
    api,
    *,
    label_selector: str | None = None,
    page_size: int = LIST_PAGE_SIZE,
    request_timeout_s: tuple[float, float] = (10.0, 60.0),
) -> tuple[list[dict], str]:
    """All nodes as JSON objects, and the list's resourceVersion (where a watch starts).

    Pages through `limit`/`continue`: the API server serves a paged list from one snapshot, so
    the last page's resourceVersion is the whole list's.
    """
    core = _core(api)
    items: list[dict] = []
    cont: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": page_size, "_preload_content": False, "_request_timeout": request_timeout_s}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if cont:
            kwargs["_continue"] = cont
        page = _read_json(core.list_node(**kwargs))
        items.extend(page.get("items") or [])
        meta = page.get("metadata") or {}
        cont = meta.get("continue")
        if not cont:
            return items, str(meta.get("resourceVersion", ""))


def _quantity(value: Any) -> int:
    if value is None:
        return 0
    from kubernetes.utils import parse_quantity

    return int(parse_quantity(value))


def gpu_inventory(
    api,
    *,
    resource: str = GPU_RESOURCE,
    label_selector: str | None = None,
    page_size: int = LIST_PAGE_SIZE,
) -> dict[str, NodeGpuInfo]:
    """GPUs per node as the device plugin advertises them; nodes without any report 0."""
    inventory: dict[str, NodeGpuInfo] = {}
    for node in list_nodes(api, label_selector=label_selector, page_size=page_size)[0]:
        meta = node.get("metadata") or {}
        status = node.get("status") or {}
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(GPU_LABEL_PREFIX)}
        inventory[meta["name"]] = NodeGpuInfo(
            capacity_gpus=_quantity((status.get("capacity") or {}).get(resource)),
            allocatable_gpus=_quantity((status.get("allocatable") or {}).get(resource)),
            labels=labels,
            unschedulable=bool((node.get("spec") or {}).get("unschedulable")),
        )
    return inventory


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): relist and start over."""


class NodeWatcher:
    """Calls `on_cordoned(name)` when a node becomes unschedulable, `on_uncordoned(name)` when it
    becomes schedulable again.

    The first list reports nodes that are already cordoned: a controller restarted in the middle
    of a drain must finish it. A relist (after 410 Gone or an error) reports only what changed
    while the watch was down. Nodes that disappear are forgotten silently: their workers stop
    heartbeating and the controller's health sweep handles them.

    Callbacks run on the event loop when there is one (the loop `start()` was called from, or
    `loop=`), so they may touch asyncio state; a callback may be a coroutine function, whose
    coroutine is scheduled as a task and not awaited by the watcher (a drain takes minutes).
    Without a loop, callbacks run on the watcher's thread. A callback that raises is logged and
    the watch goes on.
    """

    def __init__(
        self,
        api,
        on_cordoned: NodeCallback,
        on_uncordoned: NodeCallback | None = None,
        *,
        label_selector: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        watch_timeout_s: int = 300,
        connect_timeout_s: float = 10.0,
        retry_delay_s: float = 1.0,
        max_retry_delay_s: float = 30.0,
    ) -> None:
        if watch_timeout_s < 1:
            raise ValueError(f"watch_timeout_s must be >= 1, got {watch_timeout_s}")
        self._api = api
        self._on_cordoned = on_cordoned
        self._on_uncordoned = on_uncordoned
        self._label_selector = label_selector
        self._loop = loop
        self._watch_timeout_s = watch_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._retry_delay_s = retry_delay_s
        self._max_retry_delay_s = max_retry_delay_s
        self._unschedulable: dict[str, bool] = {}
        self._resource_version = ""
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._lock = threading.Lock()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    # -- public ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("NodeWatcher.start() was already called; a watcher runs once")
        if self._loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
        for callback in (self._on_cordoned, self._on_uncordoned):
            if callback is not None and inspect.iscoroutinefunction(callback) and self._loop is None:
                raise ValueError(
                    f"{callback.__name__} is a coroutine function: call start() from inside the "
                    "event loop or pass loop= so the watcher knows where to run it"
                )
        self._thread = threading.Thread(target=self._run, name="k8s-node-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ends the watch now (closes its connection) and waits for the thread to exit."""
        self._stopping.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def wait_synced(self, timeout_s: float | None = None) -> bool:
        """True once the first list has been applied (its callbacks dispatched)."""
        return self._synced.wait(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def cordoned(self) -> frozenset[str]:
        with self._lock:
            return frozenset(name for name, flag in self._unschedulable.items() if flag)

    @property
    def resource_version(self) -> str:
        return self._resource_version

    # -- the list+watch loop -----------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._retry_delay_s
        while not self._stopping.is_set():
            try:
                self._relist()
                self._synced.set()
                delay = self._retry_delay_s
                while not self._stopping.is_set():
                    self._watch_once()
            except _Expired:
                log.info("node watch: resourceVersion %s expired; relisting", self._resource_version)
            except Exception as exc:  # connection refused, 5xx, 403, a proxy cutting the stream…
                if self._stopping.is_set():
                    break
                log.warning("node watch failed (%s); retrying in %.0f s", _describe(exc), delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self._max_retry_delay_s)

    def _relist(self) -> None:
        nodes, resource_version = list_nodes(self._api, label_selector=self._label_selector)
        seen: set[str] = set()
        for node in nodes:
            name = node["metadata"]["name"]
            seen.add(name)
            self._observe(name, _unschedulable(node))
        with self._lock:
            for name in set(self._unschedulable) - seen:
                del self._unschedulable[name]
        self._resource_version = resource_version

    def _watch_once(self) -> None:
        """One watch request, until the server ends it (timeoutSeconds) or stop() cuts it."""
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": self._resource_version,
            "timeout_seconds": self._watch_timeout_s,
            "_preload_content": False,
            # The server ends the watch after timeout_seconds; the read timeout only catches a
            # connection that died silently.
            "_request_timeout": (self._connect_timeout_s, self._watch_timeout_s + 30),
        }
        if self._label_selector:
            kwargs["label_selector"] = self._label_selector
        try:
            response = _core(self._api).list_node(**kwargs)
        except Exception as exc:
            if getattr(exc, "status", None) == HTTP_GONE:
                raise _Expired() from exc
            raise
        with self._lock:
            self._response = response
        try:
            if self._stopping.is_set():  # stop() came before the response could be cut
                return
            for event in _events(response):
                self._handle(event)
                if self._stopping.is_set():
                    return
        finally:
            with self._lock:
                self._response = None
            with contextlib.suppress(Exception):
                response.close()
                response.release_conn()

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == HTTP_GONE:
                raise _Expired()
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('reason')}: {obj.get('message')}")
        meta = obj.get("metadata") or {}
        if kind in ("ADDED", "MODIFIED"):
            self._observe(meta["name"], _unschedulable(obj))
        elif kind == "DELETED":
            with self._lock:
                self._unschedulable.pop(meta["name"], None)
        # BOOKMARK carries only a newer resourceVersion.
        if meta.get("resourceVersion"):
            self._resource_version = str(meta["resourceVersion"])

    def _observe(self, name: str, unschedulable: bool) -> None:
        with self._lock:
            before = self._unschedulable.get(name)
            self._unschedulable[name] = unschedulable
        if unschedulable and before is not True:
            self._dispatch(self._on_cordoned, name)
        elif not unschedulable and before is True and self._on_uncordoned is not None:
            self._dispatch(self._on_uncordoned, name)

    # -- callbacks -------------------------------------------------------------------------------

    def _dispatch(self, callback: NodeCallback, name: str) -> None:
        if self._loop is None:
            self._call(callback, name)
            return
        try:
            self._loop.call_soon_threadsafe(self._call, callback, name)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            log.warning("node watch: event loop closed; stopping the watcher")
            self._stopping.set()

    def _call(self, callback: NodeCallback, name: str) -> None:
        try:
            result = callback(name)
        except Exception:
            log.exception("node watch: %s(%r) failed", getattr(callback, "__name__", callback), name)
            return
        if inspect.isawaitable(result):
            if self._loop is None:
                log.error("node watch: %r returned an awaitable but there is no event loop to run it", callback)
                return
            task = asyncio.ensure_future(result, loop=self._loop)
            task.add_done_callback(_log_task_failure)


def _unschedulable(node: dict[str, Any]) -> bool:
    return bool((node.get("spec") or {}).get("unschedulable"))


def _events(response) -> Iterator[dict[str, Any]]:
    """Watch events: one JSON object per line of the chunked response."""
    from kubernetes.watch.watch import iter_resp_lines

    for line in iter_resp_lines(response):
        if line.strip():
            yield json.loads(line)


def _shutdown(response) -> None:
    """Unblock a thread reading `response` by shutting its socket down."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"


def _log_task_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("node watch callback failed", exc_info=task.exception())
