"""`ember serve --demo` (what `make run` runs): controller + local worker processes, the demo model
deployed, the printed commands work, Ctrl-C/SIGTERM stops everything, and state survives a restart."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ember.api.client import EmberClient

pytestmark = pytest.mark.timeout(600)


def start_serve(cache_dir: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli.main", "serve", "--port", "0", "--grpc-port", "0",
         "--cache-dir", str(cache_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            return proc, lines
    proc.wait(timeout=30)
    raise AssertionError("ember serve exited early:\n" + "\n".join(lines))


def processes_using(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmdline and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0


def test_serve_demo_prints_working_commands_and_stops_cleanly(tmp_path: Path) -> None:
    cache = tmp_path / "ember-cache"
    proc, lines = start_serve(cache, "--demo", "--workers", "2")
    try:
        banner = "\n".join(lines)
        url = re.search(r"Ember is serving on (http://\S+)", banner).group(1)
        invoke = next(line.strip() for line in lines if line.strip().startswith("ember invoke demo"))
        curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
        with EmberClient(url) as client:
            assert sorted(n["id"] for n in client.list_nodes() if n["state"] == "up") == ["local-0", "local-1"]
            assert client.get_deployment("demo")["checkpoint"].endswith("demo-small.ember")
        ember = str(Path(sys.executable).parent / "ember")
        result = subprocess.run([ember, *shlex.split(invoke)[1:]], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
        body = shlex.split(curl)[-1]  # the -d payload
        r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                       timeout=300)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
    finally:
        stop(proc)
    deadline = time.monotonic() + 30
    while processes_using(cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(cache) == []  # no worker left behind

    # The state file in the cache directory keeps the deployment; --demo does not deploy it twice.
    proc, lines = start_serve(cache, "--demo", "--workers", "1")
    try:
        url = re.search(r"Ember is serving on (http://\S+)", "\n".join(lines)).group(1)
        with EmberClient(url) as client:
            assert [d["name"] for d in client.list_deployments()] == ["demo"]
            assert client.invoke("demo", "Hello", max_tokens=3)["usage"]["completion_tokens"] == 3
    finally:
        stop(proc)


def test_serve_after_a_crash_does_not_use_the_dead_workers_addresses(tmp_path: Path) -> None:
    """A run killed without shutting down leaves local-0 "up" in the state file, at a port nothing
    listens on any more; the next run must wait for its own worker, not send the demo's first
    request to that address."""
    cache = tmp_path / "ember-cache"
    proc, lines = start_serve(cache, "--demo", "--workers", "1")
    url = re.search(r"Ember is serving on (http://\S+)", "\n".join(lines)).group(1)
    with EmberClient(url) as client:  # scaled to zero, so the next run's first request is a cold start
        client.update_deployment("demo", keep_alive_s=0)
        deadline = time.monotonic() + 60
        while client.list_instances("demo") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not client.list_instances("demo")
    proc.kill()  # no goodbye: the controller's state still says local-0 is up
    proc.wait(timeout=30)
    for pid in processes_using(cache):  # its worker, in a session of its own, dies too
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while processes_using(cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc, lines = start_serve(cache, "--demo", "--workers", "1")  # fails here if the demo request failed
    try:
        assert any(line.startswith("cold start request on local-0") for line in lines), "\n".join(lines)
    finally:
        stop(proc)


def test_serve_refuses_bad_options_clearly(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ember.cli.main", "serve", "--cache-dir", str(tmp_path), *args],
                              capture_output=True, text=True, timeout=120)

    r = serve("--state", "postgres://db/ember")
    assert r.returncode == 1 and "not a state store URL" in r.stderr and "Traceback" not in r.stderr
    r = serve("--workers", "-1")
    assert r.returncode == 1 and "--workers" in r.stderr
    r = serve("--policy", "fastest")
    assert r.returncode == 1 and "--policy" in r.stderr
