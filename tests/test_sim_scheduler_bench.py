"""bench/scheduler.py still runs (tiny sizes, nothing written); its numbers are for docs, not asserts."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "scheduler.py"


def test_the_scheduler_benchmark_runs_and_reports_every_policy(capsys) -> None:
    sys.path.insert(0, str(BENCH.parent))
    try:
        module = runpy.run_path(str(BENCH))
        rows = module["run"]([20, 60], deployments=50, decisions=40, seed=0)
    finally:
        sys.path.remove(str(BENCH.parent))
    policies = {r["policy"] for r in rows}
    assert policies == {"locality", "least-loaded", "random", "locality + migration planner"}
    assert {r["nodes"] for r in rows} == {20, 60}
    for row in rows:
        assert 0 < row["p50_us"] <= row["p99_us"] <= row["max_us"]
    assert "| 60 | locality |" in module["table"](rows)
