"""The controller's configuration: what `ember controller` / `ember serve` flags become.

Dataclasses passed down to each part (no globals), so tests and the simulator can build a
controller, a scheduler or an autoscaler with exactly the settings they need.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ember.controller.errors import ConfigError

DEFAULT_STATE_PATH = Path("~/.local/state/ember/controller.db")
DEFAULT_STATE = f"sqlite:///{DEFAULT_STATE_PATH}"
WORKER_TOKEN_ENV = "EMBER_WORKER_TOKEN"
ADMIN_KEY_ENV = "EMBER_ADMIN_KEY"
# PEM file of the CA (or self-signed certificate) workers trust when the controller's gRPC uses TLS.
CONTROLLER_CA_ENV = "EMBER_CONTROLLER_CA"
POLICIES = ("locality", "least-loaded", "random")
# Seconds by which freeing a full node through live migration must beat the best node with room
# (controller/migration_planner.py): a migration pauses running streams, a rounding error is not
# worth it.
DEFAULT_MIGRATION_MIN_GAIN_S = 1.0


@dataclass
class SchedulerConfig:
    policy: str = "locality"
    # Read bandwidth (GB/s) assumed for a tier until a node measures one. S3 is always a tier.
    default_gbps: dict[str, float] = field(default_factory=lambda: {"dram": 8.0, "disk": 1.0, "s3": 0.2})
    # Model initialisation time (s) assumed until a load of the model reports one.
    default_init_s: float = 1.0
    # Weight of a new observation in the EWMAs of bandwidth and init time.
    ewma_alpha: float = 0.3
    # Free nodes examined per decision (besides those holding the model): bounds decision cost.
    free_candidates: int = 16
    # Nodes examined per cache tier among those holding the model (a popular model may be cached
    # on thousands): within a tier they differ only in bandwidth and queue wait.
    holder_candidates: int = 16
    # Host/device memory an instance needs, as a multiple of its checkpoint size.
    memory_factor: float = 1.2
    seed: int | None = None

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for tier, gbps in self.default_gbps.items():
            if gbps <= 0:
                raise ConfigError(f"default bandwidth of tier {tier} must be > 0 GB/s, got {gbps}")
        if "s3" not in self.default_gbps:
            raise ConfigError("a default S3 bandwidth is required: S3 is always a tier")


@dataclass
class LimitsConfig:
    """Per-request and per-key limits (ember.controller.limits enforces them on HTTP and gRPC)."""

    max_body_bytes: int = 4 << 20
    max_tokens: int = 32768
    # The controller has no tokenizer: token-id prompts are capped in tokens, text in characters.
    max_prompt_tokens: int = 32768
    max_prompt_chars: int = 262144
    # Token bucket per API key (requests per second, burst); None: no rate limit.
    rate_per_s: float | None = None
    burst: int | None = None
    # Generations one key may have running at once; None: no limit.
    max_streams_per_key: int | None = None

    def validate(self) -> None:
        for flag, value in (("--max-body-bytes", self.max_body_bytes), ("--max-tokens-cap", self.max_tokens),
                            ("--max-prompt-tokens", self.max_prompt_tokens),
                            ("--max-prompt-chars", self.max_prompt_chars)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ConfigError(f"--rate-limit must be > 0 requests/s, got {self.rate_per_s}")
        if self.burst is not None and self.burst < 1:
            raise ConfigError(f"--burst must be >= 1, got {self.burst}")
        if self.max_streams_per_key is not None and self.max_streams_per_key < 1:
            raise ConfigError(f"--max-streams-per-key must be >= 1, got {self.max_streams_per_key}")


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 50051
    state: str = DEFAULT_STATE
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    heartbeat_interval_s: float = 2.0
    # A node that has not sent a heartbeat for this long is down.
    node_timeout_s: float = 10.0
    load_timeout_s: float = 900.0
    # A request whose instance failed before sending any token is retried this many times.
    dispatch_retries: int = 2
    deployments_file: Path | None = None
    worker_token: str | None = None
    # Watch Kubernetes Nodes and drain cordoned ones (ember.controller.k8s; the Helm chart sets it).
    kubernetes: bool = False
    # API keys (ember.controller.auth): required when auth is on; the bootstrap admin key comes
    # from admin_key_file or EMBER_ADMIN_KEY.
    auth: bool = False
    admin_key_file: Path | None = None
    # TLS for HTTP and gRPC when both are set.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Where deployments may read checkpoints: local roots (None: anywhere) and S3 buckets (None: any).
    checkpoint_roots: list[Path] | None = None
    allowed_buckets: list[str] | None = None
    # The scheduler's migration trigger: how much sooner (s) a plan that moves instances off a full
    # node holding the model must have it ready than the best node with room.
    migration_min_gain_s: float = DEFAULT_MIGRATION_MIN_GAIN_S

    def validate(self) -> None:
        for flag, port in (("--port", self.port), ("--grpc-port", self.grpc_port)):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{flag} must be 0-65535, got {port}")
        if self.heartbeat_interval_s <= 0:
            raise ConfigError(f"heartbeat interval must be > 0 s, got {self.heartbeat_interval_s}")
        if self.node_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(
                f"--node-timeout ({self.node_timeout_s} s) must exceed the heartbeat interval "
                f"({self.heartbeat_interval_s} s), or every node would be marked down between beats"
            )
        parse_state_url(self.state)
        self.scheduler.validate()
        if not (math.isfinite(self.migration_min_gain_s) and self.migration_min_gain_s >= 0):
            raise ConfigError(
                f"--migration-min-gain must be a number of seconds >= 0, got {self.migration_min_gain_s}",
                "e.g. --migration-min-gain 0.5; 0 takes any migration plan that is expected to be faster",
            )
        if self.deployments_file is not None and not Path(self.deployments_file).is_file():
            raise ConfigError(f"--deployments-file {self.deployments_file} does not exist")
        self.limits.validate()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together", "pass both (PEM files), or neither")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} {path} does not exist", "point it at a PEM file")
        if self.auth and self.admin_key() is None:
            raise ConfigError(
                "API keys are required here but no admin key is configured",
                f"set {ADMIN_KEY_ENV} or pass --admin-key-file FILE (at least 16 random characters, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            )

    def admin_key(self) -> str | None:
        from ember.controller.auth import read_admin_key

        return read_admin_key(self.admin_key_file)

    def resolved_worker_token(self) -> str | None:
        return self.worker_token if self.worker_token is not None else os.environ.get(WORKER_TOKEN_ENV) or None


def parse_tier_gbps(text: str) -> dict[str, float]:
    """--tier-gbps "dram=8,disk=1,s3=0.2" -> {"dram": 8.0, ...}; unnamed tiers keep their defaults."""
    out = dict(SchedulerConfig().default_gbps)
    for part in filter(None, (p.strip() for p in text.split(","))):
        tier, sep, value = part.partition("=")
        tier = tier.strip()
        if not sep or tier not in ("dram", "disk", "s3"):
            raise ConfigError(f"--tier-gbps: {part!r} is not TIER=GBPS with TIER one of dram, disk, s3",
                              'e.g. --tier-gbps "dram=8,disk=1.5,s3=0.3"')
        try:
            out[tier] = float(value)
        except ValueError:
            raise ConfigError(f"--tier-gbps: {value!r} is not a number (GB/s) for tier {tier}") from None
    return out


@dataclass(frozen=True)
class StateURL:
    kind: str  # "sqlite" | "redis"
    target: str  # a file path (or ":memory:") for sqlite, the URL itself for redis


def parse_state_url(url: str) -> StateURL:
    """sqlite:///relative/path, sqlite:////absolute/path, sqlite:///:memory:, redis://host:port/db."""
    text = url.strip()
    if text.startswith("sqlite://"):
        rest = text[len("sqlite://"):]
        if not rest.startswith("/") or len(rest) < 2:
            raise ConfigError(
                f"--state {url!r}: a SQLite URL is sqlite:///PATH", "e.g. sqlite:///ember.db or sqlite:////var/lib/ember.db"
            )
        path = rest[1:]
        if path == ":memory:":
            return StateURL("sqlite", path)
        return StateURL("sqlite", str(Path(path).expanduser()))
    parsed = urlparse(text)
    if parsed.scheme in ("redis", "rediss", "unix"):
        if parsed.scheme != "unix" and not parsed.hostname:
            raise ConfigError(f"--state {url!r} has no host", "use redis://HOST:6379/0")
        return StateURL("redis", text)
    raise ConfigError(
        f"--state {url!r} is not a state store URL",
        "use sqlite:///PATH (one machine) or redis://HOST:6379/0 (clusters)",
    )
