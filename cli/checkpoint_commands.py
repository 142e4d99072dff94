"""`ember convert`, `ember inspect` and `ember demo-model`: the checkpoint-format commands.

Heavy modules (torch, transformers, tokenizers) load inside the commands that need them;
`ember inspect` needs none of them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ember.cli.errors import friendly_errors


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _bytes_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # in a pipe or a log a redrawn bar is noise
    )


@friendly_errors
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="HF model directory, .safetensors file, or torch state dict (.pt/.pth/.bin).")],
    dst: Annotated[Path, typer.Argument(help="Checkpoint directory to create.")],
    partitions: Annotated[int, typer.Option("--partitions", "-p", min=1, help="Number of partition files, balanced by bytes.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it is an existing Ember checkpoint.")] = False,
) -> None:
    """Convert a model into the Ember checkpoint format (atomic: DST appears only when complete)."""
    from ember.ckpt_format import convert

    console = Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    with _bytes_bar(console) as bar:
        task = bar.add_task("converting", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        index = convert(src, dst, partitions, overwrite=overwrite, progress=progress)
    elapsed = max(time.perf_counter() - started, 1e-9)
    nbytes = index.tensor_bytes
    aliases = f" (+{len(index.aliases)} aliases)" if index.aliases else ""
    console.print(
        f"[green]converted[/] {len(index.tensors)} tensors{aliases}, {_fmt_bytes(nbytes)} in "
        f"{len(index.partitions)} partition(s) to {index.path} in {elapsed:.2f} s "
        f"({nbytes / 1e6 / elapsed:.1f} MB/s)"
    )


@friendly_errors
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Ember checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the index as JSON instead of tables.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every partition and check all chunk checksums.")] = False,
) -> None:
    """Validate a checkpoint and show its index (the index is always validated; --verify also checks data)."""
    from ember.ckpt_format.checksum import verify_all
    from ember.ckpt_format.index import open_checkpoint

    console = Console(highlight=False, soft_wrap=True)
    index = open_checkpoint(path)
    if verify:
        with _bytes_bar(Console(stderr=True)) as bar:
            task = bar.add_task("verifying", total=index.total_bytes)
            verify_all(index, lambda n: bar.advance(task, n))
    if as_json:
        typer.echo(json.dumps(index.to_json(), indent=1))
        return
    chunk = index.chunk_bytes
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("checkpoint", str(index.path))
    header.add_row("format", f"ember-checkpoint v{index.version}")
    header.add_row("partitions", f"{len(index.partitions)}, {_fmt_bytes(index.total_bytes)}, alignment {index.alignment}")
    header.add_row("checksums", f"{index.checksum} per {chunk >> 20} MiB chunk" if chunk % (1 << 20) == 0 else f"{index.checksum} per {chunk} B chunk")
    if index.config:
        header.add_row("model", ", ".join(index.config.get("architectures") or []) or str(index.config.get("model_type", "?")))
    header.add_row("files", ", ".join(index.files) or "-")
    console.print(header)
    table = Table(show_edge=False)
    for col, justify in (("name", "left"), ("dtype", "left"), ("shape", "left"), ("part", "right"), ("offset", "right"), ("size", "right")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for t in index.tensors.values():
        table.add_row(t.name, t.dtype, str(list(t.shape)), str(t.partition), str(t.offset), str(t.nbytes))
    for alias, target in index.aliases.items():
        table.add_row(alias, "", f"→ {target}", "", "", "")
    console.print(table)
    status = "all checksums verified" if verify else "index valid (use --verify to check data checksums)"
    console.print(f"{len(index.tensors)} tensors, {len(index.aliases)} aliases; [green]{status}[/]")


@friendly_errors
def demo_model_cmd(
    dir: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    size: Annotated[str, typer.Option("--size", help="tiny (~10 MB fp32), small (~150 MB fp32) or medium (~1 GB bf16).")] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same bytes.")] = 0,
) -> None:
    """Build a random-weight Llama model with a locally trained tokenizer (nothing is downloaded)."""
    from ember.ckpt_format.demo_model import build_demo_model

    console = Console(highlight=False, soft_wrap=True)
    started = time.perf_counter()
    if console.is_terminal:
        with console.status(f"building the {size} demo model"):
            out = build_demo_model(dir, size=size, seed=seed)
    else:
        out = build_demo_model(dir, size=size, seed=seed)
    nbytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    console.print(f"[green]wrote[/] {size} demo model ({_fmt_bytes(nbytes)}) to {out} in {time.perf_counter() - started:.2f} s")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("demo-model")(demo_model_cmd)
