"""Rich tables of the controller's wire shapes: what `ember list`, `get` and `status` print.

They read the public JSON only (`/v1/status`, `/v1/deployments`, …), never ember.controller, and
show the same picture as the status page: nodes with their devices and tiers, deployments with
their instances and queues, recent cold starts, migrations. Columns stay few and short so a
table fits an 80-column terminal.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

TIER_ORDER = {"dram": 0, "disk": 1}


def human_bytes(n: float | None) -> str:
    if not n:
        return "0 B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.3g} s"
    minutes, rest = divmod(round(s), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def ago(then: float | None, now: float) -> str:
    if not then:
        return "never"
    delta = max(0.0, now - then)
    return "just now" if delta < 1 else f"{seconds(delta) if delta >= 60 else f'{delta:.0f} s'} ago"


def gbps(v: float | None) -> str:
    return f"{v:.2f} GB/s" if v else "-"


def short_uri(uri: str) -> str:
    trimmed = uri.rstrip("/")
    name = trimmed.rsplit("/", 1)[-1] or trimmed
    return f"s3://…/{name}" if uri.startswith("s3://") and "/" in trimmed[5:] else name


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", header_style="bold", box=None,
                 pad_edge=False, padding=(0, 2, 0, 0))


def instances_cell(counts: dict[str, int]) -> str:
    parts = [f"{counts[s]} {s}" for s in ("ready", "loading", "starting", "stopping") if counts.get(s)]
    return ", ".join(parts) or "scaled to zero"


def deployments_table(deployments: list[dict]) -> Table:
    table = _table("Deployments")
    for column in ("NAME", "INSTANCES", "QUEUED", "IN FLIGHT", "SCALE"):
        table.add_column(column, no_wrap=True)
    table.add_column("CHECKPOINT", overflow="fold")
    for d in deployments:
        counts = d.get("instances", {})
        capacity = counts.get("ready", 0) * d["target_concurrency"]
        name = Text(d["name"], style="bold")
        if d.get("last_error"):
            name.append("\n" + d["last_error"], style="red")
        table.add_row(
            name, instances_cell(counts), f"{d.get('queued', 0)}/{d['queue_limit']}",
            f"{d.get('in_flight', 0)}/{capacity}",
            Text(f"{d['min_instances']}-{d['max_instances']} x{d['target_concurrency']}\n").append(
                f"idle {seconds(d['keep_alive_s'])}", style="dim"),
            Text(f"{short_uri(d['checkpoint'])}\n").append(human_bytes(d.get("checkpoint_bytes")), style="dim"),
        )
    return table


def instances_table(instances: list[dict]) -> Table:
    table = _table("Instances")
    for column in ("INSTANCE", "NODE", "STATE", "IN FLIGHT", "READY FROM", "IN (ESTIMATE)"):
        table.add_column(column, no_wrap=column == "INSTANCE")
    for i in instances:
        took = "-"
        if i.get("actual_ready_s") is not None:
            took = seconds(i["actual_ready_s"])
            if i.get("estimated_ready_s") is not None:
                took += f" ({seconds(i['estimated_ready_s'])})"
        table.add_row(i["id"], i["node"], i["state"], str(i.get("in_flight", 0)), i.get("source_tier") or "-", took)
    return table


def _memory(device: dict) -> str:
    total = device["total_memory_bytes"]
    used = human_bytes(total - device["free_memory_bytes"])
    whole = human_bytes(total)
    if used.split()[-1] == whole.split()[-1]:
        used = used.split()[0]
    return f"{device['name']} {used}/{whole}"


def nodes_table(nodes: list[dict], now: float) -> Table:
    """One row per tier, so each node's cached checkpoints and bandwidths line up like on the page."""
    table = _table("Nodes")
    table.add_column("NODE", no_wrap=True)
    table.add_column("TIER", no_wrap=True)
    table.add_column("USED", no_wrap=True)
    table.add_column("READ", no_wrap=True)
    table.add_column("CACHED CHECKPOINTS", overflow="fold")
    for n in nodes:
        state_style = {"up": "green", "down": "red"}.get(n["state"], "yellow")
        title = Text(n["id"], style="bold")
        title.append(f" {n['state']}", style=state_style)
        lines: list[Text | str] = [title, *(_memory(d) for d in n.get("devices", [])),
                                   Text(n["address"], style="dim"),
                                   Text(f"seen {ago(n.get('last_heartbeat'), now)}", style="dim")]
        tiers = sorted(n.get("tiers", {}).items(), key=lambda kv: (TIER_ORDER.get(kv[0], 2), kv[0]))
        rows = [(name, f"{human_bytes(t.get('used_bytes'))}/{human_bytes(t.get('capacity_bytes'))}",
                 gbps(t.get("read_gbps")),
                 "\n".join(f"{short_uri(c['uri'])} {human_bytes(c.get('bytes'))}" for c in t.get("checkpoints", []))
                 or "-")
                for name, t in tiers]
        rows.append(("s3", "-", gbps(n.get("s3_read_gbps")), ""))
        height = max(len(lines), len(rows))
        lines += [""] * (height - len(lines))
        rows += [("", "", "", "")] * (height - len(rows))
        for k, (line, (tier, used, read, cached)) in enumerate(zip(lines, rows)):
            table.add_row(line, tier, used, read, cached, end_section=k == height - 1)
    return table


