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
    s3_connect_timeout: float = typer.Option(
        5.0, "--s3-connect-timeout", envvar="EMBER_S3_CONNECT_TIMEOUT",
        help="Seconds to wait for a connection to S3 before retrying.",
    ),
    s3_read_timeout: float = typer.Option(
        30.0, "--s3-read-timeout", envvar="EMBER_S3_READ_TIMEOUT",
        help="Seconds S3 may stay silent (before an answer, or mid-download) before the read is retried.",
    ),
    s3_max_attempts: int = typer.Option(
        3, "--s3-max-attempts", envvar="EMBER_S3_MAX_ATTEMPTS",
        help="Attempts per S3 request or download range (with backoff) before the load fails.",
    ),
) -> None:
    """Run a worker: serves ember.v1.Worker, registers with the controller, reports its tiers.

    EMBER_WORKER_TOKEN, when set, is required from callers as 'authorization: Bearer <token>'
    and sent to the controller. S3 endpoint and credentials come from the standard AWS
    environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …); every S3 call is bounded by the
    --s3-* timeouts and attempts, so a stalled store fails a load with a clear error.
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
        s3_connect_timeout_s=s3_connect_timeout,
        s3_read_timeout_s=s3_read_timeout,
        s3_max_attempts=s3_max_attempts,
    )
    config.validate()
    run(config)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
