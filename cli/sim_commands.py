"""`ember sim`: compare Ember with baseline systems on a simulated cluster and workload.

The simulator (ember.sim) and matplotlib load inside the command, so `ember --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ember.cli.errors import exit_with, friendly_errors


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        exit_with(f"{flag} takes comma-separated numbers, got {text!r}", f"e.g. {flag} 2,6,12")
        raise AssertionError("unreachable") from None


@friendly_errors
def sim_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see --example-config).")] = None,
    example_config: Annotated[bool, typer.Option("--example-config",
                                                 help="Print a commented config and exit.")] = False,
    policies: Annotated[str | None, typer.Option(
        "--policies", help="Comma-separated: ember, ember-no-migration, serverlessllm, kserve, rayserve.")] = None,
    loads: Annotated[str | None, typer.Option("--loads", help="Request rates to sweep (req/s), e.g. 2,6,12.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override the config's seed.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", help="Override workload.duration_s.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write the tables as markdown here.")] = None,
    plots: Annotated[Path | None, typer.Option(
        "--plots", help="Write sim_ttft_cdf.png (and sim_ttft_vs_load.png) into this folder.")] = None,
) -> None:
    """Simulate a cluster under a workload with each policy; report TTFT, latency, cold starts, GPU time."""
    from ember.sim.example import EXAMPLE_CONFIG

    if example_config:
        sys.stdout.write(EXAMPLE_CONFIG)
        return
    if config is None:
        exit_with("ember sim needs --config FILE", "start from `ember sim --example-config > sim.yaml`")
        return
    from ember.sim import report
    from ember.sim.config import load_config
    from ember.sim.runner import run_sweep

    cfg = load_config(config)
    if policies is not None:
        cfg.policies = [p.strip() for p in policies.split(",") if p.strip()]
    if loads is not None:
        cfg.loads = _floats(loads, "--loads")
    if seed is not None:
        cfg.seed = seed
    if duration is not None:
        cfg.workload.duration_s = duration
    cfg.validate()
    if plots is not None:
        try:
            import matplotlib  # noqa: F401  (fail before a long run, not after it)
        except ImportError:
            exit_with("--plots needs matplotlib, which is not installed", "pip install 'ember[bench]' (or matplotlib)")

    err = Console(stderr=True, highlight=False)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), console=err,
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, fraction: float) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=1.0)
            bar.update(tasks[label], completed=fraction)

        sweep = run_sweep(cfg, progress)

    console = Console(highlight=False)
    console.print("[dim]Simulated: modelled cluster, models and workload (see docs/simulation.md).[/]")
    text = report.markdown(sweep)
    console.print(text, markup=False, soft_wrap=True)
    for rate in sweep.runs:
        ratios = report.ttft_ratios(sweep, rate)
        if ratios:
            shown = ", ".join(f"{name} {r}×" if r is not None else f"{name} –" for name, r in ratios.items())
            console.print(f"p99 TTFT relative to ember at {rate:g} req/s: {shown}", markup=False, soft_wrap=True)
    if json_out is not None:
        import json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(sweep.to_json(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if markdown_out is not None:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(text)
        console.print(f"wrote {markdown_out}")
    if plots is not None:
        written = [report.plot_cdf(sweep, plots / "sim_ttft_cdf.png")]
        if len(sweep.runs) > 1:
            written.append(report.plot_vs_load(sweep, plots / "sim_ttft_vs_load.png"))
        console.print("wrote " + ", ".join(str(p) for p in written))


def register(app: typer.Typer) -> None:
    app.command("sim")(sim_cmd)
