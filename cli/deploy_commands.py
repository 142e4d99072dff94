"""`ember deploy | list | get | delete | invoke | status`: manage models as functions on a controller.

Every command talks HTTP to the controller through ember.api.client (never importing the
controller itself), found by --url or EMBER_URL (default http://127.0.0.1:8080), and sends
EMBER_API_KEY as a bearer token when it is set. Listings print rich tables, or JSON with --json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from ember.cli.errors import friendly_errors
from ember.cli.progress import PercentProgress
from ember.cli.tables import deployments_table, human_bytes, instances_table, print_status, seconds

# soft_wrap: a long line (a path, a URL, a command to copy) stays one line, as scripts expect.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

URL_OPTION = typer.Option(None, "--url", envvar="EMBER_URL", help="Controller URL (default http://127.0.0.1:8080).")
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _client(url: Optional[str]):
    from ember.api.client import EmberClient

    return EmberClient(url)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@friendly_errors
def deploy(
    name: str = typer.Argument(..., help="Deployment (function) name: letters, digits, '.', '_' or '-'."),
    checkpoint: str = typer.Option(..., "--checkpoint", help="Ember checkpoint: local path or s3://bucket/prefix."),
    min_instances: Optional[int] = typer.Option(None, "--min", help="Instances kept warm (default 0: scale to zero)."),
    max_instances: Optional[int] = typer.Option(None, "--max", help="Most instances (default 4)."),
    keep_alive: Optional[float] = typer.Option(None, "--keep-alive", help="Seconds idle before scale-in (default 60)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Target requests per instance (default 8)."),
    queue_limit: Optional[int] = typer.Option(None, "--queue-limit", help="Queued requests before 429 (default 100)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Request timeout in seconds (default 300)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Inference backend (default transformers)."),
    wait: bool = typer.Option(
        False, "--wait", help="Return once an instance is ready (--min of them when --min > 0); with --min 0 this "
        "starts one with a one-token request, and it stays warm for --keep-alive seconds."
    ),
    wait_timeout: float = typer.Option(600.0, "--wait-timeout", help="Seconds --wait waits before failing."),
    url: Optional[str] = URL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Deploy a model as a function; it starts on its first request unless --min > 0."""
    if "://" not in checkpoint:
        # A relative path means this shell's directory, not the controller's.
        checkpoint = str(Path(checkpoint).expanduser().resolve())
    with _client(url) as client:
        d = client.deploy(name, checkpoint, min_instances=min_instances, max_instances=max_instances,
                          keep_alive_s=keep_alive, target_concurrency=concurrency, queue_limit=queue_limit,
                          request_timeout_s=timeout, backend=backend)
        if not as_json:
            console.print(f"[green]deployed[/] {d['name']} ({d['checkpoint']}, {human_bytes(d.get('checkpoint_bytes'))})")
        ready: list[dict] = []
        if wait:
            ready = _wait_until_ready(client, d, wait_timeout)
            d = client.get_deployment(name)
    if as_json:
        _print_json({**d, "ready_instances": ready} if wait else d)
        return
    for i in ready:
        took = f" in {seconds(i['actual_ready_s'])}" if i.get("actual_ready_s") is not None else ""
        console.print(f"[green]ready[/] {i['id']} on {i['node']} (loaded from {i.get('source_tier') or '?'}{took})")
    console.print(f"  invoke: ember invoke {d['name']} 'Hello'   or   POST {client.url}/functions/{d['name']}/invoke")


def _wait_until_ready(client, d: dict, timeout_s: float) -> list[dict]:
    """Block until the deployment has its instances ready, showing the load's progress."""
    from ember.api.client import ApiError

    name, wanted = d["name"], max(1, d["min_instances"])
    deadline = time.monotonic() + timeout_s
    with PercentProgress(err_console, f"starting {name}") as progress:
        if d["min_instances"] == 0:
            # Scaled to zero: nothing starts before a request, so send the smallest one.
            done: dict = {}
            for event in client.invoke_stream(name, "Hello", max_tokens=1):
                if event["kind"] == "loading":
                    progress.update(event["percent"], event["message"])
                    if time.monotonic() > deadline:
                        raise ApiError(f"{name} was not ready after {timeout_s:g} s ({event['message']})",
                                       hint="raise --wait-timeout for big models; `ember status` shows the load")
                elif event["kind"] == "done":
                    done = dict(event)
            instances = client.list_instances(name)
            return [i for i in instances if i["id"] == done.get("instance")] or \
                [i for i in instances if i["state"] == "ready"][:1]
        while True:
            instances = client.list_instances(name)
            ready = [i for i in instances if i["state"] == "ready"]
            if len(ready) >= wanted:
                return ready
            states = ", ".join(f"{sum(i['state'] == s for i in instances)} {s}" for s in ("ready", "loading", "starting"))
            progress.update(100 * len(ready) / wanted, states)
            error = client.get_deployment(name).get("last_error")
            if error and not any(i["state"] in ("starting", "loading") for i in instances):
                raise ApiError(f"{name} could not start an instance: {error}",
                               hint="see `ember status` and the worker logs; fix the cause, then run "
                                    f"`ember deploy {name} …` again or `ember delete {name}`")
            if time.monotonic() > deadline:
                raise ApiError(f"{len(ready)} of {wanted} instance(s) of {name} ready after {timeout_s:g} s",
                               hint="see `ember status` (nodes up? room on them?); raise --wait-timeout for big models")
            time.sleep(0.5)


