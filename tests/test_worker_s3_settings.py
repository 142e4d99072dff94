"""The worker's S3 bounds: `ember worker --s3-*` flags (or EMBER_S3_* variables) reach the boto3
client, their defaults are S3Settings', and bad values are refused with the flag named. What the
bounds do against a silent store is tested in tests/faults/test_fault_s3_timeout.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ember.worker.config import WorkerConfig, WorkerConfigError
from ember.worker.s3_source import S3Settings, make_client


def worker_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ember.cli.main", "worker", "--cache-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_the_client_is_bounded_by_the_settings(s3_server: str) -> None:
    config = make_client(4, S3Settings(connect_timeout_s=1.5, read_timeout_s=7.0, max_attempts=4)).meta.config
    assert (config.connect_timeout, config.read_timeout, config.max_pool_connections) == (1.5, 7.0, 4)
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}  # the first try included
    default = make_client().meta.config  # never botocore's 60 s
    assert (default.connect_timeout, default.read_timeout) == (S3Settings.connect_timeout_s, S3Settings.read_timeout_s)


def test_cli_defaults_are_the_settings_defaults() -> None:
    import typer

    from ember.cli.main import app

    params = {p.name: p for p in typer.main.get_command(app).commands["worker"].params}
    assert params["s3_connect_timeout"].default == S3Settings.connect_timeout_s
    assert params["s3_read_timeout"].default == S3Settings.read_timeout_s
    assert params["s3_max_attempts"].default == S3Settings.max_attempts
    assert params["s3_read_timeout"].envvar == "EMBER_S3_READ_TIMEOUT"
    assert WorkerConfig(cache_dir=Path("x")).s3_settings() == S3Settings()


def test_config_validation_names_the_flag() -> None:
    for kwargs, flag in (({"s3_connect_timeout_s": 0}, "--s3-connect-timeout"),
                         ({"s3_read_timeout_s": -1}, "--s3-read-timeout"),
                         ({"s3_read_timeout_s": float("nan")}, "--s3-read-timeout"),
                         ({"s3_max_attempts": 0}, "--s3-max-attempts")):
        config = WorkerConfig(cache_dir=Path("x"), **kwargs)
        try:
            config.validate()
        except WorkerConfigError as exc:
            assert flag in str(exc), exc
        else:
            raise AssertionError(f"{kwargs} was accepted")


def test_cli_refuses_bad_values_from_flags_and_environment(tmp_path: Path) -> None:
    for args, env, needle in (
        (["--s3-read-timeout", "0"], None, "--s3-read-timeout must be > 0"),
        ([], {"EMBER_S3_CONNECT_TIMEOUT": "-2"}, "--s3-connect-timeout must be > 0"),
        ([], {"EMBER_S3_MAX_ATTEMPTS": "0"}, "--s3-max-attempts must be >= 1"),
        ([], {"EMBER_S3_READ_TIMEOUT": "soon"}, "--s3-read-timeout"),
    ):
        out = worker_cli(tmp_path, *args, env=env)
        stderr = " ".join(out.stderr.split())  # rich wraps long messages
        assert out.returncode != 0, (args, env)
        assert needle in stderr and "Traceback" not in stderr, (args, env, out.stderr)
