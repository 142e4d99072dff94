"""The simulator end to end: determinism, conservation, the load-time model, and each policy's mechanics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ember.controller.scheduler import ModelInfo
from ember.sim.catalog import model_spec
from ember.sim.config import POLICY_NAMES, config_from_dict
from ember.sim.engine import COMPLETED, PENDING, REJECTED, Simulation, load_seconds
from ember.sim.profiles import make_profile
from ember.sim.runner import run_sweep
from ember.sim.workload import Workload

SMALL_RUN = {
    "seed": 3,
    "cluster": {"nodes": 4},
    "models": {"count": 12},
    "workload": {"duration_s": 900.0, "rate_rps": 3.0},
}


def hand_workload(rows: list[tuple[float, int, int, int]], names: list[str]) -> Workload:
    times, models, tin, tout = (np.array(col) for col in zip(*rows))
    return Workload(times.astype(float), models.astype(np.int32), tin.astype(np.int64), tout.astype(np.int64),
                    names, "hand-written")


def build(policy: str, overrides: dict, rows, models: list[tuple[str, str]]) -> Simulation:
    config = config_from_dict(overrides)
    catalog = [model_spec(name, shape, config) for name, shape in models]
    workload = hand_workload(rows, [name for name, _ in models])
    return Simulation(config, make_profile(policy, config), catalog, workload)


def simulate(policy: str, overrides: dict, rows, models: list[tuple[str, str]]) -> Simulation:
    return build(policy, overrides, rows, models).run()


def test_the_same_seed_gives_the_same_result_and_another_seed_does_not() -> None:
    first = run_sweep(config_from_dict(SMALL_RUN)).to_json()
    second = run_sweep(config_from_dict(SMALL_RUN)).to_json()
    strip = lambda d: {p: {k: v for k, v in s.items() if k != "wall_s"} for p, s in d["policies"].items()}  # noqa: E731
    assert strip(first) == strip(second)
    other = run_sweep(config_from_dict({**SMALL_RUN, "seed": 4})).to_json()
    assert strip(other) != strip(first)


SUBPROCESS = """
import json, sys
from ember.sim.config import config_from_dict
from ember.sim.runner import run_sweep
data = run_sweep(config_from_dict(json.loads(sys.argv[1]))).to_json()
print(json.dumps({p: {k: v for k, v in s.items() if k != "wall_s"} for p, s in data["policies"].items()}))
"""


def test_results_do_not_depend_on_the_process_string_hashing() -> None:
    """Sets of node ids iterate in hash order; the simulation must not let that leak into results."""
    config = {**SMALL_RUN, "cluster": {"nodes": 20, "prestaged_disk_copies": 3}, "policies": ["ember", "rayserve"]}
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", SUBPROCESS, json.dumps(config)], env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        outputs.append(json.loads(proc.stdout))
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_request_ends_completed_or_rejected(policy: str) -> None:
    # A small queue and a short timeout force both kinds of rejection next to completions.
    overrides = {**SMALL_RUN, "policies": [policy],
                 "deployment": {"queue_limit": 5, "request_timeout_s": 20.0, "max_instances": 2}}
    sweep = run_sweep(config_from_dict(overrides))
    summary = sweep.primary[policy].summary
    assert summary["completed"] + summary["rejected"] == summary["requests"] > 0
    assert summary["rejected"] == sum(summary["rejected_by_reason"].values())
    assert summary["completed"] > 0
    assert summary["rejected_by_reason"]["queue_full"] > 0
    if policy == "kserve":  # its cold starts (download, then a slow load) outlast the 20 s timeout
        assert summary["rejected_by_reason"]["timeout"] > 0


def test_conservation_holds_request_by_request() -> None:
    config = config_from_dict({**SMALL_RUN, "deployment": {"queue_limit": 3, "request_timeout_s": 15.0}})
    from ember.sim.runner import workloads

    catalog, by_rate = workloads(config)
    workload = by_rate[config.workload.rate_rps]
    sim = Simulation(config, make_profile("ember", config), catalog, workload).run()
    assert not np.any(sim.status == PENDING)
    done = sim.status == COMPLETED
    assert np.all(np.isfinite(sim.ttft[done])) and np.all(np.isnan(sim.ttft[sim.status == REJECTED]))
    assert np.all(sim.e2e[done] >= sim.ttft[done])
    assert all(not d.queued_live for d in sim.deployments)
    # Nothing is left running or loading: every instance idled out and gave its GPUs back.
    assert all(n.gpus_free == n.gpus_total and not n.instances for n in sim.nodes.values())


ONE_NODE = {"cluster": {"nodes": 1, "bandwidth_jitter": 0.0, "prestaged_disk_copies": 1}}


@pytest.mark.parametrize(("policy", "tier"), [("ember", "disk"), ("rayserve", "disk"), ("kserve", "s3")])
def test_a_cold_start_takes_size_over_bandwidth_plus_init_as_the_scheduler_estimates(policy: str, tier: str) -> None:
    rows = [(10.0, 0, 100, 50)]
    sim = build(policy, ONE_NODE, rows, [("m", "13b")])
    spec = sim.deployments[0].spec
    gbps = make_profile(policy, sim.config).tier_gbps(sim.config.cluster)[tier]
    # What the controller's scheduler expects, from the view the simulated heartbeats built.
    model = ModelInfo(uri=spec.uri, size_bytes=spec.size_bytes, init_s=spec.init_s)
    estimate = sim.scheduler.time_to_ready(sim.cluster, sim.cluster.nodes["node-000"], model, now=0.0)
    assert estimate.tier == tier
    assert estimate.total_s == pytest.approx(load_seconds(spec, gbps)) == pytest.approx(
        spec.size_bytes / (gbps * 1e9) + spec.init_s)

    sim.run()
    assert sim.counters.cold_starts[tier] == 1
    prefill = 100 * spec.prefill_s_per_token
    assert sim.ttft[0] == pytest.approx(load_seconds(spec, gbps) + prefill)
    assert sim.e2e[0] == pytest.approx(sim.ttft[0] + 50 * spec.decode_s_per_token)


def test_loads_fill_the_tiers_and_the_next_cold_start_reads_dram() -> None:
    rows = [(0.0, 0, 10, 10), (200.0, 0, 10, 10)]  # keep-alive 60 s: the second request is a cold start
    sim = simulate("ember", ONE_NODE, rows, [("m", "7b")])
    assert sim.counters.cold_starts == {"dram": 1, "disk": 1, "s3": 0}
    spec = sim.deployments[0].spec
    dram_gbps = sim.nodes["node-000"].gbps["dram"]
    assert sim.ttft[1] == pytest.approx(load_seconds(spec, dram_gbps) + 10 * spec.prefill_s_per_token)
    ratios = sim.counters.estimate_ratios
    assert ratios[1] == pytest.approx(1.0)  # the second estimate knows the init time: exact


def test_kserve_always_fetches_and_rayserve_never_reads_dram() -> None:
    rows = [(t, 0, 10, 10) for t in (0.0, 300.0, 600.0)]
    kserve = simulate("kserve", ONE_NODE, rows, [("m", "7b")])
    assert kserve.counters.cold_starts == {"dram": 0, "disk": 0, "s3": 3}
    ray = simulate("rayserve", ONE_NODE, rows, [("m", "7b")])
    assert ray.counters.cold_starts == {"dram": 0, "disk": 3, "s3": 0}


def test_serverlessllm_decides_on_its_polling_tick() -> None:
    rows = [(10.25, 0, 10, 10)]
    ember = simulate("ember", ONE_NODE, rows, [("m", "7b")])
    sllm = simulate("serverlessllm", ONE_NODE, rows, [("m", "7b")])
    assert sllm.ttft[0] - ember.ttft[0] == pytest.approx(0.75)  # scheduled at t = 11 s, not 10.25 s


def test_serverlessllm_waits_for_room_in_its_pinned_dram_pool() -> None:
    # DRAM holds one 70B checkpoint (138 GB) but not two: the second load waits until the first
    # instance stops and unpins its copy; ember streams through and does not wait.
    overrides = {"cluster": {"nodes": 1, "bandwidth_jitter": 0.0, "dram_gb": 200.0, "prestaged_disk_copies": 1},
                 "deployment": {"keep_alive_s": 30.0}}
    rows = [(0.0, 0, 10, 10), (1.0, 1, 10, 10)]
    models = [("a", "70b"), ("b", "70b")]
    sllm = simulate("serverlessllm", overrides, rows, models)
    ember = simulate("ember-no-migration", overrides, rows, models)
    assert ember.ttft[1] < 80  # queued behind a's load only
    a_done = sllm.e2e[0]
    assert sllm.ttft[1] > a_done + 30  # after a's keep-alive ran out and its pin was released


def test_migration_frees_the_node_holding_the_model_in_dram() -> None:
    # node-000 has every checkpoint in DRAM, so eight 7B instances start there and fill its GPUs;
    # then the 70B model is wanted. node-001 is empty but would fetch it from S3 (~95 s). Ember
    # moves three idle 7B instances to node-001 and loads the 70B model from node-000's DRAM.
    overrides = {"cluster": {"nodes": 2, "bandwidth_jitter": 0.0, "prestaged_disk_copies": 0},
                 "deployment": {"keep_alive_s": 600.0}}
    models = [("big", "70b")] + [(f"s{i}", "7b") for i in range(8)]
    rows = [(10.0 * i, 1 + i, 10, 10) for i in range(8)] + [(100.0, 0, 10, 10)]
    runs = {}
    for policy in ("ember", "ember-no-migration"):
        sim = build(policy, overrides, rows, models)
        node = sim.nodes["node-000"]
        for dep in sim.deployments:
            node.dram.insert(dep.spec.uri, dep.spec.size_bytes)
        sim._report(node)
        runs[policy] = sim.run()
    ember, plain = runs["ember"], runs["ember-no-migration"]
    big = ember.deployments[0].spec
    assert plain.counters.migrations == 0 and plain.counters.cold_starts["s3"] == 1
    assert ember.counters.migrations == 3  # 3 GPUs for the 70B model, one per 7B instance
    assert ember.counters.cold_starts["s3"] == 3  # the moved 7B instances restart on node-001
    assert ember.ttft[-1] == pytest.approx(load_seconds(big, ember.nodes["node-000"].gbps["dram"]) +
                                           10 * big.prefill_s_per_token)
    assert plain.ttft[-1] > 5 * ember.ttft[-1]
    # The moved instances' deployments stay whole: every request completed.
    assert np.all(ember.status == COMPLETED)
