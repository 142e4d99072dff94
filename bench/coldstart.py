"""End-to-end time to first token through the controller, per kind of start, and the controller's
own overhead on warm requests.

One `ember controller` and one `ember worker` (with a DRAM tier) run as processes on loopback;
every request goes through the controller's HTTP API (`POST /functions/<name>/invoke`, streamed)
exactly as a client's would, and TTFT is measured by the client from sending the request to
receiving the first token. Per round (interleaved, because noise on these machines is large —
see MEASURED.md):

- cold from disk: a fresh copy of the checkpoint (a URI no tier has seen), page cache dropped;
- warm: the same deployment again, its instance ready;
- cold from DRAM: the deployment deleted (instance unloaded) and created again: the worker's
  DRAM tier still holds the checkpoint and the scheduler places the start there;
- cold from S3: a fresh S3 prefix (moto on loopback: the fetch path, not a real store's speed);
- baseline: `from_pretrained` + `generate(max_new_tokens=1)` in a fresh process, page cache
  dropped (imports excluded, as the worker's are).

Overhead: warm requests with max_tokens=1, alternating between the controller's HTTP API and the
worker's gRPC Generate called directly on the same instance; the difference of the medians (and
of the 99th percentiles) is what the controller adds. Target: ≤ 5 ms at the median.

Results go to bench/results/coldstart.json and the "Cold start" section of docs/benchmarks.md.

    .venv/bin/python bench/coldstart.py                    # small model, 5 rounds, 500 overhead pairs
    .venv/bin/python bench/coldstart.py --size tiny --rounds 1 --overhead-requests 50 \\
        --results /tmp/c.json --docs /tmp/b.md             # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py, shared by the benchmarks)

PROMPT = "The quick brown fox"
KINDS = ("warm", "dram", "disk", "s3", "baseline")
LABELS = {"warm": "warm", "dram": "cold from DRAM", "disk": "cold from disk", "s3": "cold from S3 (moto)",
          "baseline": "baseline: from_pretrained + generate"}

BASELINE_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf_dir, device, prompt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
for f in hf_dir.rglob("*"):
    if f.is_file():
        fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(hf_dir).to(device).eval()
tokenizer = AutoTokenizer.from_pretrained(hf_dir)
ready = time.perf_counter()
inputs = tokenizer(prompt, return_tensors="pt").to(device)
with torch.inference_mode():
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({"ttft_s": time.perf_counter() - started, "ready_s": ready - started}))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Process:
    def __init__(self, name: str, cmd: list[str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{self.log_path.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Bench:
    def __init__(self, run_dir: Path, device: str, dram_gb: float, disk_gb: float) -> None:
        from ember.api.client import EmberClient

        self.run_dir = run_dir
        self.http_port, self.grpc_port = report.free_port(), report.free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.procs: list[Process] = []
        # `ember controller` always requires API keys: one admin key for the controller, the client
        # and the overhead loop (the auth check is part of the overhead being measured).
        self.api_key = secrets.token_urlsafe(32)
        os.environ["EMBER_ADMIN_KEY"] = os.environ["EMBER_API_KEY"] = self.api_key
        self.controller = self._spawn("controller", [
            "controller", "--port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--state", f"sqlite:///{run_dir / 'controller.db'}", "--checkpoint-root", str(run_dir.parent),
        ])
        self._wait(lambda: self._ready(), "controller /readyz", self.controller)
        self.worker = self._spawn("worker", [
            "worker", "--controller", f"127.0.0.1:{self.grpc_port}", "--port", "0", "--node-id", "bench",
            "--cache-dir", str(run_dir / "worker-cache"), "--device", device,
            "--dram-cache-gb", f"{dram_gb:.3f}", "--disk-cache-gb", f"{disk_gb:.3f}",
        ])
        self.client = EmberClient(self.url, timeout_s=1800)
        self._wait(lambda: any(n["state"] == "up" for n in self.client.list_nodes()), "worker registration",
                   self.worker)

    def _spawn(self, name: str, args: list[str]) -> Process:
        proc = Process(name, [sys.executable, "-m", "ember.cli.main", *args], self.run_dir)
        self.procs.append(proc)
        return proc

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @staticmethod
    def _wait(condition, what: str, proc: Process, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            proc.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def ttft(self, name: str, max_tokens: int = 1) -> dict[str, Any]:
        """Client-side time from sending a streamed invoke to its first token."""
        started = time.perf_counter()
        first = None
        final: dict[str, Any] = {}
        for event in self.client.invoke_stream(name, PROMPT, max_tokens=max_tokens, temperature=0.0):
            if event["kind"] == "text" and first is None:
                first = time.perf_counter()
            elif event["kind"] == "done":
                final = dict(event)
        if first is None:
            raise RuntimeError(f"{name}: no token came back")
        instances = {i["id"]: i for i in self.client.list_instances(name)}
        instance = instances.get(final.get("instance", ""), {})
        return {"ttft_s": first - started, "cold_start": bool(final.get("cold_start")),
                "source_tier": instance.get("source_tier"), "instance": final.get("instance"),
                "ready_actual_s": instance.get("actual_ready_s"), "ready_estimated_s": instance.get("estimated_ready_s")}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def baseline(hf_dir: Path, device: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, str(hf_dir), device, PROMPT],
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def overhead(bench: Bench, name: str, pairs: int) -> dict[str, Any]:
    """Warm max_tokens=1 requests, alternating controller HTTP and direct worker gRPC."""
    import grpc
    import httpx

    from ember.api import worker_pb2 as pb
    from ember.api import worker_pb2_grpc as pb_grpc

    bench.client.invoke(name, PROMPT, max_tokens=1, temperature=0.0)  # make sure it is warm
    (instance,) = bench.client.list_instances(name)
    stub = pb_grpc.WorkerStub(grpc.insecure_channel(instance["address"]))
    request = pb.GenerateRequest(instance_id=instance["id"], prompt=PROMPT,
                                 sampling=pb.SamplingParams(max_tokens=1, temperature=0.0))
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0.0}
    direct, via = [], []
    headers = {"Authorization": f"Bearer {bench.api_key}"}
    with httpx.Client(base_url=bench.url, timeout=60, headers=headers) as http:
        for i in range(pairs + 10):
            t0 = time.perf_counter()
            list(stub.Generate(request, timeout=60))
            t1 = time.perf_counter()
            r = http.post(f"/functions/{name}/invoke", json=body)
            t2 = time.perf_counter()
            r.raise_for_status()
            if i >= 10:  # the first few warm up connections and caches
                direct.append(t1 - t0)
                via.append(t2 - t1)
    return {
        "pairs": pairs,
        "direct_p50_ms": statistics.median(direct) * 1e3, "direct_p99_ms": percentile(direct, 0.99) * 1e3,
        "controller_p50_ms": statistics.median(via) * 1e3, "controller_p99_ms": percentile(via, 0.99) * 1e3,
        "added_p50_ms": (statistics.median(via) - statistics.median(direct)) * 1e3,
        "added_p99_ms": (percentile(via, 0.99) - percentile(direct, 0.99)) * 1e3,
    }


def prepare_model(size: str, workdir: Path) -> tuple[Path, Path]:
    from ember.ckpt_format import convert
    from ember.ckpt_format.demo_model import build_demo_model

    hf_dir, ember_dir = workdir / f"demo-{size}-hf", workdir / f"demo-{size}.ember"
    if not (hf_dir / "config.json").exists():
        build_demo_model(hf_dir, size)
    if not (ember_dir / "ember.json").exists():
        convert(hf_dir, ember_dir, overwrite=True)
    return hf_dir, ember_dir


def upload(client, bucket: str, prefix: str, checkpoint: Path) -> str:
    for f in sorted(checkpoint.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = statistics.median(r["ttft_s"] for r in runs if r["kind"] == "baseline")
    rows = []
    for kind in KINDS:
        sel = [r for r in runs if r["kind"] == kind]
        ttft = [r["ttft_s"] for r in sel]
        row = {"kind": kind, "rounds": len(sel), "ttft_median_s": statistics.median(ttft), "ttft_min_s": min(ttft),
               "ttft_max_s": max(ttft), "vs_baseline": base / statistics.median(ttft)}
        actual = [r["ready_actual_s"] for r in sel if r.get("ready_actual_s") is not None and kind != "warm"]
        estimated = [r["ready_estimated_s"] for r in sel if r.get("ready_estimated_s") is not None and kind != "warm"]
        if actual:
            row["ready_actual_median_s"] = statistics.median(actual)
        if estimated:
            row["ready_estimated_median_s"] = statistics.median(estimated)
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], over: dict[str, Any], details: dict[str, Any], args: argparse.Namespace,
           model_bytes: int) -> str:
    table = report.markdown_table(
        ["start", "TTFT median s", "min s", "max s", "vs baseline", "time to ready s (actual)",
         "scheduler estimate s"],
        [[LABELS[r["kind"]], r["ttft_median_s"], r["ttft_min_s"], r["ttft_max_s"], f"{r['vs_baseline']:.2f}×",
          r.get("ready_actual_median_s", "—"), r.get("ready_estimated_median_s", "—")] for r in rows],
    )
    over_table = report.markdown_table(
        ["warm request, max_tokens=1", "p50 ms", "p99 ms"],
        [["worker gRPC Generate, called directly", over["direct_p50_ms"], over["direct_p99_ms"]],
         ["through the controller (HTTP /functions/…/invoke)", over["controller_p50_ms"], over["controller_p99_ms"]],
         ["**added by the controller**", over["added_p50_ms"], over["added_p99_ms"]]],
    )
    verdict = "met" if over["added_p50_ms"] <= 5.0 else "MISSED"
    return "\n\n".join([
        f"Written by `bench/coldstart.py --size {args.size} --rounds {args.rounds} --overhead-requests "
        f"{args.overhead_requests} --device {args.device}`. One controller and one worker process on loopback; "
        f"the demo model `{args.size}` ({model_bytes / 1e6:.0f} MB). TTFT is measured by the client, from "
        "sending `POST /functions/<name>/invoke` (streamed) to the first token; medians of interleaved rounds. "
        "Cold from disk uses a checkpoint copy no tier has seen, page cache dropped; cold from DRAM re-creates "
        "a deleted deployment whose checkpoint the worker's DRAM tier still holds; S3 is a moto server on "
        "loopback (the fetch path, not a real store's bandwidth). The baseline loads with `from_pretrained` "
        "in a fresh process (imports not counted) and generates one token. Time to ready is the controller's "
        "measurement of each start next to the scheduler's estimate for it.",
        report.machine_line(details),
        table,
        f"Controller overhead on warm requests ({over['pairs']} interleaved pairs; target ≤ 5 ms added at "
        f"p50: {verdict}):",
        over_table,
        f"Raw numbers: `{args.results_label}`.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--overhead-requests", type=int, default=500)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workdir", type=Path, default=report.REPO / ".bench" / "coldstart")
    parser.add_argument("--results", type=Path, default=report.RESULTS / "coldstart.json")
    parser.add_argument("--docs", type=Path, default=report.DOCS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.overhead_requests < 1:
        parser.error("--rounds and --overhead-requests must be >= 1")
    try:
        args.results_label = str(args.results.resolve().relative_to(report.REPO))
    except ValueError:
        args.results_label = str(args.results)

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"preparing the {args.size} demo model in {args.workdir}", flush=True)
    hf_dir, ember_dir = prepare_model(args.size, args.workdir)
    model_bytes = sum(f.stat().st_size for f in ember_dir.iterdir())

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = report.free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    s3 = boto3.client("s3")
    bucket = f"ember-coldstart-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)

    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    copies = run_dir / "copies"
    runs: list[dict[str, Any]] = []
    bench = None
    try:
        bench = Bench(run_dir, args.device, dram_gb=model_bytes * (args.rounds + 2) * 1.3 / 1e9 + 0.05,
                      disk_gb=model_bytes * (args.rounds + 2) * 1.3 / 1e9 + 0.1)
        # Process-wide first-time costs (imports, allocator warm-up) belong to no kind of start.
        bench.client.deploy("bench-warmup", str(ember_dir), keep_alive_s=0)
        bench.ttft("bench-warmup")
        bench.client.delete_deployment("bench-warmup")
        baseline(hf_dir, args.device)
        for rnd in range(args.rounds):
            copy = copies / f"r{rnd}"
            shutil.copytree(ember_dir, copy)
            report.drop_page_cache(copy)
            measured: list[tuple[str, dict[str, Any]]] = []
            name = f"disk-{rnd}"
            bench.client.deploy(name, str(copy), keep_alive_s=600)
            measured.append(("disk", bench.ttft(name)))
            measured.append(("warm", bench.ttft(name)))
            bench.client.delete_deployment(name)
            name = f"dram-{rnd}"
            bench.client.deploy(name, str(copy), keep_alive_s=600)
            measured.append(("dram", bench.ttft(name)))
            bench.client.delete_deployment(name)
            name = f"s3-{rnd}"
            bench.client.deploy(name, upload(s3, bucket, f"r{rnd}", ember_dir), keep_alive_s=600)
            measured.append(("s3", bench.ttft(name)))
            bench.client.delete_deployment(name)
            measured.append(("baseline", baseline(hf_dir, args.device)))
            for kind, result in measured:
                if kind in ("dram", "disk", "s3") and result.get("source_tier") != kind:
                    raise RuntimeError(f"round {rnd}: expected a start from {kind}, the instance reports "
                                       f"{result.get('source_tier')!r}")
                runs.append({"kind": kind, "round": rnd, **result})
                print(f"round {rnd} {LABELS[kind]:>38}: TTFT {result['ttft_s']:.3f} s", flush=True)
        bench.client.deploy("overhead", str(ember_dir), keep_alive_s=600)
        over = overhead(bench, "overhead", args.overhead_requests)
        print(f"controller overhead: +{over['added_p50_ms']:.2f} ms p50, +{over['added_p99_ms']:.2f} ms p99 "
              f"(direct gRPC p50 {over['direct_p50_ms']:.2f} ms)", flush=True)
    finally:
        if bench is not None:
            bench.stop()
        moto.stop()
        shutil.rmtree(copies, ignore_errors=True)

    details = report.machine_details()
    rows = summarize(runs)
    report.write_json(args.results, {"machine": details, "device": args.device, "size": args.size,
                                     "model_bytes": model_bytes, "rounds": args.rounds, "prompt": PROMPT,
                                     "summary": rows, "overhead": over, "runs": runs})
    report.replace_section("Cold start", render(rows, over, details, args, model_bytes), args.docs)
    print(report.markdown_table(["start", "TTFT s", "vs baseline"],
                                [[LABELS[r["kind"]], r["ttft_median_s"], f"{r['vs_baseline']:.2f}×"] for r in rows]))
    print(f"wrote {args.results} and the Cold start section of {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