def cold_starts_table(cold_starts: list[dict], now: float) -> Table:
    table = _table("Recent cold starts")
    for column in ("WHEN", "DEPLOYMENT", "NODE", "FROM", "EST.", "ACTUAL", "FETCH/LOAD/INIT"):
        table.add_column(column)
    for c in cold_starts:
        table.add_row(ago(c["finished_at"], now), c["deployment"], c["node"], c["tier"], seconds(c.get("estimated_s")),
                      seconds(c["actual_s"]),
                      f"{seconds(c.get('fetch_s'))}/{seconds(c.get('load_s'))}/{seconds(c.get('init_s'))}")
    return table


def migrations_table(migrations: list[dict], now: float) -> Table:
    table = _table("Migrations")
    for column in ("STARTED", "INSTANCE", "FROM -> TO", "MODE", "WHY", "REQUESTS", "STATE", "TOOK"):
        table.add_column(column)
    for m in migrations:
        took = seconds(m["finished_at"] - m["started_at"]) if m.get("finished_at") else "-"
        state = Text(m["state"], style={"done": "green", "failed": "red"}.get(m["state"], "yellow"))
        if m.get("error"):
            state.append(f"\n{m['error']}", style="red")
        table.add_row(ago(m["started_at"], now), m["instance"], f"{m['source']} -> {m.get('target') or '?'}",
                      m.get("mode") or "-", m.get("reason") or "-", str(m.get("requests", 0)), state, took)
    return table


def print_status(console: Console, status: dict, url: str) -> None:
    """The status page's picture, in the terminal."""
    now = status.get("controller", {}).get("now") or time.time()
    s = status["summary"]
    counts = s.get("instances", {})
    starting = counts.get("starting", 0) + counts.get("loading", 0)
    controller = status.get("controller", {})
    console.print(
        f"[bold]Ember[/] {url} (v{controller.get('version', '?')}, up {seconds(controller.get('uptime_s'))}): "
        f"{s['nodes_up']}/{s['nodes']} node(s) up, {s['deployments']} deployment(s), "
        f"{counts.get('ready', 0)} instance(s) ready, {starting} starting; "
        f"{s['in_flight']} request(s) in flight, {s['queued']} queued", soft_wrap=True,
    )
    parts: list = []
    if status["nodes"]:
        parts.append(nodes_table(status["nodes"], now))
    else:
        parts.append(Text("No worker nodes: start one with `ember worker --controller HOST:PORT --cache-dir DIR`.",
                          style="yellow"))
    if status["deployments"]:
        parts.append(deployments_table(status["deployments"]))
    else:
        parts.append(Text("No deployments: create one with `ember deploy NAME --checkpoint PATH`.", style="dim"))
    if status["instances"]:
        parts.append(instances_table(status["instances"]))
    if status["cold_starts"]:
        parts.append(cold_starts_table(status["cold_starts"], now))
    else:
        parts.append(Text("No cold starts since the controller started.", style="dim"))
    if status["migrations"]:
        parts.append(migrations_table(status["migrations"], now))
    else:
        parts.append(Text("No migrations yet.", style="dim"))
    for part in parts:
        console.print()
        console.print(part)
