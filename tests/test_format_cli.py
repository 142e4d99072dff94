"""`ember convert`, `ember inspect`, `ember demo-model`: output, exit codes, friendly errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ember.cli.main import app
from ember.ckpt_format import open_checkpoint

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    assert "Traceback" not in result.output, result.output
    return result


def flat(result) -> str:
    """Output with rich's line wrapping undone, for matching error messages."""
    return " ".join(result.output.split())


def test_convert_and_inspect(demo_hf_dir, tmp_path):
    dst = tmp_path / "tiny.ember"
    result = run("convert", str(demo_hf_dir), str(dst), "--partitions", "2")
    assert result.exit_code == 0, result.output
    assert "converted 21 tensors" in result.output and "2 partition(s)" in result.output and "MB/s" in result.output
    index = open_checkpoint(dst)

    result = run("inspect", str(dst))
    assert result.exit_code == 0, result.output
    assert "ember-checkpoint v1" in result.output and "2, 8.5 MB, alignment 4096" in result.output
    assert "xxh3-64 per 4 MiB chunk" in result.output
    assert "model.layers.1.mlp.down_proj.weight" in result.output and "LlamaForCausalLM" in result.output
    assert "index valid" in result.output

    result = run("inspect", str(dst), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == index.to_json()

    result = run("inspect", str(dst), "--verify")
    assert result.exit_code == 0 and "all checksums verified" in result.output


def test_convert_refuses_existing_destination(demo_checkpoint, demo_hf_dir):
    result = run("convert", str(demo_hf_dir), str(demo_checkpoint))
    assert result.exit_code == 1
    assert "error: destination" in flat(result) and "already exists" in flat(result)
    assert "hint:" in flat(result) and "--overwrite" in flat(result)


def test_convert_overwrite(demo_hf_dir, tmp_path):
    dst = tmp_path / "x.ember"
    torch.save({"a": torch.ones(2)}, tmp_path / "a.pt")
    assert run("convert", str(tmp_path / "a.pt"), str(dst)).exit_code == 0
    result = run("convert", str(demo_hf_dir), str(dst), "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(open_checkpoint(dst).tensors) == 21


def test_convert_bad_source(tmp_path):
    result = run("convert", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "error: conversion source not found" in flat(result)
    result = run("convert", str(tmp_path), str(tmp_path / "out"), "--partitions", "0")
    assert result.exit_code != 0


def test_inspect_verify_names_corrupt_chunk(demo_checkpoint, tmp_path):
    ckpt = tmp_path / "copy"
    shutil.copytree(demo_checkpoint, ckpt)
    part = ckpt / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[(4 << 20) + 123] ^= 0xFF
    part.write_bytes(bytes(data))
    assert run("inspect", str(ckpt)).exit_code == 0  # sizes are fine: only --verify reads data
    result = run("inspect", str(ckpt), "--verify")
    assert result.exit_code == 1
    assert "part-00000.bin" in result.output and "checksum mismatch in chunk 1" in flat(result)
    assert "re-run `ember convert`" in flat(result)


def test_inspect_refuses_future_version(demo_checkpoint, tmp_path):
    ckpt = tmp_path / "copy"
    shutil.copytree(demo_checkpoint, ckpt)
    doc = json.loads((ckpt / "ember.json").read_text())
    doc["version"] = 9
    (ckpt / "ember.json").write_text(json.dumps(doc))
    result = run("inspect", str(ckpt))
    assert result.exit_code == 1
    assert "newer Ember" in flat(result) and "upgrade" in flat(result)


def test_demo_model_command(tmp_path):
    result = run("demo-model", str(tmp_path / "m"), "--size", "tiny", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "wrote tiny demo model" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    result = run("demo-model", str(tmp_path / "m2"), "--size", "huge")
    assert result.exit_code == 1 and "unknown demo model size 'huge'" in flat(result)


@pytest.mark.parametrize("args", [["inspect", "/nonexistent/ckpt"], ["convert", "/nonexistent/src", "/tmp/never"]])
def test_real_process_errors_have_no_traceback(args):
    proc = subprocess.run([sys.executable, "-m", "ember.cli.main", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "hint: " in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
