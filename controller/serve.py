"""`ember serve`: a whole Ember on one machine — the controller plus N local worker processes.

Workers are ordinary `ember worker` subprocesses (the same code as in a cluster) on free
loopback ports, registering with the controller's gRPC port; state goes to an embedded SQLite
file under the cache directory, so deployments survive a restart. With `demo`, the small demo
model is built (once) and deployed as "demo", and the commands to try it are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ember.controller.config import CONTROLLER_CA_ENV, WORKER_TOKEN_ENV, ControllerConfig
from ember.controller.errors import ConfigError, ControllerError
from ember.controller.models import DeploymentSpec
from ember.controller.server import Listening, serve

log = logging.getLogger("ember.serve")

DEMO_NAME = "demo"
DEMO_SIZE = "small"
WORKER_START_TIMEOUT_S = 300.0


@dataclass
class ServeOptions:
    controller: ControllerConfig
    workers: int = 1
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/ember").expanduser())
    demo: bool = False
    device: str = "cpu"
    dram_cache_gb: float | None = None
    disk_cache_gb: float | None = None

    def validate(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.demo and self.workers == 0:
            raise ConfigError("--demo needs at least one worker", "drop --workers 0")
        self.controller.validate()


def default_state(cache_dir: Path) -> str:
    return f"sqlite:///{cache_dir / 'controller.db'}"


def build_demo_checkpoint(cache_dir: Path) -> Path:
    """The small demo model in the Ember format, built once (blocking; needs the worker extra)."""
    from ember.ckpt_format import convert
    from ember.ckpt_format.demo_model import build_demo_model
    from ember.ckpt_format.index import open_checkpoint

    demo_dir = cache_dir / "demo"
    hf_dir = demo_dir / f"demo-{DEMO_SIZE}-hf"
    ember_dir = demo_dir / f"demo-{DEMO_SIZE}.ember"
    try:
        open_checkpoint(ember_dir)
        return ember_dir
    except Exception:  # missing or broken: (re)build it
        pass
    if not (hf_dir / "config.json").exists():
        build_demo_model(hf_dir, DEMO_SIZE)
    convert(hf_dir, ember_dir, overwrite=True)
    return ember_dir


class LocalWorkers:
    """The worker subprocesses; each one's output goes to a log file named in errors."""

    def __init__(self, options: ServeOptions, controller_address: str) -> None:
        self.options = options
        self.controller_address = controller_address
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs: list[Path] = []

    def log_tail(self, i: int, lines: int = 30) -> str:
        try:
            return "\n".join(self.logs[i].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def start(self) -> None:
        log_dir = self.options.cache_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.options.workers):
            args = [
                sys.executable, "-m", "ember.cli.main", "worker",
                "--controller", self.controller_address, "--host", "127.0.0.1", "--port", "0",
                "--node-id", f"local-{i}", "--cache-dir", str(self.options.cache_dir / "workers" / f"local-{i}"),
                "--device", self.options.device,
            ]
            if self.options.dram_cache_gb is not None:
                args += ["--dram-cache-gb", str(self.options.dram_cache_gb)]
            if self.options.disk_cache_gb is not None:
                args += ["--disk-cache-gb", str(self.options.disk_cache_gb)]
            path = log_dir / f"worker-local-{i}.log"
            self.logs.append(path)
            env = dict(os.environ)
            token = self.options.controller.resolved_worker_token()
            if token:
                env[WORKER_TOKEN_ENV] = token
            if self.options.controller.tls_cert is not None:
                env[CONTROLLER_CA_ENV] = str(self.options.controller.tls_cert)
            with open(path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(*args, stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                            start_new_session=True, env=env)
            self.procs.append(proc)

    def exited(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.returncode is not None]

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=30)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def serve_local(options: ServeOptions, *, stop: asyncio.Event | None = None,
                      on_ready=None) -> None:
    """Run the controller and the workers until `stop` (or SIGINT/SIGTERM)."""
    options.validate()
    if options.controller.auth and options.controller.resolved_worker_token() is None:
        # With API keys on, the local workers must not take Load/Generate from anyone on this machine.
        options.controller.worker_token = secrets.token_urlsafe(32)
    options.cache_dir.mkdir(parents=True, exist_ok=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    listening: asyncio.Future[Listening] = loop.create_future()
    controller = asyncio.create_task(
        serve(options.controller, stop=stop, on_listening=lambda l: listening.done() or listening.set_result(l)),
        name="controller",
    )
    done, _ = await asyncio.wait({controller, listening}, return_when=asyncio.FIRST_COMPLETED)
    if controller in done:
        controller.result()  # raises the start-up error (port taken, store unreachable, …)
        return
    where = listening.result()
    workers = LocalWorkers(options, where.grpc_address)
    try:
        started_wall = time.time()
        await workers.start()
        demo_path: Path | None = None
        if options.demo:
            demo_path = await asyncio.to_thread(build_demo_checkpoint, options.cache_dir)
        await _wait_for_workers(where, workers, stop, since=started_wall)
        if stop.is_set():
            return
        if demo_path is not None:
            await _deploy_demo(where, demo_path)
            if on_ready is None:
                await _show_first_requests(where)
        if on_ready is not None:
            on_ready(where)
        else:
            print_banner(where, options, demo_path)
        watch = asyncio.create_task(_watch_workers(workers), name="watch-workers")
        await asyncio.wait({controller, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
    finally:
        stop.set()
        await workers.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await controller


async def _wait_for_workers(where: Listening, workers: LocalWorkers, stop: asyncio.Event, since: float) -> None:
    """Until every local worker this run started has sent a heartbeat (at or after `since`, wall time).

    The state file may hold local-N as "up" from a run that ended without saying goodbye (killed,
    crashed): the controller trusts such records for a grace period, which is right for a cluster
    whose workers outlive a controller restart but not here, where those workers are gone and their
    successors listen on new ports. Only a fresh heartbeat carries the new address.
    """
    ctl = where.controller
    deadline = asyncio.get_running_loop().time() + WORKER_START_TIMEOUT_S
    wanted = {f"local-{i}" for i in range(workers.options.workers)}
    while not stop.is_set():
        up = {n for n in wanted if n in ctl.cluster.nodes and ctl.cluster.nodes[n].up
              and ctl.node_records.get(n) is not None and ctl.node_records[n].last_heartbeat >= since}
        if up == wanted:
            return
        dead = workers.exited()
        if dead:
            i = dead[0]
            raise ConfigError(f"worker local-{i} exited with status {workers.procs[i].returncode}; its log "
                              f"({workers.logs[i]}) ends with:\n{workers.log_tail(i)}")
        if asyncio.get_running_loop().time() > deadline:
            raise ConfigError(f"workers {sorted(wanted - up)} did not register within {WORKER_START_TIMEOUT_S:g} s; "
                              f"see their logs in {workers.logs[0].parent}")
        await asyncio.sleep(0.2)


async def _watch_workers(workers: LocalWorkers) -> None:
    pending = {asyncio.create_task(p.wait()): i for i, p in enumerate(workers.procs)}
    while pending:
        done, _ = await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            i = pending.pop(task)
            log.error("worker local-%d exited with status %s; its log %s ends with:\n%s",
                      i, task.result(), workers.logs[i], workers.log_tail(i))


async def _deploy_demo(where: Listening, path: Path) -> None:
    ctl = where.controller
    if DEMO_NAME in ctl.router.deployments:
        return
    try:
        await ctl.create_deployment(DeploymentSpec(name=DEMO_NAME, checkpoint=str(path)))
    except ControllerError as exc:
        raise ConfigError(f"could not deploy the demo model: {exc.message}") from exc


async def _show_first_requests(where: Listening) -> None:
    """Call the demo once cold and once warm through the public HTTP API, printing each step.

    This proves the whole path works before the banner tells users how to call it, and shows
    what a cold start costs and where it came from.
    """
    import time

    import httpx
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    prompt = "Once upon a time"
    config = where.controller.config
    key = config.admin_key() if config.auth else None
    headers = {"authorization": f"Bearer {key}"} if key else {}
    # Our own server on loopback: its certificate may be self-signed for another name.
    async with httpx.AsyncClient(base_url=where.http_url, timeout=WORKER_START_TIMEOUT_S, headers=headers,
                                 verify=config.tls_cert is None) as client:
        for label in ("cold start", "warm"):
            started = time.perf_counter()
            reply = await client.post(f"/functions/{DEMO_NAME}/invoke", json={"prompt": prompt, "max_tokens": 16})
            elapsed = time.perf_counter() - started
            if reply.status_code != 200:
                raise ConfigError(f"the demo's first request failed with HTTP {reply.status_code}: {reply.text}")
            body = reply.json()
            console.print(f"[bold]{label}[/] request on {body['node']}: {elapsed:.2f} s end to end, "
                          f"{body['usage']['completion_tokens']} tokens")
            if label == "cold start":
                instance = (await client.get(f"/v1/instances/{body['instance']}")).json()
                estimated, actual = instance.get("estimated_ready_s"), instance.get("actual_ready_s")
                console.print(f"  loaded from {instance.get('source_tier')}: ready in "
                              f"{actual if actual is None else f'{actual:.2f} s'} "
                              f"(scheduler estimated {estimated if estimated is None else f'{estimated:.2f} s'})")
            console.print(f"  generated: {prompt}[cyan]{body['text']}[/]")


def print_banner(where: Listening, options: ServeOptions, demo_path: Path | None) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    url = where.http_url
    console.print(f"[bold green]Ember is serving[/] on {url} (gRPC {where.grpc_address}) with "
                  f"{options.workers} local worker(s); state in {options.controller.state}")
    console.print(f"  status page  {url}/   (`ember status` in a terminal)")
    console.print(f"  OpenAI API   {url}/v1")
    console.print(f"  functions    {url}/functions/<name>/invoke")
    console.print(f"  admin        {url}/v1/deployments  {url}/v1/instances  {url}/v1/nodes")
    console.print(f"  metrics      {url}/metrics")
    console.print(f"  worker logs  {options.cache_dir / 'logs'}")
    if demo_path is not None:
        body = ('{"model": "demo", "messages": [{"role": "user", "content": "Tell me a story"}], '
                '"max_tokens": 32}')
        url_flag = "" if url == "http://127.0.0.1:8080" else f" --url {url}"
        console.print(f"\nDeployed [bold]{DEMO_NAME}[/] ({demo_path}): it scales to zero when idle and starts again "
                      "on the next request. Try:")
        console.print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}",
                      markup=False)
        console.print(f"  ember invoke demo 'Tell me a story' --max-tokens 32 --stream{url_flag}", markup=False)
    console.print("Press Ctrl-C to stop.")
    sys.stdout.flush()


def run(options: ServeOptions) -> None:
    from ember.controller.server import run_loop

    logging.basicConfig(level=os.environ.get("EMBER_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_loop(serve_local(options))
