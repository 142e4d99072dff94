"""`ember keys create|list|revoke`: API keys of a controller that requires them (admin key needed).

The new key is printed once, alone on stdout (so `KEY=$(ember keys create …)` works); the
controller keeps only its SHA-256.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from ember.cli.errors import friendly_errors

URL_OPTION = typer.Option(None, "--url", envvar="EMBER_URL", help="Controller URL (default http://127.0.0.1:8080).")

keys_app = typer.Typer(help="Create, list and revoke API keys (needs an admin key in EMBER_API_KEY).",
                       no_args_is_help=True)


def _client(url: Optional[str]):
    from ember.api.client import EmberClient

    return EmberClient(url)


@keys_app.command("create")
@friendly_errors
def create(
    name: str = typer.Argument(..., help="A name for the key (letters, digits, '.', '_' or '-')."),
    scope: str = typer.Option("invoke", "--scope", help="admin (everything) or invoke (call endpoints)."),
    deployments: Optional[str] = typer.Option(
        None, "--deployments", help="Comma-separated deployments an invoke key may call (default: all)."),
    url: Optional[str] = URL_OPTION,
) -> None:
    """Create a key and print it (once: it cannot be shown again)."""
    from ember.cli.errors import exit_with

    if scope not in ("admin", "invoke"):
        exit_with(f"--scope must be admin or invoke, got {scope!r}")
    names = [d.strip() for d in deployments.split(",") if d.strip()] if deployments is not None else None
    with _client(url) as client:
        created = client.create_key(name, scope, names)
    Console(stderr=True, highlight=False).print(
        f"created {created['scope']} key {created['name']!r}"
        + (f" for {', '.join(created['deployments'])}" if created.get("deployments") is not None else "")
        + "; it is shown only now:", soft_wrap=True)
    typer.echo(created["key"])


@keys_app.command("list")
@friendly_errors
def list_keys(url: Optional[str] = URL_OPTION) -> None:
    """The keys' names, scopes and deployments (never the keys)."""
    import time

    from rich.table import Table

    with _client(url) as client:
        keys = client.list_keys()
    table = Table("name", "id", "scope", "deployments", "created")
    for k in keys:
        deployments = "all" if k.get("deployments") is None else ", ".join(k["deployments"]) or "none"
        table.add_row(k["name"], k["id"], k["scope"], deployments,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"])))
    Console(highlight=False).print(table)


@keys_app.command("revoke")
@friendly_errors
def revoke(name: str = typer.Argument(..., help="The key's name or id."), url: Optional[str] = URL_OPTION) -> None:
    """Revoke a key: calls with it fail from now on (within a few seconds on other controllers)."""
    with _client(url) as client:
        revoked = client.revoke_key(name)
    typer.echo(f"revoked key {revoked['name']!r} ({revoked['id']})")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
