"""The container images (docker/*.Dockerfile) and the command lines they and the chart run.

No Docker engine runs here, so the images are not built: the Dockerfiles are parsed
(dockerfile-parse) and checked for what the chart relies on (base image, non-root UID, the
`ember` entrypoint, the package folders copied). The command lines — each image's CMD and the
chart's container args — are checked against the real `ember` typer app: every subcommand and
flag they use must exist there, and take a value exactly when the command line gives it one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
CHART = ROOT / "helm" / "ember"

IMAGES = {
    "controller": {"file": "controller.Dockerfile", "base": "python:3.11-slim", "ports": {"8080", "50051"}},
    "worker": {"file": "worker.Dockerfile", "base": "nvidia/cuda:", "ports": {"50052", "9400"}},
}


def parse(image: str) -> DockerfileParser:
    return DockerfileParser(path=str(DOCKER / IMAGES[image]["file"]))


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    """Instructions after the last FROM: what the running image is made of."""
    structure = parser.structure
    last_from = max(i for i, insn in enumerate(structure) if insn["instruction"] == "FROM")
    return structure[last_from + 1:]


def instruction(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [insn["value"] for insn in stage if insn["instruction"] == name]


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


# ---- the Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("image", list(IMAGES))
def test_base_image(image: str) -> None:
    parser = parse(image)
    assert all(p.startswith(IMAGES[image]["base"]) for p in parser.parent_images), parser.parent_images
    if image == "worker":
        assert "-runtime-" in parser.baseimage, f"the worker runs on a CUDA runtime image, not {parser.baseimage}"


def test_controller_image_has_no_torch() -> None:
    runs = " ".join(instruction(parse("controller").structure, "RUN"))
    assert "pip install ." in runs
    assert "[worker]" not in runs and "torch" not in runs


def test_worker_image_installs_the_worker_extra_from_a_cuda_torch_index() -> None:
    parser = parse("worker")
    runs = " ".join(instruction(parser.structure, "RUN"))
    assert "'.[worker]'" in runs
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in runs
    args = dict(a.split("=", 1) for a in instruction(parser.structure, "ARG") if "=" in a)
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")


@pytest.mark.parametrize("image", list(IMAGES))
def test_runs_as_the_chart_non_root_uid(image: str) -> None:
    stage = final_stage(parse(image))
    users = instruction(stage, "USER")
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0")
    security = chart_values()["securityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"]), (
        "the chart's runAsUser/runAsGroup must be the user the image creates"
    )
    assert any(f"--uid {uid}" in run for run in instruction(stage, "RUN")), "the image must create that user"


@pytest.mark.parametrize("image", list(IMAGES))
def test_entrypoint_is_ember(image: str) -> None:
    stage = final_stage(parse(image))
    assert [json.loads(v) for v in instruction(stage, "ENTRYPOINT")] == [["ember"]]
    cmd = json.loads(parse(image).cmd)
    assert cmd[0] == image


@pytest.mark.parametrize("image", list(IMAGES))
def test_exposes_the_chart_ports(image: str) -> None:
    exposed = {p for value in instruction(final_stage(parse(image)), "EXPOSE") for p in value.split()}
    assert exposed == IMAGES[image]["ports"]
    values = chart_values()
    chart_ports = (
        {str(values["controller"]["httpPort"]), str(values["controller"]["grpcPort"])}
        if image == "controller"
        else {str(values["worker"]["port"]), str(values["worker"]["metricsPort"])}
    )
    assert exposed == chart_ports


@pytest.mark.parametrize("image", list(IMAGES))
def test_every_package_folder_is_copied(image: str) -> None:
    """pyproject maps each folder to an ember.* package; an image missing one fails at import."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = {v.split()[0].rstrip("/") for v in instruction(parse(image).structure, "COPY") if "--from" not in v}
    missing = sorted(set(package_dir.values()) - copied)
    assert not missing, f"{IMAGES[image]['file']} does not COPY {missing}"
    assert "pyproject.toml" in " ".join(instruction(parse(image).structure, "COPY"))


# ---- command lines against the real CLI ------------------------------------------------------------


