"""The controller process: HTTP (uvicorn) and gRPC servers on one uvloop event loop.

`ember controller …` builds a ControllerConfig and calls run(); `ember serve` and the tests call
serve() with their own stop event. Ports may be 0 (a free one is picked and reported through
`on_listening`), so tests and `ember serve` never race for fixed ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from ember.controller.app import Controller
from ember.controller.config import ControllerConfig
from ember.controller.errors import ConfigError
from ember.controller.grpc_api import add_services
from ember.controller.grpc_auth import ControllerAuthInterceptor
from ember.controller.http_api import create_app
from ember.controller.state import open_store

log = logging.getLogger("ember.controller")

GRPC_GRACE_S = 5.0


@dataclass(frozen=True)
class Listening:
    http_url: str
    grpc_address: str
    controller: Controller


def _quiet_server(config):
    """uvicorn's Server without its own signal capture: the caller owns SIGINT/SIGTERM (uvicorn
    would re-raise a captured SIGTERM after shutting down, killing `ember serve` before it can
    stop its workers)."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return QuietServer(config)


def _bind_http(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}",
                          "pick another --port (0 picks a free one) or stop what uses it") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


async def serve(config: ControllerConfig, *, stop: asyncio.Event | None = None,
                on_listening: Callable[[Listening], None] | None = None) -> None:
    """Run until `stop` is set; without a `stop` of the caller's, until SIGINT/SIGTERM."""
    import uvicorn

    config.validate()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    sock = _bind_http(config.host, config.port)
    http_port = sock.getsockname()[1]
    try:
        store = await open_store(config.state)
    except BaseException:
        sock.close()
        raise
    ctl = Controller(config, store)
    grpc_server = grpc.aio.server(interceptors=[ControllerAuthInterceptor(ctl.auth, ctl.limiter)])
    add_services(grpc_server, ctl)
    grpc_bind = f"[{config.host}]:{config.grpc_port}" if ":" in config.host else f"{config.host}:{config.grpc_port}"
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            grpc_port = grpc_server.add_secure_port(grpc_bind, credentials)
        else:
            grpc_port = grpc_server.add_insecure_port(grpc_bind)
    except RuntimeError:
        grpc_port = 0
    if grpc_port == 0:
        await store.close()
        sock.close()
        raise ConfigError(f"cannot listen on {grpc_bind} for gRPC", "pick another --grpc-port (0 picks a free one)")
    watcher = None
    try:
        await ctl.start()
        await grpc_server.start()
        if config.kubernetes:
            watcher = _watch_nodes(ctl)
        app = create_app(ctl)
        tls = {}
        if config.tls_cert is not None and config.tls_key is not None:
            tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
        # Keep-alive longer than clients' and load balancers' idle timeouts (60 s on AWS ALB): a server
        # that closes first races the client's next request on that connection, which then fails.
        server = _quiet_server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=5, timeout_keep_alive=75, **tls))
        scheme = "https" if tls else "http"
        listening = Listening(f"{scheme}://{_display_host(config.host)}:{http_port}",
                              f"{_display_host(config.host)}:{grpc_port}", ctl)
        log.info("controller listening on %s (HTTP) and %s (gRPC%s), state %s, API keys %s",
                 listening.http_url, listening.grpc_address, ", TLS" if tls else "", config.state,
                 "required" if config.auth else "OFF (anyone who can connect may call every API)")
        if on_listening is not None:
            on_listening(listening)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        with contextlib.suppress(Exception):
            await serving
    finally:
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        await grpc_server.stop(GRPC_GRACE_S)
        await ctl.stop()
        await store.close()
        sock.close()


def _watch_nodes(ctl: Controller):
    """--kubernetes: cordoned Nodes are drained (worker node ids are Kubernetes node names)."""
    from ember.controller import k8s

    watcher = k8s.NodeWatcher(k8s.api_client(), ctl.cordon, ctl.uncordon)
    watcher.start()
    return watcher


def run(config: ControllerConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_loop(serve(config, on_listening=_announce))


def _announce(listening: Listening) -> None:
    print(f"ember controller listening on {listening.http_url} (gRPC {listening.grpc_address})", flush=True)


def run_loop(coro) -> None:
    """asyncio.run on uvloop when available (it is a base dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)
