"""Live migration: stream pause and total migration time vs context length, per mode.

Two `ember worker` processes on loopback serve the same model (a random Llama built here from a
LlamaConfig with a context long enough for the largest length; nothing is downloaded). For each
context length a greedy request with that many prompt tokens streams from worker A; after
WARM_TOKENS tokens it is moved to worker B by:

- kv: MigrateOut in KV mode (pre-copy of the computed prefix while A decodes, then a short
  stop-and-copy of the last blocks and the state);
- tokens: MigrateOut in token mode (B recomputes the KV cache in one prefill);
- auto: MigrateOut letting the cost model pick per request (the chosen mode is recorded);
- restart: the baseline without migration — the client drops A's stream and sends the same
  request to B, which recomputes the prompt and regenerates the tokens the client already has.

The client does what the controller does: when A's stream ends with "migrated" it attaches to
B with the Handover's resume_id. Measured by the client:
- pause: from the last token received from A to the first new token received from B;
- total: from the MigrateOut call to its final event (restart: same as pause).
Variants are interleaved round by round (noise on these machines is large, see MEASURED.md)
and reported by median. Results: bench/results/migration.json, docs/img/migration.png and the
"Migration" section of docs/benchmarks.md.

    .venv/bin/python bench/migration.py                       # 256 … 8192 tokens, 3 rounds
    .venv/bin/python bench/migration.py --device cuda         # on a GPU node
    .venv/bin/python bench/migration.py --contexts 256 512 --rounds 1 --hidden 128 --layers 2 \\
        --results /tmp/m.json --docs /tmp/b.md --plot /tmp/m.png   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py, shared by the benchmarks)

from ember.api import worker_pb2 as pb  # noqa: E402
from ember.api import worker_pb2_grpc as pb_grpc  # noqa: E402

CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
VARIANTS = ("kv", "tokens", "auto", "restart")
MODES = {"kv": pb.MIGRATION_MODE_KV, "tokens": pb.MIGRATION_MODE_TOKENS, "auto": pb.MIGRATION_MODE_AUTO}
MODE_NAMES = {pb.MIGRATION_MODE_KV: "kv", pb.MIGRATION_MODE_TOKENS: "tokens"}
WARM_TOKENS = 16  # tokens streamed from A before the move
AFTER_TOKENS = 16  # tokens read from B after it, then the request is cancelled
GEN_ROOM = 512  # positions left for output: requests never end before they were moved and read
LABELS = {"kv": "KV migration", "tokens": "token migration (recompute)", "auto": "cost model's choice",
          "restart": "restart from scratch"}


# ---- the model -----------------------------------------------------------------------------------


def build_model(root: Path, hidden: int, layers: int, max_positions: int, dtype: str) -> Path:
    """A random Llama (demo tokenizer, no EOS so every run lasts its max_tokens) in the Ember format."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ember.ckpt_format import convert
    from ember.ckpt_format.demo_model import BOS, PAD, train_tokenizer

    hf_dir = root / "hf"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=BOS, pad_token=PAD)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = None
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    checkpoint = root / "model.ember"
    convert(hf_dir, checkpoint)
    shutil.rmtree(hf_dir)
    return checkpoint


# ---- workers -------------------------------------------------------------------------------------


