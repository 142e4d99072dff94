"""`ember controller` (cluster mode) and `ember serve` (controller + local workers on one machine).

The flags are part of the deployment surface: the Helm chart passes exactly these to
`ember controller`, so renaming one breaks clusters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ember.cli.errors import friendly_errors

DEFAULT_CACHE_DIR = Path("~/.cache/ember")


def _scheduler_config(policy: str, tier_gbps: str | None = None):
    from ember.controller.config import SchedulerConfig, parse_tier_gbps

    config = SchedulerConfig(policy=policy)
    if tier_gbps:
        config.default_gbps = parse_tier_gbps(tier_gbps)
    return config


def _limits(max_body_bytes: int, max_tokens_cap: int, rate_limit: float | None, burst: int | None,
            max_streams_per_key: int | None):
    from ember.controller.config import LimitsConfig

    return LimitsConfig(max_body_bytes=max_body_bytes, max_tokens=max_tokens_cap, rate_per_s=rate_limit, burst=burst,
                        max_streams_per_key=max_streams_per_key)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


ADMIN_KEY_FILE_HELP = "File holding the bootstrap admin API key (else EMBER_ADMIN_KEY)."
TLS_CERT_HELP = "PEM certificate: serve HTTP and gRPC over TLS (with --tls-key)."
TLS_KEY_HELP = "PEM private key of --tls-cert."
ROOT_HELP = "Directory deployments may read local checkpoints from (repeatable)."
BUCKET_HELP = "S3 bucket deployments may read checkpoints from (repeatable; default: any)."
BODY_HELP = "Largest request body in bytes (larger: 413)."
MAX_TOKENS_HELP = "Largest max_tokens a request may ask for (larger: 400)."
RATE_HELP = "Requests per second per API key for generation endpoints (token bucket; over it: 429)."
BURST_HELP = "Burst of the per-key rate limit (default: one second's worth)."
STREAMS_HELP = "Generations one API key may run at once (more: 429)."

MIGRATION_GAIN_HELP = (
    "Seconds by which the scheduler's live-migration plan must beat the best node with room before it moves "
    "running instances off a full node that holds the model in DRAM or on disk (0: any plan that is faster; "
    "a very large value effectively turns scheduler-triggered migration off)."
)
TIER_GBPS_HELP = ("Read bandwidths (GB/s) assumed until nodes measure them, e.g. 'dram=8,disk=1,s3=0.2' "
                  "(the defaults).")


@friendly_errors
def controller(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the HTTP and gRPC servers listen on."),
    port: int = typer.Option(8080, "--port", help="HTTP port (OpenAI API, functions, admin, metrics)."),
    grpc_port: int = typer.Option(50051, "--grpc-port", help="gRPC port (ember.v1.Controller, NodeRegistry)."),
    state: Optional[str] = typer.Option(
        None, "--state", help="State store: sqlite:///PATH (default ~/.local/state/ember/controller.db) or "
        "redis://HOST:6379/0."
    ),
    deployments_file: Optional[Path] = typer.Option(
        None, "--deployments-file", help="YAML or JSON list of deployments to create (or update) at start."
    ),
    policy: str = typer.Option("locality", "--policy", help="Scheduling policy: locality, least-loaded or random."),
    node_timeout: float = typer.Option(10.0, "--node-timeout", help="Seconds without a heartbeat before a node is down."),
    tier_gbps: Optional[str] = typer.Option(None, "--tier-gbps", help=TIER_GBPS_HELP),
    migration_min_gain: float = typer.Option(1.0, "--migration-min-gain",
                                             metavar="SECONDS", help=MIGRATION_GAIN_HELP),
    kubernetes: bool = typer.Option(
        False, "--kubernetes", help="Watch Kubernetes Nodes: a cordoned node's instances move to other workers "
        "(worker --node-id must be the Kubernetes node name, as the Helm chart sets it)."
    ),
    admin_key_file: Optional[Path] = typer.Option(None, "--admin-key-file", help=ADMIN_KEY_FILE_HELP),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help=TLS_CERT_HELP),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help=TLS_KEY_HELP),
    checkpoint_root: list[Path] = typer.Option(
        [], "--checkpoint-root", help=ROOT_HELP + " Default: none (only s3:// checkpoints)."),
    allowed_bucket: Optional[list[str]] = typer.Option(None, "--allowed-bucket", help=BUCKET_HELP),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", help=BODY_HELP),
    max_tokens_cap: int = typer.Option(32768, "--max-tokens-cap", help=MAX_TOKENS_HELP),
    rate_limit: Optional[float] = typer.Option(None, "--rate-limit", help=RATE_HELP),
    burst: Optional[int] = typer.Option(None, "--burst", help=BURST_HELP),
    max_streams_per_key: Optional[int] = typer.Option(None, "--max-streams-per-key", help=STREAMS_HELP),
) -> None:
    """Run the controller: HTTP + gRPC APIs, router, autoscaler, scheduler; workers register with it.

    API keys are always required: the bootstrap admin key comes from --admin-key-file or
    EMBER_ADMIN_KEY (`ember keys create` makes more). EMBER_WORKER_TOKEN, when set, is sent to
    workers and required from them.
    """
    from ember.controller.config import DEFAULT_STATE, ControllerConfig
    from ember.controller.server import run

    config = ControllerConfig(
        host=host, port=port, grpc_port=grpc_port, state=state or DEFAULT_STATE,
        deployments_file=deployments_file, scheduler=_scheduler_config(policy, tier_gbps), node_timeout_s=node_timeout,
        kubernetes=kubernetes, auth=True, admin_key_file=admin_key_file, tls_cert=tls_cert, tls_key=tls_key,
        checkpoint_roots=list(checkpoint_root), allowed_buckets=list(allowed_bucket) if allowed_bucket else None,
        limits=_limits(max_body_bytes, max_tokens_cap, rate_limit, burst, max_streams_per_key),
        migration_min_gain_s=migration_min_gain,
    )
    config.validate()
    run(config)


@friendly_errors
def serve(
    port: int = typer.Option(8080, "--port", help="HTTP port (0 picks a free one)."),
    grpc_port: int = typer.Option(50051, "--grpc-port", help="gRPC port the workers register with (0: a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the controller listens on."),
    state: Optional[str] = typer.Option(
        None, "--state", help="State store URL (default: sqlite:///CACHE_DIR/controller.db)."
    ),
    workers: int = typer.Option(1, "--workers", help="Local worker processes to start."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE_DIR, "--cache-dir", help="Worker caches, logs, state, demo model."),
    demo: bool = typer.Option(False, "--demo", help="Build (once) and deploy the small demo model as 'demo'."),
    device: str = typer.Option("cpu", "--device", help="Device of the local workers: cpu or cuda."),
    dram_cache_gb: Optional[float] = typer.Option(
        None, "--dram-cache-gb", help="DRAM tier per worker in GB (default: a quarter of host memory)."
    ),
    policy: str = typer.Option("locality", "--policy", help="Scheduling policy: locality, least-loaded or random."),
    migration_min_gain: float = typer.Option(1.0, "--migration-min-gain",
                                             metavar="SECONDS", help=MIGRATION_GAIN_HELP),
    auth: bool = typer.Option(False, "--auth", help="Require API keys (admin key from --admin-key-file or "
                              "EMBER_ADMIN_KEY). Without it, only loopback addresses may be used."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without --auth."),
    admin_key_file: Optional[Path] = typer.Option(None, "--admin-key-file", help=ADMIN_KEY_FILE_HELP),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help=TLS_CERT_HELP),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help=TLS_KEY_HELP),
    checkpoint_root: list[Path] = typer.Option(
        [], "--checkpoint-root", help=ROOT_HELP + " Default: the cache dir, the current directory and your home."),
    allowed_bucket: Optional[list[str]] = typer.Option(None, "--allowed-bucket", help=BUCKET_HELP),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", help=BODY_HELP),
    max_tokens_cap: int = typer.Option(32768, "--max-tokens-cap", help=MAX_TOKENS_HELP),
    rate_limit: Optional[float] = typer.Option(None, "--rate-limit", help=RATE_HELP),
    burst: Optional[int] = typer.Option(None, "--burst", help=BURST_HELP),
    max_streams_per_key: Optional[int] = typer.Option(None, "--max-streams-per-key", help=STREAMS_HELP),
) -> None:
    """Run Ember on this machine: a controller and local workers; Ctrl-C stops everything."""
    import os

    from ember.cli.errors import err_console, exit_with

    if not auth and not is_loopback(host) and not insecure:
        exit_with(f"refusing to listen on {host} without API keys: anyone who can reach it could deploy and "
                  "call models", "add --auth (with EMBER_ADMIN_KEY set), or --insecure if you really mean it")
    if not auth:
        err_console.print("[yellow]API keys are off[/] (no --auth): every caller"
                          + (" on this machine" if is_loopback(host) else "") + " may use every API.",
                          soft_wrap=True)

    # Worker processes are forked while gRPC threads run; gRPC's fork handlers only log about it.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    from ember.controller.config import ControllerConfig
    from ember.controller.serve import ServeOptions, default_state, run

    cache = cache_dir.expanduser().resolve()
    roots = list(checkpoint_root) or [cache, Path.cwd(), Path.home()]
    options = ServeOptions(
        controller=ControllerConfig(host=host, port=port, grpc_port=grpc_port, state=state or default_state(cache),
                                    scheduler=_scheduler_config(policy), auth=auth, admin_key_file=admin_key_file,
                                    tls_cert=tls_cert, tls_key=tls_key, checkpoint_roots=roots,
                                    allowed_buckets=list(allowed_bucket) if allowed_bucket else None,
                                    limits=_limits(max_body_bytes, max_tokens_cap, rate_limit, burst,
                                                   max_streams_per_key),
                                    migration_min_gain_s=migration_min_gain),
        workers=workers, cache_dir=cache, demo=demo, device=device, dram_cache_gb=dram_cache_gb,
    )
    options.validate()
    run(options)


def register(app: typer.Typer) -> None:
    app.command("controller")(controller)
    app.command("serve")(serve)
