"""`ember worker`: run a worker node (gRPC agent, tier caches, heartbeats to the controller).

The flags are part of the deployment surface: the Helm chart and the Dockerfiles pass exactly
these, so renaming one breaks clusters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ember.cli.errors import friendly_errors


@friendly_errors
def worker(
    cache_dir: Path = typer.Option(..., "--cache-dir", help="Directory of the disk cache tier (created if missing)."),
    controller: Optional[str] = typer.Option(
        None, "--controller", help="Controller's NodeRegistry HOST:PORT; without it the worker runs standalone."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the gRPC server listens on."),
    port: int = typer.Option(50061, "--port", help="gRPC port (0 picks a free one and prints it)."),
    advertise_address: Optional[str] = typer.Option(
        None, "--advertise-address", help="HOST:PORT the controller dials (default: host:port)."
    ),
    node_id: Optional[str] = typer.Option(None, "--node-id", help="Node name (default: the hostname)."),
    disk_cache_gb: float = typer.Option(100.0, "--disk-cache-gb", help="Disk cache capacity in GB."),
    dram_cache_gb: Optional[float] = typer.Option(
        None, "--dram-cache-gb", help="DRAM tier capacity in GB; 0 disables it (default: a quarter of host memory)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on this port."),
) -> None:
    """Run a worker: serves ember.v1.Worker, registers with the controller, reports its tiers.

    EMBER_WORKER_TOKEN, when set, is required from callers as 'authorization: Bearer <token>'
    and sent to the controller. S3 endpoint and credentials come from the standard AWS
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …).
    """
    from ember.worker.config import WorkerConfig
    from ember.worker.server import run

    config = WorkerConfig(
        cache_dir=cache_dir,
        host=host,
        port=port,
        controller=controller,
        advertise_address=advertise_address,
        node_id=node_id,
        disk_cache_gb=disk_cache_gb,
        dram_cache_gb=dram_cache_gb,
        device=device,
        metrics_port=metrics_port,
    )
    config.validate()
    run(config)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
