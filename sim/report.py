"""The comparison as people read it: a markdown table per request rate and two PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ember.sim.runner import Sweep

COLUMNS = ("policy", "TTFT p50 (s)", "TTFT p95 (s)", "TTFT p99 (s)", "E2E p50 (s)", "E2E p99 (s)",
           "cold starts dram/disk/s3", "migrations (req. moved)", "rejected", "GPU-hours")


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def table(sweep: Sweep, rate: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for name, run in sweep.runs[rate].items():
        s = run.summary
        tiers = s["cold_starts_by_tier"]
        moved = sum(s["migrated_requests"].values())
        cells = [
            f"`{name}`", _fmt(s["ttft_p50"]), _fmt(s["ttft_p95"]), _fmt(s["ttft_p99"]), _fmt(s["e2e_p50"]),
            _fmt(s["e2e_p99"]), f"{tiers['dram']}/{tiers['disk']}/{tiers['s3']}", f"{s['migrations']} ({moved})",
            f"{s['rejected']} ({100 * s['rejected'] / max(1, s['requests']):.1f}%)", f"{s['gpu_seconds'] / 3600:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(sweep: Sweep) -> str:
    parts = []
    for rate in sweep.runs:
        parts.append(f"### {rate:g} requests/s\n\n{sweep.descriptions[rate]}.\n\n{table(sweep, rate)}\n")
    return "\n".join(parts)


def ttft_ratios(sweep: Sweep, rate: float, reference: str = "ember") -> dict[str, float | None]:
    """p99 TTFT of each other policy divided by the reference's: > 1 means the reference is faster."""
    runs = sweep.runs[rate]
    if reference not in runs:
        return {}
    ref = runs[reference].summary["ttft_p99"]
    out = {}
    for name, run in runs.items():
        if name != reference:
            other = run.summary["ttft_p99"]
            out[name] = round(other / ref, 2) if ref and other is not None else None
    return out


def plot_cdf(sweep: Sweep, path: Path) -> Path:
    """TTFT CDF per policy, one panel per request rate (log time axis: cold starts span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(sweep.runs)
    fig, axes = plt.subplots(1, len(rates), figsize=(5.2 * len(rates), 4), squeeze=False, sharey=True)
    for ax, rate in zip(axes[0], rates):
        for name, run in sweep.runs[rate].items():
            values = np.sort(np.maximum(run.ttft, 1e-3))
            if len(values):
                ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=name, linewidth=1.4)
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (s, log)")
        ax.set_title(f"{rate:g} req/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of completed requests")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Simulated TTFT CDF (modelled cluster and workload)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_load(sweep: Sweep, path: Path) -> Path:
    """p99 and p95 TTFT against the request rate, per policy (p50 is a warm hit for every policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(sweep.runs)
    policies = list(sweep.runs[rates[0]])
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    for ax, key, title in ((axes[0], "ttft_p99", "TTFT p99"), (axes[1], "ttft_p95", "TTFT p95")):
        for name in policies:
            values = [sweep.runs[r][name].summary[key] for r in rates]
            ax.plot(rates, [v if v is not None else np.nan for v in values], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel("seconds (log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Simulated latency vs load (modelled cluster and workload)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
