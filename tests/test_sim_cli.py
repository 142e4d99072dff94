"""`ember sim`: the example config, config errors, and a small run writing JSON, markdown and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ember.cli.main import app
from ember.sim.catalog import build_catalog
from ember.sim.config import POLICY_NAMES, SimConfig, config_from_dict, load_config
from ember.sim.errors import SimConfigError
from ember.sim.example import EXAMPLE_CONFIG
from ember.sim.runner import workloads

runner = CliRunner()


def test_the_example_config_is_the_defaults() -> None:
    assert config_from_dict(yaml.safe_load(EXAMPLE_CONFIG)) == SimConfig().validate()


@pytest.mark.parametrize(("data", "message"), [
    ({"cluster": {"nodez": 3}}, r"unknown setting 'cluster.nodez'; valid here: nodes"),
    ({"cluster": {"nodes": "many"}}, r"cluster.nodes must be an integer"),
    ({"cluster": {"nodes": 0}}, r"cluster.nodes must be >= 1"),
    ({"policies": ["ember", "openwhisk"]}, r"unknown policy 'openwhisk'"),
    ({"deployment": {"min_instances": 5, "max_instances": 2}}, r"min_instances must be in \[0, max_instances=2\]"),
    ({"workload": {"arrivals": "fractal"}}, r"workload.arrivals must be one of"),
    ({"workload": {"output_tokens": {"dist": "zipf", "min": 10, "max": 5}}}, r"output_tokens: need 1 <= min <= max"),
    ({"models": {"mix": {"405b": 1.0}}}, r"unknown model shape '405b'"),
    ({"loads": [2, -1]}, r"loads are request rates"),
    ([1, 2], r"top level must be a mapping"),
])
def test_bad_configs_name_the_setting(data, message: str) -> None:
    with pytest.raises(SimConfigError, match=message):
        config_from_dict(data)


def test_models_that_cannot_fit_are_refused_with_a_way_out() -> None:
    config = config_from_dict({"cluster": {"gpus_per_node": 2}, "models": {"mix": {"70b": 1.0}}})
    with pytest.raises(SimConfigError, match="needs 3 GPUs") as info:
        build_catalog(config)
    assert "gpus_per_node" in info.value.hint
    config = config_from_dict({"cluster": {"dram_gb": 100.0}, "models": {"mix": {"70b": 1.0}, "count": 2}})
    with pytest.raises(SimConfigError, match="pinned DRAM pool"):
        workloads(config)
    config.policies = ["ember"]
    assert len(workloads(config)[0]) == 2


def test_example_config_command_prints_yaml() -> None:
    result = runner.invoke(app, ["sim", "--example-config"])
    assert result.exit_code == 0
    assert result.stdout == EXAMPLE_CONFIG


def words(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines


def test_missing_config_is_a_friendly_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sim"])
    assert result.exit_code == 1 and "needs --config" in result.output and "--example-config" in result.output
    result = runner.invoke(app, ["sim", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "does not exist" in words(result.output) and "Traceback" not in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {nodes: [}\n")
    result = runner.invoke(app, ["sim", "--config", str(bad)])
    assert result.exit_code == 1 and "not valid YAML" in words(result.output)


def test_a_small_simulation_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(yaml.safe_dump({"seed": 2, "cluster": {"nodes": 3}, "models": {"count": 8},
                                      "workload": {"duration_s": 600.0}}))
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["sim", "-c", str(config), "--loads", "1,3", "--json", str(out),
                                 "--markdown", str(tmp_path / "table.md"), "--plots", str(tmp_path / "img")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["policies"]) == set(POLICY_NAMES)
    for summary in data["policies"].values():
        for key in ("ttft_p50", "ttft_p99", "e2e_p99", "cold_starts", "rejected", "gpu_seconds"):
            assert key in summary
        assert summary["rate_rps"] == 1.0
    assert [s["rate_rps"] for s in data["sweep"]] == [1.0, 3.0]
    assert "| `ember` |" in (tmp_path / "table.md").read_text()
    for name in ("sim_ttft_cdf.png", "sim_ttft_vs_load.png"):
        assert (tmp_path / "img" / name).read_bytes()[:4] == b"\x89PNG"
    assert "p99 TTFT relative to ember" in result.output


def test_a_csv_trace_next_to_the_config_drives_the_run(tmp_path: Path) -> None:
    rows = ["timestamp,model,input_tokens,output_tokens"]
    rows += [f"{t * 7.5},{'chat' if t % 3 else 'code'},{50 + t},{20 + t}" for t in range(40)]
    (tmp_path / "trace.csv").write_text("\n".join(rows) + "\n")
    config_path = tmp_path / "sim.yaml"
    config_path.write_text(yaml.safe_dump({"cluster": {"nodes": 2}, "policies": ["ember", "kserve"],
                                           "models": {"entries": [{"name": "code", "shape": "34b"}]},
                                           "workload": {"trace": "trace.csv"}}))
    config = load_config(config_path)
    catalog, by_rate = workloads(config)
    assert {m.name: m.shape for m in catalog}["code"] == "34b"
    (workload,) = by_rate.values()
    assert len(workload) == 40
    result = runner.invoke(app, ["sim", "-c", str(config_path), "--json", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["policies"]["ember"]["requests"] == 40
