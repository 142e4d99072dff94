"""Which checkpoints a deployment may name: local paths under configured roots, S3 buckets from a
list. Without it, anyone allowed to deploy could make the controller (and then the workers) open
any file the process can read — /etc/passwd would only be refused for not being a checkpoint,
after it had been opened. The check runs on the canonical URI (symlinks resolved), before any I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.controller.errors import ControllerError
from ember.controller.registry import canonical_uri


class CheckpointForbidden(ControllerError):
    status = 403
    type = "permission_error"
    code = "checkpoint_not_allowed"
    grpc_code = "PERMISSION_DENIED"


@dataclass
class CheckpointPolicy:
    # None: no restriction of that kind (a library default; the CLI always sets roots).
    roots: list[Path] | None = None
    buckets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.roots is not None:
            self.roots = [Path(r).expanduser().resolve() for r in self.roots]

    def check(self, uri: str) -> None:
        canonical, local = canonical_uri(uri)
        if local:
            if self.roots is None:
                return
            path = Path(canonical)
            if any(path == root or path.is_relative_to(root) for root in self.roots):
                return
            allowed = ", ".join(str(r) for r in self.roots) or "none configured"
            raise CheckpointForbidden(
                f"checkpoint {canonical} is outside the directories this controller may read ({allowed}); "
                "copy it under one of them or start the controller with --checkpoint-root DIR", param="checkpoint")
        if self.buckets is None:
            return
        bucket = canonical[len("s3://"):].split("/", 1)[0]
        if bucket not in self.buckets:
            allowed = ", ".join(self.buckets) or "none configured"
            raise CheckpointForbidden(
                f"checkpoint {canonical}: bucket {bucket!r} is not one this controller may read ({allowed}); "
                "start the controller with --allowed-bucket NAME", param="checkpoint")