@friendly_errors
def list_(url: Optional[str] = URL_OPTION, as_json: bool = JSON_OPTION) -> None:
    """List deployments with their instances and queues."""
    with _client(url) as client:
        deployments = client.list_deployments()
    if as_json:
        _print_json({"data": deployments})
    elif not deployments:
        console.print("no deployments; create one with `ember deploy NAME --checkpoint PATH`")
    else:
        console.print(deployments_table(deployments))


@friendly_errors
def get(name: str = typer.Argument(..., help="Deployment name."), url: Optional[str] = URL_OPTION,
        as_json: bool = JSON_OPTION) -> None:
    """Show one deployment and its instances."""
    with _client(url) as client:
        d = client.get_deployment(name)
        instances = client.list_instances(name)
    if as_json:
        _print_json({**d, "instance_list": instances})
        return
    console.print(deployments_table([d]))
    if d.get("last_error"):
        console.print(f"[red]last error:[/] {d['last_error']}")
    if instances:
        console.print(instances_table(instances))


@friendly_errors
def delete(name: str = typer.Argument(..., help="Deployment name."), url: Optional[str] = URL_OPTION) -> None:
    """Delete a deployment: its instances are unloaded, queued requests answered 404."""
    with _client(url) as client:
        client.delete_deployment(name)
    console.print(f"[green]deleted[/] {name}")


@friendly_errors
def invoke(
    name: str = typer.Argument(..., help="Deployment name."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Tokens to generate (default 16)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 = greedy (default 1.0)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user chat message."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they come (default: all at the end)."),
    url: Optional[str] = URL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a prompt through a deployment (cold-starting it if needed)."""
    messages = [{"role": "user", "content": prompt}] if chat else None
    text_prompt = None if chat else prompt
    with _client(url) as client:
        if as_json:
            _print_json(client.invoke(name, text_prompt, messages=messages, max_tokens=max_tokens,
                                      temperature=temperature, seed=seed))
            return
        # Streamed either way, so a cold start shows its progress; without --stream the text prints at the end.
        text: list[str] = []
        final: dict | None = None
        with PercentProgress(err_console, f"cold start of {name}") as progress:
            for event in client.invoke_stream(name, text_prompt, messages=messages, max_tokens=max_tokens,
                                              temperature=temperature, seed=seed):
                if event["kind"] == "loading":
                    progress.update(event["percent"], event["message"])
                    continue
                progress.finish()
                if event["kind"] == "text" and stream:
                    sys.stdout.write(event["text"])
                    sys.stdout.flush()
                elif event["kind"] == "text":
                    text.append(event["text"])
                else:
                    final = dict(event)
        sys.stdout.write("".join(text) + "\n")
        if final is not None:
            _summary(final)


def _summary(result: dict) -> None:
    usage = result.get("usage") or {}
    cold = " (cold start)" if result.get("cold_start") else ""
    err_console.print(f"[dim]{result.get('finish_reason', '')}; {usage.get('prompt_tokens', 0)} prompt + "
                      f"{usage.get('completion_tokens', 0)} completion tokens; instance {result.get('instance')} on "
                      f"{result.get('node')}{cold}[/]")


@friendly_errors
def status(url: Optional[str] = URL_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Nodes (devices, tiers, cached checkpoints, bandwidths), deployments, instances, recent cold starts and
    migrations: the status page (GET /) in the terminal."""
    with _client(url) as client:
        snapshot = client.status()
    if as_json:
        _print_json(snapshot)
        return
    print_status(console, snapshot, client.url)


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    app.command("list")(list_)
    app.command("get")(get)
    app.command("delete")(delete)
    app.command("invoke")(invoke)
    app.command("status")(status)
