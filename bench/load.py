"""Bounded load test on loopback: many deployments, bursty arrivals, many cold starts.

Starts `ember serve` (a controller and local CPU workers) on free loopback ports, deploys N
copies of the tiny demo model with a short keep-alive (so idle ones scale to zero and come back
cold), then sends requests from an on/off Poisson process (bursts at a high rate, quiet gaps)
with Zipf-popular deployments. Every request ends as `ok` (200), `rejected` (429 with
Retry-After: the controller said "not now", the client may retry) or `lost` (anything else:
a 5xx, a transport error, a timeout). The platform's promise is lost == 0.

    .venv/bin/python bench/load.py                       # 20 deployments, 3000 requests
    .venv/bin/python bench/load.py --deployments 3 --requests 100 --no-write   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/ is not a package)


@dataclass
class Outcome:
    deployment: str
    status: int  # HTTP status; 0 when no answer came
    latency_s: float
    cold: bool = False
    error: str = ""


@dataclass
class Workload:
    deployments: int = 20
    requests: int = 3000
    burst_rate: float = 60.0  # requests/s during a burst
    burst_s: float = 3.0
    gap_s: float = 4.0  # quiet time between bursts (longer than keep-alive: cold starts)
    keep_alive_s: float = 2.0
    queue_limit: int = 16
    max_tokens: int = 8
    zipf_s: float = 1.1
    seed: int = 0
    workers: int = 2
    timeout_s: float = 120.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)

    def plan(self) -> None:
        """Arrival times and deployment indices, fixed by the seed."""
        rng = random.Random(self.seed)
        weights = [1.0 / (i + 1) ** self.zipf_s for i in range(self.deployments)]
        t, burst_end = 0.0, self.burst_s
        while len(self.arrivals) < self.requests:
            t += rng.expovariate(self.burst_rate)
            if t > burst_end:
                t = burst_end + self.gap_s
                burst_end = t + self.burst_s
            self.arrivals.append((t, rng.choices(range(self.deployments), weights)[0]))


def start_serve(cache: Path, workers: int) -> tuple[subprocess.Popen, str]:
    log = open(cache / "serve.log", "ab")
    cmd = [sys.executable, "-m", "ember.cli.main", "serve", "--port", "0", "--grpc-port", "0", "--workers",
           str(workers), "--cache-dir", str(cache), "--checkpoint-root", str(cache)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        text = (cache / "serve.log").read_text(errors="replace")
        found = re.search(r"Ember is serving on (http://\S+)", text)
        if found and "Press Ctrl-C" in text:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"ember serve exited:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("ember serve did not start within 300 s")


def build_checkpoint(cache: Path) -> Path:
    from ember.ckpt_format import convert
    from ember.ckpt_format.demo_model import build_demo_model

    hf = build_demo_model(cache / "tiny-hf", "tiny")
    convert(hf, cache / "tiny.ember", overwrite=True)
    return cache / "tiny.ember"


async def drive(url: str, w: Workload) -> list[Outcome]:
    import httpx

    names = [f"load-{i:02d}" for i in range(w.deployments)]
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=w.timeout_s, limits=limits) as client:
        async def one(at: float, index: int, start: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            name = names[index]
            sent = time.perf_counter()
            try:
                r = await client.post(f"/functions/{name}/invoke",
                                      json={"prompt": "Once upon a time", "max_tokens": w.max_tokens})
                cold = r.status_code == 200 and bool(r.json().get("cold_start"))
                error = "" if r.status_code in (200, 429) else r.text[:200]
                outcomes.append(Outcome(name, r.status_code, time.perf_counter() - sent, cold, error))
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(name, 0, time.perf_counter() - sent, False, f"{type(exc).__name__}: {exc}"))

        start = time.perf_counter()
        await asyncio.gather(*(one(at, i, start) for at, i in w.arrivals))
    return outcomes


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarize(outcomes: list[Outcome], wall_s: float, w: Workload) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    warm = [o.latency_s for o in ok if not o.cold]
    cold = [o.latency_s for o in ok if o.cold]
    lost = [o for o in outcomes if o.status not in (200, 429)]
    return {
        "deployments": w.deployments, "requests": len(outcomes), "ok": len(ok),
        "rejected_429": sum(1 for o in outcomes if o.status == 429), "lost": len(lost),
        "cold_starts": len(cold), "wall_s": round(wall_s, 2), "throughput_rps": round(len(ok) / wall_s, 2),
        "p50_ms": round(percentile([o.latency_s for o in ok], 50) * 1e3, 1),
        "p99_ms": round(percentile([o.latency_s for o in ok], 99) * 1e3, 1),
        "warm_p50_ms": round(percentile(warm, 50) * 1e3, 1), "warm_p99_ms": round(percentile(warm, 99) * 1e3, 1),
        "cold_p50_ms": round(percentile(cold, 50) * 1e3, 1), "cold_p99_ms": round(percentile(cold, 99) * 1e3, 1),
        "lost_examples": [o.error for o in lost[:5]],
        "workload": {k: v for k, v in w.__dict__.items() if k != "arrivals"},
    }


def run(w: Workload) -> dict:
    import httpx

    w.plan()
    with tempfile.TemporaryDirectory(prefix="ember-load-") as tmp:
        cache = Path(tmp)
        checkpoint = build_checkpoint(cache)
        proc, url = start_serve(cache, w.workers)
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(w.deployments):
                    r = c.post("/v1/deployments", json={
                        "name": f"load-{i:02d}", "checkpoint": str(checkpoint), "max_instances": 2,
                        "target_concurrency": 4, "keep_alive_s": w.keep_alive_s, "queue_limit": w.queue_limit})
                    r.raise_for_status()
            started = time.perf_counter()
            outcomes = asyncio.run(drive(url, w))
            return summarize(outcomes, time.perf_counter() - started, w)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def scale_note(w: dict) -> str:
    default = Workload().requests
    if w["requests"] >= default:
        return ""
    return f"A reduced run ({w['requests']} requests; the default is {default}). "


def write_docs(details: dict, result: dict) -> None:
    w = result["workload"]
    rows = [[result["deployments"], result["requests"], result["ok"], result["rejected_429"], result["lost"],
             result["cold_starts"], result["throughput_rps"], result["p50_ms"], result["p99_ms"],
             result["warm_p50_ms"], result["warm_p99_ms"], result["cold_p50_ms"], result["cold_p99_ms"]]]
    body = (
        f"{report.machine_line(details)}\n\n"
        f"`bench/load.py`: `ember serve` with {w['workers']} CPU workers on loopback, {w['deployments']} deployments "
        f"of the tiny demo model (keep-alive {w['keep_alive_s']:g} s, queue limit {w['queue_limit']}, at most 2 "
        f"instances each), {w['requests']} requests of {w['max_tokens']} tokens from an on/off Poisson process "
        f"({w['burst_rate']:g} req/s bursts of {w['burst_s']:g} s, {w['gap_s']:g} s gaps), Zipf({w['zipf_s']:g}) "
        f"popularity. Latencies are end to end per request; `rejected` are 429s with Retry-After, `lost` anything "
        f"else (5xx, transport errors, timeouts). `cold` requests are those whose answer says it started an "
        f"instance; `warm` ones did not, though some queued behind a cold start (the bursts outrun a "
        f"deployment's scale-from-zero), which is what their p99 shows. {scale_note(w)}"
        f"On a shared 2-core machine: read it as a check that nothing is lost under bursts and cold starts, "
        f"not as the throughput of a real node.\n\n"
        + report.markdown_table(["deployments", "requests", "ok", "rejected", "lost", "cold starts", "ok/s",
                                 "p50 ms", "p99 ms", "warm p50", "warm p99", "cold p50", "cold p99"], rows)
        + "\n"
    )
    report.replace_section("Load", body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    w = Workload()
    for name in ("deployments", "requests", "workers", "max_tokens", "queue_limit", "seed"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(w, name))
    for name in ("burst_rate", "burst_s", "gap_s", "keep_alive_s"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(w, name))
    ap.add_argument("--no-write", action="store_true", help="print only; leave results and docs alone")
    args = ap.parse_args(argv)
    for name in ("deployments", "requests", "workers", "max_tokens", "queue_limit", "seed", "burst_rate", "burst_s",
                 "gap_s", "keep_alive_s"):
        setattr(w, name, getattr(args, name))
    if w.deployments < 1 or w.requests < 1 or w.workers < 1 or w.burst_rate <= 0:
        ap.error("--deployments, --requests, --workers and --burst-rate must be positive")
    result = run(w)
    print(json.dumps({k: v for k, v in result.items() if k != "workload"}, indent=2))
    if not args.no_write:
        details = report.machine_details()
        report.write_json(report.RESULTS / "load.json", {"machine": details, "results": result})
        write_docs(details, result)
        print("updated docs/benchmarks.md")
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
