"""Shared fixtures. Append yours; keep expensive ones session-scoped."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on loopback right now (tiny race window; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload_checkpoint(checkpoint: Path, prefix: str = "m"):
    """Upload a checkpoint directory into a new bucket of the session's S3 server (s3_server
    points boto3 at it); returns its ember.worker.s3_source.S3Location (str() gives the URI)."""
    import uuid

    import boto3

    from ember.worker.s3_source import S3Location

    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for f in sorted(checkpoint.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return S3Location(bucket, prefix)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real moto S3 server on a free loopback port; yields its endpoint URL.

    Sets AWS_ENDPOINT_URL and dummy credentials/region in os.environ for the whole session, so
    boto3 clients in this process and in subprocesses started by tests talk to it. Buckets are
    shared across the session: use unique bucket names per test.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def demo_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model (random Llama + local tokenizer) as a Hugging Face directory."""
    from ember.ckpt_format.demo_model import build_demo_model

    path = tmp_path_factory.mktemp("demo-hf") / "tiny"
    build_demo_model(path, "tiny")
    return path


@pytest.fixture(scope="session")
def demo_checkpoint(demo_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model converted to the Ember format (read-only: copy it before corrupting it)."""
    from ember.ckpt_format import convert

    path = tmp_path_factory.mktemp("demo-ember") / "tiny.ember"
    convert(demo_hf_dir, path)
    return path


# ---- backend fixtures: a tiny random Llama whose tokenizer knows multi-byte text and chat ----

BACKEND_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ember serves large language models as functions that start from zero.",
    "Zürich, café, naïve, 東京, Ελληνικά and emoji like 🙂 or 🚀 take several bytes.",
    "user: hello\nassistant: hi there, how can I help?",
]
BACKEND_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def build_backend_tokenizer(chat_template: str | None = BACKEND_CHAT_TEMPLATE):
    """Byte-level BPE trained here (nothing downloaded): every byte is a token, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(BACKEND_CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def backend_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny fp32 Llama (2 layers, GQA) with init std 0.2: argmax margins (>1e-2) dwarf batching noise (~1e-5)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("backend-hf") / "tiny-llama"
    tokenizer = build_backend_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def backend_checkpoint(backend_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """backend_hf_dir in the Ember format (read-only)."""
    from ember.ckpt_format import convert

    path = tmp_path_factory.mktemp("backend-ember") / "tiny-llama.ember"
    convert(backend_hf_dir, path)
    return path


@pytest.fixture(scope="session")
def backend_tokenizer():
    """The tokenizer of backend_hf_dir, built in memory."""
    return build_backend_tokenizer()


class ManagedProcess:
    """A subprocess of ours whose output goes to a log file (shown when a test fails) and that
    stops politely: SIGTERM, then SIGKILL after `stop_timeout_s`."""

    log_path: Path
    proc: subprocess.Popen | None
    stop_timeout_s = 30.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


# ---- worker processes: real `ember worker` subprocesses on free loopback ports ----


class WorkerProcess(ManagedProcess):
    """One `python -m ember.cli.main worker …` subprocess; output goes to a log file shown on failure."""

    def __init__(self, cache_dir: Path, log_dir: Path, args: list[str], env: dict[str, str]) -> None:
        self.cache_dir = cache_dir
        self.args = args
        self.env = env
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"worker-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        import sys

        cmd = [sys.executable, "-m", "ember.cli.main", "worker", "--cache-dir", str(self.cache_dir),
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_healthy(timeout)
        return self

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.env.get("EMBER_WORKER_TOKEN")
        return (("authorization", f"Bearer {token}"),) if token else ()

    def stub(self):
        import grpc

        from ember.api import worker_pb2_grpc

        return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(self.address))

    def wait_healthy(self, timeout: float) -> None:
        import grpc

        from ember.api import worker_pb2

        deadline = time.monotonic() + timeout
        stub = self.stub()
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                stub.Health(worker_pb2.HealthRequest(), timeout=2, metadata=self.metadata())
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not healthy after {timeout} s:\n{self.log()}") from None
                time.sleep(0.2)



@pytest.fixture(scope="session")
def launch_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: launch_worker(cache_dir=None, args=[...], env={...}) starts a worker and waits for Health.

    Extra env entries are added to this process's environment (so AWS_* from s3_server apply).
    Workers still running at the end of the session are stopped.
    """
    started: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("worker-logs")

    def launch(cache_dir: Path | None = None, args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 120.0) -> WorkerProcess:
        cache = cache_dir or tmp_path_factory.mktemp("worker-cache")
        worker = WorkerProcess(cache, log_dir, list(args or []), {**os.environ, **(env or {})})
        started.append(worker)
        return worker.start(timeout)

    yield launch
    for worker in started:
        worker.stop()


# ---- loader fixtures: small checkpoints with many chunks, so multi-threaded paths get exercised ----


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """Factory: make_checkpoint(tensors, partitions=1, chunk_bytes=16 KiB, name=..., aliases=None) -> dir.

    Writes `tensors` (a dict of torch tensors) as a torch state-dict file and converts it with the
    real writer. Small checksum chunks give many chunks per tensor without big files.
    """
    import torch

    from ember.ckpt_format.writer import convert

    counter = iter(range(10**6))

    def make(tensors, partitions: int = 1, chunk_bytes: int = 16 << 10, name: str | None = None,
             root: Path | None = None) -> Path:
        n = next(counter)
        base = root or tmp_path
        src = base / f"src-{n}.pt"
        torch.save(tensors, src)
        dst = base / (name or f"ckpt-{n}")
        convert(src, dst, partitions, chunk_bytes=chunk_bytes)
        src.unlink()
        return dst

    return make


@pytest.fixture
def make_sparse_checkpoint(tmp_path: Path):
    """Factory: a valid checkpoint whose one uint8 tensor is `nbytes` (rounded up to GiB) of file
    holes — no disk space used, for memory checks that must fire before any byte is read."""
    import json

    def make(nbytes: int) -> Path:
        chunk = 1 << 30
        nbytes = -(-nbytes // chunk) * chunk
        root = tmp_path / f"sparse-{nbytes}"
        root.mkdir()
        with open(root / "part-00000.bin", "wb") as f:
            f.truncate(nbytes)
        index = {
            "format": "ember-checkpoint",
            "version": 1,
            "alignment": 4096,
            "chunk_bytes": chunk,
            "checksum": "xxh3-64",
            "config": None,
            "generation_config": None,
            "files": [],
            "partitions": [{"file": "part-00000.bin", "size": nbytes, "checksums": ["0" * 16] * (nbytes // chunk)}],
            "tensors": {"huge": {"dtype": "uint8", "shape": [nbytes], "partition": 0, "offset": 0, "nbytes": nbytes}},
            "aliases": {},
        }
        (root / "ember.json").write_text(json.dumps(index))
        return root

    return make


# ---- controller fixtures: a real redis-server for the state store contract ----


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (no persistence); yields its redis:// URL.

    Tests share it: each one should use its own database number or flush what it uses.
    """
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: run `make services` (apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    log_path = workdir / "redis.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--databases", "64"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- controller processes: real `ember controller` subprocesses on free loopback ports ----


class ControllerProcess(ManagedProcess):
    """One `python -m ember.cli.main controller …` subprocess; restartable on the same ports and store."""

    def __init__(self, state: str, log_dir: Path, args: list[str], env: dict[str, str]) -> None:
        self.state = state
        self.args = args
        self.env = env
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_dir / f"controller-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ControllerProcess:
        import sys
        import urllib.request

        cmd = [sys.executable, "-m", "ember.cli.main", "controller", "--host", "127.0.0.1",
               "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--state", self.state, *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"controller not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.1)



# `ember controller` requires API keys: the controllers tests launch share this admin key, and
# EMBER_API_KEY carries it to the clients (EmberClient, the CLI) while launch_controller is in use.
TEST_ADMIN_KEY = "ember-test-admin-key-0123456789abcdef"
AUTH_HEADERS = {"authorization": f"Bearer {TEST_ADMIN_KEY}"}


def authed_channel(address: str):
    """A gRPC channel to a launched controller that sends TEST_ADMIN_KEY on every call."""
    import grpc

    class WithKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
        def _add(self, details):
            metadata = [*(details.metadata or ()), ("authorization", f"Bearer {TEST_ADMIN_KEY}")]
            return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._add(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self._add(details), request)

    return grpc.intercept_channel(grpc.insecure_channel(address), WithKey())


class _Details:
    """grpc.ClientCallDetails with other metadata (the class grpc passes is not always a namedtuple)."""

    def __init__(self, details, metadata) -> None:
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


@pytest.fixture(scope="session")
def launch_controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: launch_controller(state=None, args=[...], env={...}) starts a controller and waits for /readyz.

    state defaults to a fresh SQLite file. Controllers still running at the end are stopped. They
    take TEST_ADMIN_KEY as admin key and may read checkpoints under pytest's temporary directory.
    """
    started: list[ControllerProcess] = []
    log_dir = tmp_path_factory.mktemp("controller-logs")
    patch = pytest.MonkeyPatch()
    patch.setenv("EMBER_API_KEY", TEST_ADMIN_KEY)

    def launch(state: str | None = None, args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 60.0) -> ControllerProcess:
        state = state or f"sqlite:///{tmp_path_factory.mktemp('controller-state') / 'state.db'}"
        args = ["--checkpoint-root", str(tmp_path_factory.getbasetemp()), *(args or [])]
        controller = ControllerProcess(state, log_dir, args,
                                       {"EMBER_ADMIN_KEY": TEST_ADMIN_KEY, **os.environ, **(env or {})})
        started.append(controller)
        return controller.start(timeout)

    yield launch
    for controller in started:
        controller.stop()
    patch.undo()


# ---- migration fixtures: a tiny Llama with a long context and no EOS, so greedy runs last exactly max_tokens ----


def build_migration_tokenizer():
    """The backend tokenizer without an end-of-sequence token: a stream only ends at max_tokens."""
    from transformers import PreTrainedTokenizerFast

    base = build_backend_tokenizer(chat_template=None)
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def migration_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny fp32 Llama (2 layers, GQA, init std 0.2 for wide argmax margins), no EOS, 8192 positions
    (RoPE: no parameters) so a stream can run long enough to be migrated through the controller."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("migration-hf") / "tiny-llama-8k"
    tokenizer = build_migration_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def migration_checkpoint(migration_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """migration_hf_dir in the Ember format (read-only)."""
    from ember.ckpt_format import convert

    path = tmp_path_factory.mktemp("migration-ember") / "tiny-llama-8k.ember"
    convert(migration_hf_dir, path)
    return path


# ---- `ember serve` processes: controller + local workers, as a user runs them ----


class ServeProcess(ManagedProcess):
    """One `python -m ember.cli.main serve --port 0 --grpc-port 0 …` subprocess, ready once its banner is out.

    Output goes to a log file (a pipe nobody reads would fill up and stall the process)."""

    def __init__(self, cache_dir: Path, log_path: Path, args: list[str], env: dict[str, str]) -> None:
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.args = args
        self.env = env
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ServeProcess:
        import re
        import sys

        cmd = [sys.executable, "-m", "ember.cli.main", "serve", "--port", "0", "--grpc-port", "0",
               "--cache-dir", str(self.cache_dir), *self.args]
        if "--checkpoint-root" not in self.args:  # checkpoints built by fixtures live under pytest's temp dir
            cmd += ["--checkpoint-root", str(self.cache_dir.parent)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            found = re.search(r"Ember is serving on (http://\S+)", text)
            if found and "Press Ctrl-C" in text:
                self.url = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ember serve not ready after {timeout} s:\n{text}")
            time.sleep(0.2)

    stop_timeout_s = 60.0  # it stops its workers first


@pytest.fixture(scope="session")
def launch_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: launch_serve(args=["--workers", "1"], env={...}) starts `ember serve` on free ports and
    waits for its banner (workers registered). Servers still running at the end are stopped."""
    started: list[ServeProcess] = []

    def launch(args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 180.0) -> ServeProcess:
        cache = tmp_path_factory.mktemp("serve-cache")
        serve = ServeProcess(cache, cache / "serve.log", list(args or []), {**os.environ, **(env or {})})
        started.append(serve)
        return serve.start(timeout)

    yield launch
    for serve in started:
        serve.stop()
