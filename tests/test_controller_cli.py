"""`ember controller` refuses bad flags and unusable environments with a message, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def controller(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # `ember controller` requires an admin key before anything else; give it one so the flag at fault is named.
    env = {"EMBER_ADMIN_KEY": "controller-cli-test-admin-key", **(env if env is not None else os.environ)}
    return subprocess.run([sys.executable, "-m", "ember.cli.main", "controller", "--port", "0", "--grpc-port", "0",
                           *args], capture_output=True, text=True, timeout=120, env=env)


def test_bad_flags_are_named(tmp_path: Path) -> None:
    cases = [
        (["--state", "mysql://db"], "not a state store URL"),
        (["--state", "redis://127.0.0.1:1/0"], "cannot reach the Redis state store"),
        (["--policy", "fastest"], "--policy"),
        (["--tier-gbps", "gpu=3"], "--tier-gbps"),
        (["--node-timeout", "0.5"], "--node-timeout"),
        (["--migration-min-gain", "-1"], "--migration-min-gain must be a number of seconds >= 0"),
        (["--migration-min-gain", "nan"], "--migration-min-gain"),
        (["--deployments-file", str(tmp_path / "none.yaml")], "does not exist"),
    ]
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("- name: x\n  checkpoint: /tmp/y\n  max_instances: lots\n")
    cases.append((["--state", f"sqlite:///{tmp_path / 's.db'}", "--deployments-file", str(bad_file)],
                  "deployment #1: max_instances"))
    for args, expected in cases:
        result = controller(*args)
        stderr = " ".join(result.stderr.split())  # rich wraps long messages
        assert result.returncode == 1, (args, result.stderr)
        assert expected in stderr and "Traceback" not in stderr, (args, result.stderr)


def test_kubernetes_mode_without_a_cluster_says_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")
    env["HOME"] = str(tmp_path)
    result = controller("--kubernetes", "--state", f"sqlite:///{tmp_path / 's.db'}", env=env)
    assert result.returncode == 1 and "Kubernetes" in result.stderr and "Traceback" not in result.stderr, result.stderr
