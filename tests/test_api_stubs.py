"""The committed gRPC stubs are what `make proto` would generate from the committed .proto files."""

from __future__ import annotations

from pathlib import Path

from ember.api import codegen


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    assert written, "codegen produced no files"
    stale = []
    for fresh in written:
        committed = codegen.API_DIR / fresh.name
        if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
            stale.append(fresh.name)
    assert not stale, f"stale or missing generated stubs {stale}: run `make proto` and commit the result"


def test_every_proto_has_committed_stubs() -> None:
    for proto in codegen.proto_files():
        stem = proto.stem
        for suffix in codegen.GENERATED_SUFFIXES:
            assert (codegen.API_DIR / f"{stem}{suffix}").exists(), f"{stem}{suffix} missing: run `make proto`"


def test_worker_services_are_importable() -> None:
    from ember.api import worker_pb2, worker_pb2_grpc

    worker = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert {m.name for m in worker.methods} == {
        "Load", "Unload", "Generate", "ListInstances", "Inventory", "Health", "MigrateOut", "MigrateIn"
    }
    assert worker.methods_by_name["Load"].server_streaming
    assert worker.methods_by_name["Generate"].server_streaming
    assert worker.methods_by_name["MigrateOut"].server_streaming
    assert worker.methods_by_name["MigrateIn"].client_streaming and worker.methods_by_name["MigrateIn"].server_streaming
    registry = worker_pb2.DESCRIPTOR.services_by_name["NodeRegistry"]
    assert {m.name for m in registry.methods} == {"RegisterNode", "Heartbeat"}
    assert worker_pb2.DESCRIPTOR.package == "ember.v1"
    assert hasattr(worker_pb2_grpc, "add_WorkerServicer_to_server")
    assert hasattr(worker_pb2_grpc, "NodeRegistryStub")


def test_codegen_reports_protoc_errors(tmp_path: Path, monkeypatch) -> None:
    bad_root = tmp_path / "protos"
    pkg = bad_root / "ember" / "api"
    pkg.mkdir(parents=True)
    (pkg / "broken.proto").write_text('syntax = "proto3";\nmessage X { int32 = 1; }\n')
    monkeypatch.setattr(codegen, "PROTO_ROOT", bad_root)
    monkeypatch.setattr(codegen, "PROTO_PACKAGE_DIR", pkg)
    try:
        codegen.generate(tmp_path / "out")
    except codegen.CodegenError as exc:
        assert "broken.proto" in str(exc)
    else:
        raise AssertionError("a broken .proto must fail codegen")