class Worker:
    def __init__(self, root: Path, name: str, device: str) -> None:
        self.port = report.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(root / f"{name}.log", "wb")
        cache = root / f"{name}-cache"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ember.cli.main", "worker", "--cache-dir", str(cache), "--port", str(self.port),
             "--node-id", name, "--device", device, "--dram-cache-gb", "0", "--disk-cache-gb", "1"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.stub = pb_grpc.WorkerStub(grpc.insecure_channel(self.address))
        deadline = time.monotonic() + 120
        while True:
            try:
                self.stub.Health(pb.HealthRequest(), timeout=2)
                break
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start; see {root / (name + '.log')}") from None
                time.sleep(0.2)

    def load(self, instance_id: str, checkpoint: Path) -> None:
        request = pb.LoadRequest(instance_id=instance_id, checkpoint_uri=str(checkpoint), deployment="bench")
        events = list(self.stub.Load(request, timeout=600))
        assert events[-1].phase == pb.LOAD_PHASE_READY, events[-1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class ClientStream:
    """What a client (the controller) sees: chunks with arrival times, following a hand-over at once."""

    def __init__(self, stub: pb_grpc.WorkerStub, request: pb.GenerateRequest, skip_tokens: int = 0) -> None:
        self.times: list[tuple[float, str]] = []  # (arrival, "a" | "b") per new token
        self.skip = skip_tokens  # restart: tokens the client already has and drops
        self.handover: pb.Handover | None = None
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._calls = [stub.Generate(request, timeout=600)]
        self._thread = threading.Thread(target=self._read, args=(self._calls[0], "a"), daemon=True)
        self._thread.start()

    def _read(self, call, source: str) -> None:
        try:
            for chunk in call:
                now = time.perf_counter()
                with self._cond:
                    for _ in chunk.token_ids:
                        if self.skip:
                            self.skip -= 1
                        else:
                            self.times.append((now, source))
                    self._cond.notify_all()
                if chunk.finish_reason == "migrated":
                    self.handover = chunk.handover
                    stub = pb_grpc.WorkerStub(grpc.insecure_channel(chunk.handover.address))
                    follow = stub.Generate(pb.GenerateRequest(instance_id=chunk.handover.instance_id,
                                                              resume_id=chunk.handover.resume_id), timeout=600)
                    self._calls.append(follow)
                    self._read(follow, "b")
                    return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def wait(self, predicate, timeout: float = 600) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self) or self.error is not None, timeout):
                raise TimeoutError("the stream stalled")
        if self.error is not None:
            raise RuntimeError(f"stream failed: {self.error}")

    def count(self, source: str | None = None) -> int:
        return sum(1 for _, s in self.times if source is None or s == source)

    def cancel(self) -> None:
        for call in self._calls:
            call.cancel()

    def pause(self) -> float:
        last_a = max(t for t, s in self.times if s == "a")
        first_b = min(t for t, s in self.times if s == "b")
        return first_b - last_a


