"""Regenerate the gRPC stubs from every .proto under api/protos (what `make proto` runs).

The .proto files live at protos/ember/api/*.proto so that protoc writes imports as
`from ember.api import worker_pb2`, which is where the stubs are importable from. protoc puts its
output under <out>/ember/api/; we move the files up into the api/ folder itself. The stubs are
committed, and a test regenerates them into a temporary folder to check they are current.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
PROTO_ROOT = API_DIR / "protos"
PROTO_PACKAGE_DIR = PROTO_ROOT / "ember" / "api"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class CodegenError(RuntimeError):
    """protoc refused a .proto file; the message carries protoc's own diagnostics."""


def proto_files() -> list[Path]:
    return sorted(PROTO_PACKAGE_DIR.glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto into `out_dir` (flat) and return the written files."""
    from grpc_tools import protoc  # dev extra: only needed to regenerate

    protos = proto_files()
    if not protos:
        raise CodegenError(f"no .proto files in {PROTO_PACKAGE_DIR}")
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ember-codegen-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        # protoc resolves the relative proto names against -I; run it from the proto root.
        rc = protoc.main(args)
        if rc != 0:
            raise CodegenError(f"protoc failed (exit {rc}) on {', '.join(p.name for p in protos)}")
        written = []
        for produced in sorted((Path(tmp) / "ember" / "api").iterdir()):
            if produced.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / produced.name
                shutil.copyfile(produced, target)
                written.append(target)
    return written


def main() -> int:
    try:
        written = generate(API_DIR)
    except CodegenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path.relative_to(API_DIR.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
