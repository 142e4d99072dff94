"""Time to first token by source tier (S3 / disk / DRAM) through a real worker, against transformers.

For each demo model size and each round (interleaved, because run-to-run noise on these machines
is large — see MEASURED.md) it measures:

- baseline: `AutoModelForCausalLM.from_pretrained(hf_dir)` + tokenizer + `generate(max_new_tokens=1)`
  in this process, page cache dropped for the model files first;
- s3:   Load of a checkpoint prefix the worker has never seen (fresh prefix per round) + Generate;
- disk: Load of the same URI again from the disk cache (page cache dropped for the entry first;
        this worker runs without a DRAM tier) + Generate;
- dram: Load on a second worker whose DRAM tier already holds the checkpoint + Generate.

TTFT is from sending Load to receiving the first Generate chunk. "S3" is a moto server on
loopback (this repository's tests use the same), so its numbers show the fetch path's overhead,
not a real object store's bandwidth. Results go to bench/results/tiers.json and the "Tiers"
section of docs/benchmarks.md.

    .venv/bin/python bench/tiers.py                       # small + medium, 3 rounds
    .venv/bin/python bench/tiers.py --sizes tiny --rounds 1 --results /tmp/t.json --docs /tmp/b.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py, shared by the benchmarks)

PROMPT = "The quick brown fox"
TIERS = ("s3", "disk", "dram")


class Worker:
    def __init__(self, name: str, cache_dir: Path, log_dir: Path, args: list[str], device: str) -> None:
        import grpc

        from ember.api import worker_pb2_grpc as pb_grpc

        self.name = name
        self.cache_dir = cache_dir
        self.port = report.free_port()
        self.log_path = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "ember.cli.main", "worker", "--cache-dir", str(cache_dir),
               "--port", str(self.port), "--device", device, "--node-id", name, *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.stub = pb_grpc.WorkerStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 300) -> None:
        import grpc

        from ember.api import worker_pb2 as pb

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                self.stub.Health(pb.HealthRequest(), timeout=2)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {self.name} not healthy after {timeout} s") from None
                time.sleep(0.2)

    def start_and_first_token(self, instance_id: str, uri: str) -> dict[str, Any]:
        """Load + Generate(max_tokens=1); returns TTFT and the load's own timings."""
        from ember.api import worker_pb2 as pb

        started = time.perf_counter()
        final = None
        for event in self.stub.Load(pb.LoadRequest(instance_id=instance_id, checkpoint_uri=uri), timeout=1800):
            final = event
        ready = time.perf_counter()
        request = pb.GenerateRequest(
            instance_id=instance_id, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=1, temperature=0.0)
        )
        first = None
        for chunk in self.stub.Generate(request, timeout=600):
            if first is None:
                first = time.perf_counter()
        assert final is not None and first is not None
        return {
            "ttft_s": first - started,
            "ready_s": ready - started,
            "source_tier": final.source_tier,
            "fetch_s": final.fetch_s,
            "load_s": final.load_s,
            "init_s": final.init_s,
            "bytes": final.bytes_total,
        }

    def unload(self, instance_id: str) -> None:
        from ember.api import worker_pb2 as pb

        self.stub.Unload(pb.UnloadRequest(instance_id=instance_id), timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def baseline(hf_dir: Path, device: str) -> dict[str, Any]:
    """What a plain transformers server does on a cold start."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report.drop_page_cache(hf_dir)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    loaded = time.perf_counter()
    inputs = tokenizer(PROMPT, return_tensors="pt").to(device)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    done = time.perf_counter()
    del model
    return {"ttft_s": done - started, "ready_s": loaded - started}


def prepare_models(sizes: list[str], workdir: Path) -> dict[str, dict[str, Path]]:
    from ember.ckpt_format import convert
    from ember.ckpt_format.demo_model import build_demo_model

    models = {}
    for size in sizes:
        hf_dir = workdir / f"demo-{size}-hf"
        ember_dir = workdir / f"demo-{size}.ember"
        if not (hf_dir / "config.json").exists():
            build_demo_model(hf_dir, size)
        if not (ember_dir / "ember.json").exists():
            convert(hf_dir, ember_dir, overwrite=True)
        models[size] = {"hf": hf_dir, "ember": ember_dir}
    return models


def upload(client, bucket: str, prefix: str, checkpoint: Path) -> str:
    for f in sorted(checkpoint.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


def summarize(runs: list[dict[str, Any]], sizes: list[str], model_bytes: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        base = [r["ttft_s"] for r in runs if r["size"] == size and r["tier"] == "baseline"]
        base_median = statistics.median(base)
        rows.append({"size": size, "tier": "baseline", "bytes": model_bytes[size], "ttft_s": base_median,
                     "speedup": 1.0, "rounds": len(base)})
        for tier in TIERS:
            sel = [r for r in runs if r["size"] == size and r["tier"] == tier]
            ttft = statistics.median(r["ttft_s"] for r in sel)
            rows.append({
                "size": size, "tier": tier, "bytes": model_bytes[size], "ttft_s": ttft,
                "fetch_s": statistics.median(r["fetch_s"] for r in sel),
                "load_s": statistics.median(r["load_s"] for r in sel),
                "init_s": statistics.median(r["init_s"] for r in sel),
                "speedup": base_median / ttft if ttft > 0 else float("inf"),
                "rounds": len(sel),
                "tier_as_reported": sorted({r["source_tier"] for r in sel}),
            })
    return rows


def render(rows: list[dict[str, Any]], details: dict[str, Any], args: argparse.Namespace) -> str:
    table = report.markdown_table(
        ["model", "size MB", "start", "TTFT s (median)", "fetch s", "load s", "init s", "vs baseline"],
        [
            [r["size"], r["bytes"] / 1e6, r["tier"], r["ttft_s"], r.get("fetch_s", "—"), r.get("load_s", "—"),
             r.get("init_s", "—"), f"{r['speedup']:.2f}×"]
            for r in rows
        ],
    )
    return "\n\n".join([
        "Written by `bench/tiers.py`. Time to first token (Load + first Generate chunk through a real "
        "worker process) for a start from each tier, against `from_pretrained` + `generate(max_new_tokens=1)`"
        " with a cold page cache. Medians of "
        f"{args.rounds} interleaved rounds; device `{args.device}`. S3 is a moto server on loopback, so the "
        "s3 row measures the fetch path (parallel ranged GETs written into the disk cache), not an object "
        "store's bandwidth. The disk row drops the page cache of the cache entry first; the dram row is a "
        "worker whose DRAM tier already holds the checkpoint.",
        report.machine_line(details),
        table,
        f"Raw numbers: `{args.results_label}`.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workdir", type=Path, default=report.REPO / ".bench" / "tiers")
    parser.add_argument("--results", type=Path, default=report.RESULTS / "tiers.json")
    parser.add_argument("--docs", type=Path, default=report.DOCS)
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.rounds < 1 or not sizes:
        parser.error("need at least one size and one round")
    try:
        args.results_label = str(args.results.resolve().relative_to(report.REPO))
    except ValueError:
        args.results_label = str(args.results)

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"preparing demo models {sizes} in {args.workdir}", flush=True)
    models = prepare_models(sizes, args.workdir)
    model_bytes = {s: sum(f.stat().st_size for f in m["ember"].iterdir()) for s, m in models.items()}

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise

    port = report.free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import boto3

    s3 = boto3.client("s3")
    bucket = f"ember-bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)

    run_dir = Path(tempfile.mkdtemp(prefix="tiers-", dir=args.workdir))
    total = sum(model_bytes.values())
    disk_gb = (args.rounds + 1) * total * 1.2 / 1e9 + 0.1
    dram_gb = total * 1.3 / 1e9 + 0.05
    workers = []
    runs: list[dict[str, Any]] = []
    try:
        plain = Worker("tiers-disk", run_dir / "cache-disk", run_dir, ["--dram-cache-gb", "0",
                       "--disk-cache-gb", f"{disk_gb:.3f}"], args.device)
        workers.append(plain)
        dram = Worker("tiers-dram", run_dir / "cache-dram", run_dir, ["--dram-cache-gb", f"{dram_gb:.3f}",
                      "--disk-cache-gb", f"{disk_gb:.3f}"], args.device)
        workers.append(dram)
        # One-time process costs (imports on the first load) belong to no tier: pay them up front.
        first = next(iter(models.values()))["ember"]
        plain.start_and_first_token("warm", str(first))
        plain.unload("warm")
        dram_uris = {}
        for size, m in models.items():  # fill the DRAM worker's pool once (S3 -> disk -> DRAM)
            dram_uris[size] = upload(s3, bucket, f"{size}/dram", m["ember"])
            dram.start_and_first_token("warm", dram_uris[size])
            dram.unload("warm")
        baseline(next(iter(models.values()))["hf"], args.device)  # pays the imports, untimed
        for rnd in range(args.rounds):
            for size, m in models.items():
                uri = upload(s3, bucket, f"{size}/r{rnd}", m["ember"])
                measured = [("baseline", None)]
                measured += [("s3", (plain, uri)), ("disk", (plain, uri)), ("dram", (dram, dram_uris[size]))]
                for tier, target in measured:
                    if target is None:
                        result = baseline(m["hf"], args.device)
                        result.update(fetch_s=0.0, load_s=0.0, init_s=0.0, source_tier="baseline")
                    else:
                        worker, target_uri = target
                        if tier == "disk":
                            report.drop_page_cache(worker.cache_dir / "disk")
                        instance = f"{size}-{tier}-{rnd}"
                        result = worker.start_and_first_token(instance, target_uri)
                        worker.unload(instance)
                        if result["source_tier"] != tier:
                            raise RuntimeError(f"{size} round {rnd}: expected a {tier} start, the worker "
                                               f"reported {result['source_tier']!r}")
                    runs.append({"size": size, "tier": tier, "round": rnd, **result})
                    print(f"round {rnd} {size:>6} {tier:>8}: TTFT {result['ttft_s']:.3f} s", flush=True)
    finally:
        for w in workers:
            w.stop()
        moto.stop()

    details = report.machine_details()
    rows = summarize(runs, sizes, model_bytes)
    report.write_json(args.results, {"machine": details, "device": args.device, "rounds": args.rounds,
                                     "prompt": PROMPT, "summary": rows, "runs": runs})
    report.replace_section("Tiers", render(rows, details, args), args.docs)
    print(report.markdown_table(["model", "start", "TTFT s", "vs baseline"],
                                [[r["size"], r["tier"], r["ttft_s"], f"{r['speedup']:.2f}×"] for r in rows]))
    print(f"wrote {args.results} and the Tiers section of {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