def ember_cli():
    import typer

    from ember.cli.main import app

    return typer.main.get_command(app)


def check_command_line(argv: list[str], where: str) -> None:
    """argv (after the `ember` entrypoint) must parse against the real CLI: a known subcommand,
    known flags, and a value after exactly those flags that take one."""
    group = ember_cli()
    commands = getattr(group, "commands", {})
    assert argv[0] in commands, (
        f"{where}: `ember {argv[0]}` does not exist (the CLI has: {', '.join(sorted(commands)) or 'nothing'})"
    )
    command = commands[argv[0]]
    options = {}
    for param in command.params:
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            options[opt] = param
    i = 1
    while i < len(argv):
        token = argv[i]
        assert token.startswith("--"), f"{where}: unexpected positional argument {token!r} in {argv}"
        name, has_inline_value, _ = token.partition("=")
        assert name in options, (
            f"{where}: `ember {argv[0]}` has no option {name} (it has: {', '.join(sorted(options))})"
        )
        param = options[name]
        takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
        if takes_value and not has_inline_value:
            assert i + 1 < len(argv) and not argv[i + 1].startswith("--"), f"{where}: {name} needs a value"
            i += 2
        else:
            assert takes_value or not has_inline_value, f"{where}: {name} is a flag and takes no value"
            i += 1


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_cmd_parses_on_the_cli(image: str) -> None:
    check_command_line(json.loads(parse(image).cmd), f"{IMAGES[image]['file']} CMD")


CHART_VALUE_SETS = {
    "default": {},
    "cpu-only": {"worker": {"gpus": 0}, "controller": {"watchNodes": False}},
    "multi-gpu": {"worker": {"gpus": 8, "dramCacheGB": 0.5}},
    "hardened": {"controller": {
        "tls": {"enabled": True, "secretName": "ember-tls"},
        "checkpointRoots": [{"path": "/models", "volume": {"persistentVolumeClaim": {"claimName": "models"}}}],
        "allowedBuckets": ["models"],
        "limits": {"maxBodyBytes": 1048576, "maxTokens": 4096, "rateLimit": 0.5, "burst": 2, "maxStreamsPerKey": 2},
    }},
}


@pytest.fixture(scope="module")
def chart_command_lines() -> dict[str, list[str]]:
    helm = pytest.importorskip("helm_python")
    lines: dict[str, list[str]] = {}
    with helm.Chart.load(str(CHART)) as chart:
        for name, values in CHART_VALUE_SETS.items():
            for path, text in chart.render(values, name="ember", namespace="ember").items():
                if not path.endswith(".yaml"):
                    continue
                for obj in yaml.safe_load_all(text):
                    if obj and obj["kind"] in ("Deployment", "DaemonSet"):
                        for c in obj["spec"]["template"]["spec"]["containers"]:
                            lines[f"{name}: {obj['kind']}/{obj['metadata']['name']} {c['name']}"] = c["args"]
    assert len(lines) == 2 * len(CHART_VALUE_SETS)
    return lines


def test_chart_container_args_parse_on_the_cli(chart_command_lines: dict[str, list[str]]) -> None:
    for where, argv in chart_command_lines.items():
        check_command_line(argv, where)


def test_chart_uses_the_documented_flags(chart_command_lines: dict[str, list[str]]) -> None:
    """The deployment contract: flags the lead agreed on for `ember controller` / `ember worker`."""
    used = {argv[0]: set() for argv in chart_command_lines.values()}
    for argv in chart_command_lines.values():
        used[argv[0]] |= {t.split("=")[0] for t in argv if t.startswith("--")}
    assert used["controller"] == {"--host", "--port", "--grpc-port", "--state",
                                  "--deployments-file", "--kubernetes", "--admin-key-file",
                                  "--tls-cert", "--tls-key", "--checkpoint-root", "--allowed-bucket",
                                  "--max-body-bytes", "--max-tokens-cap", "--rate-limit", "--burst",
                                  "--max-streams-per-key"}
    assert used["worker"] == {"--controller", "--host", "--port", "--advertise-address", "--node-id", "--cache-dir",
                              "--disk-cache-gb", "--dram-cache-gb", "--device", "--metrics-port"}
