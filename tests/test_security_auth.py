"""API keys on HTTP (in-process app on uvicorn, fake workers) and on gRPC, the CLI and TLS (real
`ember controller` processes): scopes, deployment limits, revocation, refusal to start unprotected."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import TEST_ADMIN_KEY
from controller_fakes import FakeWorkers, close, http_server, make_controller, node_status, run

from ember.api import controller_pb2 as cpb
from ember.api import controller_pb2_grpc as cpb_grpc

ADMIN = "admin-key-for-tests-0123456789"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def locked_controller(monkeypatch: pytest.MonkeyPatch, **config):
    monkeypatch.setenv("EMBER_ADMIN_KEY", ADMIN)
    ctl = await make_controller(workers=FakeWorkers(), auth=True, **config)
    await ctl.node_report(node_status("n1"), register=True)
    return ctl


def test_http_routes_need_the_right_scope_and_deployment(monkeypatch: pytest.MonkeyPatch,
                                                         demo_checkpoint: Path) -> None:
    async def body() -> None:
        ctl = await locked_controller(monkeypatch)
        try:
            async with http_server(ctl) as url, httpx.AsyncClient(base_url=url) as c:
                assert (await c.get("/healthz")).status_code == 200
                assert (await c.get("/readyz")).status_code == 200
                for method, path in (("GET", "/v1/deployments"), ("GET", "/v1/nodes"), ("GET", "/v1/keys"),
                                     ("POST", "/v1/completions"), ("POST", "/functions/demo/invoke"),
                                     ("GET", "/v1/status"), ("GET", "/v1/migrations")):
                    r = await c.request(method, path, json={})
                    assert r.status_code == 401, (path, r.text)
                    assert r.json()["error"]["code"] == "invalid_api_key"
                    assert r.headers["www-authenticate"] == "Bearer"
                r = await c.get("/v1/deployments", headers=bearer("ember_abc_wrong"))
                assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
                r = await c.post("/v1/deployments", headers=bearer(ADMIN),
                                 json={"name": "demo", "checkpoint": str(demo_checkpoint)})
                assert r.status_code == 201, r.text
                await c.post("/v1/deployments", headers=bearer(ADMIN),
                             json={"name": "other", "checkpoint": str(demo_checkpoint)})

                r = await c.post("/v1/keys", headers=bearer(ADMIN),
                                 json={"name": "app", "scope": "invoke", "deployments": ["demo"]})
                assert r.status_code == 201, r.text
                app_key = r.json()["key"]
                assert app_key.startswith("ember_") and r.json()["deployments"] == ["demo"]
                r = await c.post("/v1/keys", headers=bearer(ADMIN), json={"name": "app"})
                assert r.status_code == 409
                listed = (await c.get("/v1/keys", headers=bearer(ADMIN))).json()["data"]
                assert [k["name"] for k in listed] == ["app"] and "sha256" not in listed[0] and "key" not in listed[0]
                stored = await ctl.store.list_api_keys()
                assert app_key not in stored[0].model_dump_json()  # only the hash is kept

                # An invoke key: sees and may call its deployment, nothing else.
                models = (await c.get("/v1/models", headers=bearer(app_key))).json()["data"]
                assert [m["id"] for m in models] == ["demo"]
                assert (await c.get("/v1/models/other", headers=bearer(app_key))).status_code == 403
                r = await c.post("/functions/demo/invoke", headers=bearer(app_key), json={"prompt": "hi"})
                assert r.status_code == 200, r.text
                r = await c.post("/v1/completions", headers=bearer(app_key), json={"model": "demo", "prompt": "hi"})
                assert r.status_code == 200, r.text
                for method, path, payload in (
                    ("POST", "/functions/other/invoke", {"prompt": "hi"}),
                    ("POST", "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]}),
                    ("POST", "/v1/deployments", {"name": "x", "checkpoint": str(demo_checkpoint)}),
                    ("DELETE", "/v1/deployments/demo", None),
                    ("POST", "/v1/keys", {"name": "mine", "scope": "admin"}),
                    ("POST", "/v1/nodes/n1/drain", {}),
                ):
                    r = await c.request(method, path, headers=bearer(app_key), json=payload)
                    assert r.status_code == 403, (path, r.text)
                    assert r.json()["error"]["type"] == "permission_error"

                # Revoked: refused at once on this controller.
                r = await c.delete("/v1/keys/app", headers=bearer(ADMIN))
                assert r.status_code == 200 and r.json()["revoked"] is True
                r = await c.post("/functions/demo/invoke", headers=bearer(app_key), json={"prompt": "hi"})
                assert r.status_code == 401
                assert (await c.delete("/v1/keys/app", headers=bearer(ADMIN))).status_code == 404
        finally:
            await close(ctl)

    run(body)


def test_an_admin_key_that_is_missing_or_short_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    from ember.controller.config import ControllerConfig
    from ember.controller.errors import ConfigError

    monkeypatch.delenv("EMBER_ADMIN_KEY", raising=False)
    with pytest.raises(ConfigError, match="no admin key") as info:
        ControllerConfig(auth=True).validate()
    assert "EMBER_ADMIN_KEY" in info.value.hint
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        ControllerConfig(auth=True, admin_key_file=short).validate()
    good = tmp_path / "good"
    good.write_text(ADMIN + "\n")
    config = ControllerConfig(auth=True, admin_key_file=good)
    config.validate()
    assert config.admin_key() == ADMIN


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_ember_controller_and_exposed_serve_refuse_to_start_without_keys() -> None:
    out = _cli("controller", "--port", "0", "--grpc-port", "0", "--state", "sqlite:///:memory:",
               env={"EMBER_ADMIN_KEY": ""})
    assert out.returncode != 0 and "no admin key" in out.stderr and "EMBER_ADMIN_KEY" in out.stderr
    out = _cli("serve", "--host", "0.0.0.0", "--workers", "0", "--port", "0", "--grpc-port", "0")
    assert out.returncode != 0 and "without API keys" in out.stderr and "--auth" in out.stderr
    out = _cli("serve", "--auth", "--workers", "0", "--port", "0", "--grpc-port", "0", env={"EMBER_ADMIN_KEY": ""})
    assert out.returncode != 0 and "no admin key" in out.stderr


def test_cli_keys_and_grpc_enforce_the_same_scopes(launch_controller, demo_checkpoint: Path) -> None:
    controller = launch_controller()
    url = ["--url", controller.url]
    out = _cli("deploy", "demo", "--checkpoint", str(demo_checkpoint), *url)
    assert out.returncode == 0, out.stderr
    out = _cli("keys", "create", "app", "--scope", "invoke", "--deployments", "demo", *url)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("ember_") and "\n" not in key and "shown only now" in out.stderr
    out = _cli("keys", "list", *url)
    assert out.returncode == 0 and "app" in out.stdout and key not in out.stdout
    out = _cli("deploy", "x", "--checkpoint", str(demo_checkpoint), *url, env={"EMBER_API_KEY": key})
    assert out.returncode != 0 and "admin key" in out.stderr
    out = _cli("list", *url, env={"EMBER_API_KEY": ""})
    assert out.returncode != 0 and "API key" in out.stderr

    with grpc.insecure_channel(controller.grpc_address) as channel:
        stub = cpb_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.List(cpb.ListRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert [d.name for d in stub.List(cpb.ListRequest(), timeout=10,
                                          metadata=(("authorization", f"Bearer {TEST_ADMIN_KEY}"),)).deployments] \
            == ["demo"]
        with pytest.raises(grpc.RpcError) as info:
            stub.Deploy(cpb.DeployRequest(name="y", checkpoint=str(demo_checkpoint)), timeout=10,
                        metadata=(("authorization", f"Bearer {key}"),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Invoke(cpb.InvokeRequest(deployment="other", prompt="hi"), timeout=10,
                             metadata=(("authorization", f"Bearer {key}"),)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "may not call 'other'" in info.value.details()

    out = _cli("keys", "revoke", "app", *url)
    assert out.returncode == 0 and "revoked" in out.stdout


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_on_http_and_grpc(tmp_path: Path) -> None:
    import asyncio
    import os

    from ember.controller.config import ControllerConfig
    from ember.controller.server import serve

    cert, key = self_signed(tmp_path)
    os.environ["EMBER_ADMIN_KEY"] = ADMIN
    try:
        config = ControllerConfig(port=0, grpc_port=0, state=f"sqlite:///{tmp_path / 's.db'}", auth=True,
                                  tls_cert=cert, tls_key=key)

        async def scenario() -> None:
            stop = asyncio.Event()
            where: asyncio.Future = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(serve(config, stop=stop, on_listening=where.set_result))
            listening = await asyncio.wait_for(where, 30)
            try:
                assert listening.http_url.startswith("https://")
                async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as c:
                    r = await c.get(f"{listening.http_url}/v1/deployments", headers=bearer(ADMIN))
                    assert r.status_code == 200 and r.json()["data"] == []
                async with httpx.AsyncClient() as c:  # the system CAs do not trust it
                    with pytest.raises(httpx.ConnectError):
                        await c.get(f"{listening.http_url}/healthz")
                async with httpx.AsyncClient(verify=False) as c:  # plain HTTP is not served
                    with pytest.raises(httpx.HTTPError):
                        await c.get(listening.http_url.replace("https", "http") + "/healthz")
                creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
                async with grpc.aio.secure_channel(listening.grpc_address, creds) as channel:
                    reply = await cpb_grpc.ControllerStub(channel).List(
                        cpb.ListRequest(), timeout=10, metadata=(("authorization", f"Bearer {ADMIN}"),))
                    assert list(reply.deployments) == []
                async with grpc.aio.insecure_channel(listening.grpc_address) as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await cpb_grpc.ControllerStub(channel).List(cpb.ListRequest(), timeout=5)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

        asyncio.run(scenario())
    finally:
        del os.environ["EMBER_ADMIN_KEY"]


def test_serve_with_auth_requires_keys_and_locks_its_workers(launch_serve) -> None:
    from ember.api import worker_pb2 as wpb
    from ember.api import worker_pb2_grpc as wpb_grpc

    serve = launch_serve(args=["--auth", "--workers", "1"], env={"EMBER_ADMIN_KEY": ADMIN})
    assert "API keys are off" not in serve.log()
    with httpx.Client(base_url=serve.url, timeout=30) as c:
        assert c.get("/v1/nodes").status_code == 401
        nodes = c.get("/v1/nodes", headers=bearer(ADMIN)).json()["data"]
        assert [n["state"] for n in nodes] == ["up"]
    # The local worker takes calls from the controller only (a generated worker token).
    with grpc.insecure_channel(nodes[0]["address"]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            wpb_grpc.WorkerStub(channel).Unload(wpb.UnloadRequest(instance_id="x"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_serve_without_auth_says_so(launch_serve) -> None:
    serve = launch_serve(args=["--workers", "0"])
    assert "API keys are off" in serve.log()
    with httpx.Client(base_url=serve.url, timeout=30) as c:
        assert c.get("/v1/nodes").status_code == 200
