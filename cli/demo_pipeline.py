"""The local pipeline end to end, step by step, with each step timed.

This is what `make run` shows before a controller exists: it builds the demo model, converts
it to the Ember format, loads it with the fast loader and generates a few tokens. Every step is
the real code path, so a failure here is a real failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

console = Console(highlight=False)


@contextmanager
def step(title: str) -> Iterator[None]:
    console.print(f"[bold]{title}[/] …")
    started = time.perf_counter()
    yield
    console.print(f"  [green]done[/] in {time.perf_counter() - started:.2f} s")


def run(workdir: Path, size: str = "small", prompt: str = "The quick brown fox", max_new_tokens: int = 16) -> str:
    import torch
    from transformers import AutoTokenizer

    from ember.ckpt_format import convert
    from ember.ckpt_format.demo_model import build_demo_model
    from ember.loader import load_model

    hf_dir = workdir / f"demo-{size}-hf"
    ember_dir = workdir / f"demo-{size}.ember"
    with step(f"build the {size} demo model (random Llama, local tokenizer) in {hf_dir}"):
        if not (hf_dir / "config.json").exists():
            build_demo_model(hf_dir, size=size)
    with step(f"convert to the Ember format in {ember_dir}"):
        index = convert(hf_dir, ember_dir, overwrite=True)
    console.print(f"  {len(index.tensors)} tensors, {index.total_bytes / 1e6:.1f} MB")
    with step("load with ember.loader.load_model"):
        model = load_model(ember_dir, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(ember_dir)
    with step(f"generate {max_new_tokens} tokens (greedy) for {prompt!r}"):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    console.print(f"[bold]generated:[/] {prompt}[cyan]{text}[/]")
    return text


def main() -> None:
    workdir = Path(os.environ.get("EMBER_DEMO_DIR", Path.home() / ".cache" / "ember" / "demo"))
    workdir.mkdir(parents=True, exist_ok=True)
    run(workdir)


if __name__ == "__main__":
    main()
