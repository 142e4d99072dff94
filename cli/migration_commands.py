"""`ember migrate INSTANCE [--to NODE]` and `ember drain NODE`: live migration from the command line.

Both talk HTTP to the controller (POST /v1/instances/{id}/migrate, POST /v1/nodes/{id}/drain)
and by default follow the operation to its end with a spinner, then print what moved: requests
handed over (by KV transfer or recompute), requests that stayed or finished where they were,
bytes moved. --no-wait prints the record the controller answered and returns at once.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

import typer
from rich.console import Console

from ember.cli.errors import friendly_errors

console = Console(highlight=False)

URL_OPTION = typer.Option(None, "--url", envvar="EMBER_URL", help="Controller URL (default http://127.0.0.1:8080).")
POLL_S = 0.5


def _client(url: Optional[str]):
    from ember.api.client import EmberClient

    return EmberClient(url)


def _summary(record: dict[str, Any]) -> str:
    requests = record.get("requests") or {}
    parts = [f"{requests.get('handed_over', 0)} request(s) moved"]
    modes = record.get("modes") or {}
    if modes:
        parts[0] += " (" + ", ".join(f"{n} by {'KV transfer' if m == 'kv' else 'recompute'}"
                                     for m, n in sorted(modes.items())) + ")"
    if requests.get("stayed"):
        parts.append(f"{requests['stayed']} stayed on the source")
    if requests.get("finished"):
        parts.append(f"{requests['finished']} finished before they could move")
    parts.append(f"{record.get('bytes', 0) / 1e6:.1f} MB sent")
    return ", ".join(parts)


@friendly_errors
def migrate(
    instance: str = typer.Argument(..., help="Instance id (see `ember status` or GET /v1/instances)."),
    to: Optional[str] = typer.Option(None, "--to", help="Destination node id (default: the scheduler picks)."),
    mode: str = typer.Option("auto", "--mode", help="auto (cost model per request) | kv | tokens."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the migration to its end."),
    as_json: bool = typer.Option(False, "--json", help="Print the migration record as JSON."),
    url: Optional[str] = URL_OPTION,
) -> None:
    """Move a running instance to another node without dropping its streams (live migration)."""
    if mode not in ("auto", "kv", "tokens"):
        raise typer.BadParameter(f"--mode must be auto, kv or tokens, got {mode!r}", param_hint="--mode")
    with _client(url) as client:
        record = client.migrate_instance(instance, node=to, mode=mode)
        if wait:
            with console.status(f"migrating {instance} to {record['destination_node']} …") as status:
                while record.get("finished_at") is None:
                    time.sleep(POLL_S)
                    record = client.get_migration(record["id"])
                    status.update(f"migrating {instance} to {record['destination_node']}: {record['state']} …")
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    if record.get("finished_at") is None:
        console.print(f"migration {record['id']} started: {instance} → new instance "
                      f"{record['destination_instance']} on {record['destination_node']}")
        return
    if record["state"] == "failed":
        from ember.cli.errors import exit_with

        exit_with(f"migration {record['id']} of {instance} failed: {record.get('message') or 'unknown reason'}",
                  "its requests go on where they were; `ember status` shows the instances")
    console.print(f"[green]moved[/] {instance} ({record['source_node']}) → {record['destination_instance']} "
                  f"({record['destination_node']}): {_summary(record)}")


@friendly_errors
def drain(
    node: str = typer.Argument(..., help="Node id (see `ember status` or GET /v1/nodes)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the drain until the node is empty."),
    undo: bool = typer.Option(False, "--undo", help="Let a drained node take new instances again."),
    as_json: bool = typer.Option(False, "--json", help="Print the drain record as JSON."),
    url: Optional[str] = URL_OPTION,
) -> None:
    """Move every instance off a node (live migration), e.g. before maintenance or scale-in."""
    with _client(url) as client:
        if undo:
            client.undrain_node(node)
            console.print(f"node {node} takes new instances again")
            return
        record = client.drain_node(node)
        if wait:
            with console.status(f"draining {node} …") as status:
                while record.get("finished_at") is None:
                    time.sleep(POLL_S)
                    record = client.get_drain(node)
                    left = next((n.get("instances", []) for n in client.list_nodes() if n["id"] == node), [])
                    status.update(f"draining {node}: {len(left)} instance(s) left, "
                                  f"{len(record['migrations'])} migration(s) …")
        migrations = [client.get_migration(m) for m in record["migrations"]]
    if as_json:
        sys.stdout.write(json.dumps({**record, "migration_records": migrations}, indent=2) + "\n")
        return
    if record.get("finished_at") is None:
        console.print(f"draining {node}: {len(record['migrations'])} instance(s) moving, "
                      f"{len(record['stopped'])} idle one(s) stopping")
        return
    console.print(f"[green]node {node} is drained[/]")
    for m in migrations:
        console.print(f"  {m['instance']} → {m['destination_instance']} ({m['destination_node']}): "
                      f"{m['state']}, {_summary(m)}" + (f" — {m['message']}" if m.get("message") else ""))
    for instance in record["finishing"]:
        console.print(f"  {instance}: no node could take it; its requests finished there")


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
    app.command("drain")(drain)
