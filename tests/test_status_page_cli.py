"""`ember status` shows the status page's picture in the terminal; `deploy --wait` waits; errors give a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from ember.api.client import ApiError
from ember.cli.errors import default_hint
from ember.cli.tables import print_status

pytestmark = pytest.mark.timeout(600)

NOW = 1_800_000_000.0


def snapshot(**changes) -> dict:
    status = {
        "object": "status",
        "controller": {"version": "0.1.0", "uptime_s": 75.0, "state_store": "sqlite:///x.db", "now": NOW},
        "summary": {"nodes": 2, "nodes_up": 1, "deployments": 1, "instances": {"ready": 1, "loading": 1},
                    "queued": 3, "in_flight": 5},
        "nodes": [
            {"id": "gpu-a", "address": "10.0.0.1:50061", "state": "up", "last_heartbeat": NOW - 1,
             "devices": [{"name": "cuda:0", "total_memory_bytes": 80 * 10**9, "free_memory_bytes": 60 * 10**9}],
             "s3_read_gbps": 1.25,
             "tiers": {"disk": {"capacity_bytes": 10**12, "used_bytes": 16 * 10**9, "read_gbps": 3.5,
                                "checkpoints": [{"uri": "s3://models/llama-8b", "bytes": 16 * 10**9}]},
                       "dram": {"capacity_bytes": 256 * 10**9, "used_bytes": 16 * 10**9, "read_gbps": 20.0,
                                "checkpoints": [{"uri": "s3://models/llama-8b", "bytes": 16 * 10**9}]}},
             "instances": ["llama-1"]},
            {"id": "gpu-b", "address": "10.0.0.2:50061", "state": "down", "last_heartbeat": NOW - 600,
             "devices": [], "s3_read_gbps": 0.0, "tiers": {}, "instances": []},
        ],
        "deployments": [{"name": "llama", "checkpoint": "s3://models/llama-8b", "checkpoint_bytes": 16 * 10**9,
                         "min_instances": 1, "max_instances": 4, "target_concurrency": 8, "keep_alive_s": 60.0,
                         "queue_limit": 100, "instances": {"ready": 1, "loading": 1}, "queued": 3, "in_flight": 5,
                         "last_error": None}],
        "instances": [{"id": "llama-1", "deployment": "llama", "node": "gpu-a", "state": "ready", "in_flight": 5,
                       "source_tier": "dram", "estimated_ready_s": 1.5, "actual_ready_s": 1.25}],
        "cold_starts": [{"instance": "llama-1", "deployment": "llama", "node": "gpu-a", "tier": "dram",
                         "estimated_s": 1.5, "actual_s": 1.25, "fetch_s": 0.0, "load_s": 0.8, "init_s": 0.45,
                         "bytes": 16 * 10**9, "finished_at": NOW - 30}],
        "migrations": [{"id": "m1", "instance": "llama-0", "deployment": "llama", "source": "gpu-b",
                        "target": "gpu-a", "mode": "kv", "reason": "drain", "state": "done", "requests": 2,
                        "started_at": NOW - 90, "finished_at": NOW - 88.5, "error": None}],
    }
    status.update(changes)
    return status


def render(status: dict, width: int = 100) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    print_status(console, status, "http://ctl:8080")
    return [" ".join(line.split()) for line in console.export_text().splitlines()]


def test_status_tables_show_what_the_page_shows() -> None:
    lines = render(snapshot())
    text = "\n".join(lines)
    assert lines[0].startswith("Ember http://ctl:8080 (v0.1.0, up 1 min 15 s): 1/2 node(s) up, 1 deployment(s), "
                               "1 instance(s) ready, 1 starting; 5 request(s) in flight, 3 queued")
    # One row per tier, fastest first, S3 last; node details alongside.
    assert "gpu-a up dram 16.0 GB/256.0 GB 20.00 GB/s s3://…/llama-8b 16.0 GB" in lines
    assert "cuda:0 20.0/80.0 GB disk 16.0 GB/1.0 TB 3.50 GB/s s3://…/llama-8b 16.0 GB" in lines
    assert "10.0.0.1:50061 s3 - 1.25 GB/s" in lines
    assert "gpu-b down s3 - -" in lines and "seen 10 min ago" in text
    assert "llama 1 ready, 1 loading 3/100 5/8 1-4 x8 s3://…/llama-8b" in lines
    assert lines[lines.index("llama 1 ready, 1 loading 3/100 5/8 1-4 x8 s3://…/llama-8b") + 1] == "idle 1 min 16.0 GB"
    assert "llama-1 gpu-a ready 5 dram 1.25 s (1.5 s)" in lines
    assert "30 s ago llama gpu-a dram 1.5 s 1.25 s 0 ms/800 ms/450 ms" in lines
    assert "1 min 30 s ago llama-0 gpu-b -> gpu-a kv drain 2 done 1.5 s" in lines


def test_status_says_what_is_missing_when_empty() -> None:
    empty = snapshot(nodes=[], deployments=[], instances=[], cold_starts=[], migrations=[],
                     summary={"nodes": 0, "nodes_up": 0, "deployments": 0, "instances": {}, "queued": 0,
                              "in_flight": 0})
    text = "\n".join(render(empty))
    assert "No worker nodes: start one with `ember worker --controller HOST:PORT --cache-dir DIR`." in text
    assert "No deployments: create one with `ember deploy NAME --checkpoint PATH`." in text
    assert "No cold starts since the controller started." in text and "No migrations yet." in text


def test_status_fits_a_narrow_terminal() -> None:
    assert all(len(line) <= 80 for line in render(snapshot(), width=80)[1:])


def test_errors_without_advice_get_a_hint() -> None:
    assert "retry in 3 s" in default_hint(ApiError("queue full", 429, retry_after_s=3.0))
    assert "ember list" in default_hint(ApiError("no such model", 404))
    assert "ember status" in default_hint(ApiError("no node", 0, code="unavailable"))  # from inside a stream
    assert default_hint(ApiError("odd", 418)) is None
    assert default_hint(ValueError("not ours")) is None


def ember(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args, "--url", url], capture_output=True,
                          text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}, "COLUMNS": "100"})


def test_deploy_wait_then_status_against_ember_serve(launch_serve, demo_checkpoint: Path) -> None:
    server = launch_serve(["--workers", "1"])
    deployed = ember("deploy", "warm", "--checkpoint", str(demo_checkpoint), "--min", "1", "--wait", url=server.url)
    assert deployed.returncode == 0, deployed.stderr
    assert "deployed warm" in deployed.stdout and "ready warm-" in deployed.stdout, deployed.stdout
    assert "starting warm:" in deployed.stderr  # progress, as plain lines outside a terminal
    shown = ember("status", url=server.url)
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert any(line.startswith("local-0 up dram") for line in lines), shown.stdout
    assert any(line.startswith("warm 1 ready 0/100 0/8 1-4 x8 ") for line in lines), shown.stdout
    assert any(" warm local-0 disk " in f" {line} " for line in lines), shown.stdout  # the cold start
    as_json = json.loads(ember("status", "--json", url=server.url).stdout)
    assert as_json["object"] == "status" and as_json["summary"]["instances"] == {"ready": 1}
    assert [c["deployment"] for c in as_json["cold_starts"]] == ["warm"]
    # A second deploy of the same name: one line of what went wrong, one of what to do.
    again = ember("deploy", "warm", "--checkpoint", str(demo_checkpoint), url=server.url)
    assert again.returncode == 1
    assert again.stderr.splitlines() == ["error: a deployment named 'warm' already exists; delete it first or pick "
                                         "another name", "hint: pick another name, or `ember delete NAME` first"]
