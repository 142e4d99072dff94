"""`--deployments-file`: deployments declared in YAML or JSON, created when the controller starts.

The file is a list of deployments (or `{"deployments": [...]}`), each with the fields of
POST /v1/deployments. Applying it is idempotent: missing deployments are created, differing ones
updated to match, others left alone — so a Helm chart can pass the same file at every start.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ember.controller.errors import ConfigError
from ember.controller.models import DeploymentSpec


def read_deployments_file(path: Path) -> list[DeploymentSpec]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--deployments-file {path}: cannot read it: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        raise ConfigError(f"--deployments-file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if isinstance(data, dict) and "deployments" in data:
        data = data["deployments"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"--deployments-file {path} must hold a list of deployments (or 'deployments: [...]')")
    specs: list[DeploymentSpec] = []
    for i, item in enumerate(data):
        try:
            specs.append(DeploymentSpec.model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "entry"
            raise ConfigError(f"--deployments-file {path}: deployment #{i + 1}: {where}: {err['msg']}") from None
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"--deployments-file {path} names {', '.join(duplicates)} more than once")
    return specs