def run_variant(a: Worker, b: Worker, variant: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    request = pb.GenerateRequest(instance_id="a", request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    stream = ClientStream(a.stub, request)
    stream.wait(lambda s: s.count("a") >= WARM_TOKENS)
    result: dict[str, Any] = {}
    if variant == "restart":
        stream.cancel()
        delivered = stream.count("a")
        last_a = max(t for t, _ in stream.times)
        retry = ClientStream(b.stub, pb.GenerateRequest(
            instance_id="b", request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
            sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0)), skip_tokens=delivered)
        retry.wait(lambda s: s.count() >= 1)
        result["pause_s"] = result["total_s"] = retry.times[0][0] - last_a
        retry.cancel()
        return result
    started = time.perf_counter()
    events = list(a.stub.MigrateOut(pb.MigrateOutRequest(
        instance_id="a", destination_address=b.address, destination_instance_id="b", mode=MODES[variant]),
        timeout=600))
    result["total_s"] = time.perf_counter() - started
    final = events[-1]
    if final.phase != pb.MIGRATION_PHASE_HANDED_OVER:
        stream.cancel()
        raise RuntimeError(f"{variant} migration did not hand over: {final}")
    stream.wait(lambda s: s.count("b") >= AFTER_TOKENS)
    stream.cancel()
    result.update(pause_s=stream.pause(), stop_s=final.stop_s, bytes=final.bytes, mode=MODE_NAMES[final.mode],
                  estimated_kv_s=final.estimated_kv_s, estimated_recompute_s=final.estimated_recompute_s)
    return result


# ---- report --------------------------------------------------------------------------------------


def summarize(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for context, by_variant in samples.items():
        row: dict[str, Any] = {"context": int(context)}
        for variant, runs in by_variant.items():
            row[variant] = {
                "pause_s": statistics.median(r["pause_s"] for r in runs),
                "total_s": statistics.median(r["total_s"] for r in runs),
            }
            if variant != "restart":
                row[variant]["mb"] = statistics.median(r["bytes"] for r in runs) / 1e6
            if variant == "auto":
                chosen = [r["mode"] for r in runs]
                row[variant]["chose"] = max(set(chosen), key=chosen.count)
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    contexts = [r["context"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"kv": "o-", "tokens": "s-", "auto": "x--", "restart": "^:"}
    for variant in VARIANTS:
        left.plot(contexts, [r[variant]["pause_s"] * 1e3 for r in rows], styles[variant], label=LABELS[variant])
        if variant != "restart":
            right.plot(contexts, [r[variant]["total_s"] * 1e3 for r in rows], styles[variant], label=LABELS[variant])
    for ax, what in ((left, "stream pause seen by the client (ms)"), (right, "total migration time (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xticks(contexts)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(rows: list[dict[str, Any]], details: dict[str, Any], args: argparse.Namespace, docs: Path,
               plot_path: Path) -> None:
    headers = ["context", "KV pause ms", "KV total ms", "KV MB", "tokens pause ms", "tokens total ms",
               "restart pause ms", "auto chose", "auto pause ms"]
    table = [
        [r["context"], r["kv"]["pause_s"] * 1e3, r["kv"]["total_s"] * 1e3, r["kv"]["mb"],
         r["tokens"]["pause_s"] * 1e3, r["tokens"]["total_s"] * 1e3, r["restart"]["pause_s"] * 1e3,
         r["auto"]["chose"], r["auto"]["pause_s"] * 1e3]
        for r in rows
    ]
    try:
        image = plot_path.resolve().relative_to(docs.resolve().parent)
    except ValueError:
        image = plot_path
    body = f"""
Written by `bench/migration.py`. {report.machine_line(details)}

Two workers on loopback, model: random Llama, hidden {args.hidden}, {args.layers} layers, {args.dtype},
on {args.device}. A greedy request with N prompt tokens streams from worker A; after {WARM_TOKENS}
tokens it moves to worker B. *Pause* is what the client sees: from the last token received from A to
the first new token from B (it attaches with the Handover as soon as A's stream says "migrated").
*Total* is the MigrateOut call from start to hand-over. KV mode pre-copies the computed prefix
while A keeps decoding, so only the last blocks and the state move during the pause; token mode
stops first and B recomputes the whole prefix in one prefill; *restart* is the baseline without
migration (B recomputes the prompt and regenerates the {WARM_TOKENS} tokens the client already
had). *auto* lets the cost model pick per request from the measured prefill speed of B and
transfer rate of A (B's one-time calibration, a few timed prefills, happens in an unrecorded
warm-up). Medians of {args.rounds} interleaved rounds.

![Migration pause and total time vs context]({image})

{report.markdown_table(headers, table)}
"""
    report.replace_section("Migration", body, docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", type=Path, default=report.RESULTS / "migration.json")
    parser.add_argument("--docs", type=Path, default=report.DOCS)
    parser.add_argument("--plot", type=Path, default=report.REPO / "docs" / "img" / "migration.png")
    args = parser.parse_args()
    if args.rounds < 1 or any(c < 1 for c in args.contexts):
        parser.error("--rounds and --contexts must be positive")
    max_tokens = GEN_ROOM - 1
    root = Path(tempfile.mkdtemp(prefix="ember-bench-migration-"))
    workers: list[Worker] = []
    try:
        print(f"building the model (hidden {args.hidden}, {args.layers} layers) in {root}", flush=True)
        checkpoint = build_model(root, args.hidden, args.layers, max(args.contexts) + GEN_ROOM, args.dtype)
        a, b = Worker(root, "a", args.device), Worker(root, "b", args.device)
        workers += [a, b]
        a.load("a", checkpoint)
        b.load("b", checkpoint)
        import random

        vocab = json.loads((checkpoint / "ember.json").read_text())["config"]["vocab_size"]
        rng = random.Random(0)
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {str(c): {v: [] for v in VARIANTS} for c in args.contexts}
        # Warm-up, not recorded: first calls, and B's one-time recompute calibration (auto mode).
        warm_prompt = [rng.randrange(16, vocab) for _ in range(min(args.contexts))]
        for variant in VARIANTS:
            run_variant(a, b, variant, warm_prompt, max_tokens)
        for round_no in range(args.rounds):
            for context in args.contexts:
                prompt = [rng.randrange(16, vocab) for _ in range(context)]
                order = list(VARIANTS) if round_no % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    result = run_variant(a, b, variant, prompt, max_tokens)
                    samples[str(context)][variant].append(result)
                    print(f"round {round_no + 1} context {context:5d} {variant:8s} pause {result['pause_s'] * 1e3:8.1f} ms"
                          f"  total {result['total_s'] * 1e3:8.1f} ms" +
                          (f"  ({result['mode']}, {result['bytes'] / 1e6:.2f} MB)" if "mode" in result else ""),
                          flush=True)
        rows = summarize(samples)
        details = report.machine_details()
        report.write_json(args.results, {"machine": details, "config": vars(args) | {
            "results": str(args.results), "docs": str(args.docs), "plot": str(args.plot)}, "rows": rows,
            "samples": samples})
        plot(rows, args.plot, report.machine_line(details))
        write_docs(rows, details, args, args.docs, args.plot)
        print(f"wrote {args.results}, {args.plot} and the Migration section of {args.docs}")
    except BaseException:
        print(f"failed; worker logs are in {root}", file=sys.stderr)
        raise
    finally:
        for worker in workers:
            worker.stop()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
