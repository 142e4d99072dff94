"""Run the commands a Markdown document shows, so the docs cannot rot (used by test_docs_commands.py).

What runs:
- every ```console block: each `$ ` line is a command (a trailing `\\` continues it on the next
  line); the lines after it, up to the next `$ `, are output it must print, in that order
  (whitespace-insensitive, `…` matches anything). Commands run with bash in one scratch directory
  per document, `.venv/bin` first on PATH, HOME inside the scratch directory, and must exit 0;
  `export NAME=VALUE` sets NAME for the document's later commands, as in the reader's shell;
- every ```python block, with the same Python, which must exit 0.

An HTML comment right before a block changes how it runs:
- `<!-- doctest: background -->`: its one command is a server (`ember serve`, `ember controller`)
  started in the background and stopped after the document; it gets `--port` and
  `--grpc-port 0` unless the command gives them, and the block's output lines must appear in its
  log before the next block runs;
- `<!-- doctest: exit N -->`: every command of the block must exit with status N;
- `<!-- doctest: skip REASON -->`: not run (the reason is required).

Documents use the default URL http://127.0.0.1:8080; the runner replaces port 8080 with a free
port of its own, also in EMBER_URL, so documents never touch a real controller.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DOC_PORT = 8080
MARKER = re.compile(r"^<!--\s*doctest:\s*(?P<kind>background|exit|skip)\b\s*(?P<arg>.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_-]*)\s*$")


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    commands: list[Command] = field(default_factory=list)
    code: str = ""  # python blocks
    background: bool = False
    exit_code: int = 0
    skip: str | None = None


def parse(markdown: str) -> list[Block]:
    blocks: list[Block] = []
    marker: re.Match | None = None
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        fence = FENCE.match(line)
        if fence and fence.group("lang") in ("console", "python"):
            body: list[str] = []
            start = i + 1
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            block = Block(fence.group("lang"), start)
            if marker is not None:
                kind, arg = marker.group("kind"), marker.group("arg")
                if kind == "background":
                    block.background = True
                elif kind == "exit":
                    block.exit_code = int(arg)
                else:
                    if not arg:
                        raise ValueError(f"line {start}: a skipped block needs a reason: <!-- doctest: skip REASON -->")
                    block.skip = arg
            if block.lang == "python":
                block.code = "\n".join(body) + "\n"
            else:
                block.commands = _commands(body, start)
            blocks.append(block)
            marker = None
        elif fence:  # another language: skip over it whole
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            marker = None
        elif MARKER.match(line):
            marker = MARKER.match(line)
        elif line:
            marker = None
        i += 1
    return blocks


def _commands(body: list[str], start: int) -> list[Command]:
    commands: list[Command] = []
    k = 0
    while k < len(body):
        line = body[k]
        if line.startswith("$ "):
            text = line[2:]
            while text.endswith("\\") and k + 1 < len(body):
                k += 1
                text += "\n" + body[k]  # bash reads backslash-newline as a continuation
            commands.append(Command(text))
        elif line.strip():
            if not commands:
                raise ValueError(f"line {start + k}: output before any `$ ` command in a console block")
            commands[-1].expected.append(line)
        k += 1
    return commands


def _normal(text: str) -> str:
    return " ".join(text.split())


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in the output, in order ("…" matches anything; spacing is free)."""
    actual = [_normal(line) for line in output.splitlines()]
    position = 0
    missing = []
    for want in expected:
        pattern = re.compile(".*?".join(re.escape(part) for part in _normal(want).split("…")) + r"\Z", re.S)
        for k in range(position, len(actual)):
            if pattern.match(actual[k]):
                position = k + 1
                break
        else:
            missing.append(want)
    return missing


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DocRun:
    """Runs one document's blocks in order; call close() to stop its background servers."""

    def __init__(self, path: Path, workdir: Path) -> None:
        self.path = path
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
        self.env = {**env, "PATH": bin_dir + os.pathsep + env.get("PATH", ""), "HOME": str(home),
                    "EMBER_URL": self.url, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb",
                    "PYTHONUNBUFFERED": "1", "GRPC_ENABLE_FORK_SUPPORT": "0"}
        self.background: list[tuple[subprocess.Popen, Path]] = []

    def substitute(self, text: str) -> str:
        return re.sub(rf"(127\.0\.0\.1:|localhost:|--port ){DOC_PORT}\b", rf"\g<1>{self.port}", text)

    def where(self, block: Block) -> str:
        return f"{self.path.name}:{block.line}"

    def run(self, block: Block) -> None:
        if block.skip is not None:
            return
        if block.lang == "python":
            self._python(block)
        elif block.background:
            self._background(block)
        else:
            for command in block.commands:
                self._command(block, command)

    def _python(self, block: Block) -> None:
        result = subprocess.run([sys.executable, "-"], input=self.substitute(block.code), cwd=self.workdir,
                                env=self.env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{self.where(block)}: python block failed:\n{result.stdout}{result.stderr}"

    def _command(self, block: Block, command: Command) -> None:
        text = self.substitute(command.text)
        if text.startswith("export "):
            self._export(block, text)
            return
        result = subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=self.workdir, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        context = f"{self.where(block)}: `{command.text}` printed:\n{result.stdout}"
        assert result.returncode == block.exit_code, f"exit status {result.returncode}, not {block.exit_code}; {context}"
        missing = missing_lines([self.substitute(e) for e in command.expected], result.stdout)
        assert not missing, f"these lines were not printed (in this order): {missing}; {context}"

    def _export(self, block: Block, text: str) -> None:
        """`export NAME=…` holds for the document's later commands, as in the reader's shell."""
        result = subprocess.run(["bash", "-c", f"{text} && env -0"], cwd=self.workdir, env=self.env,
                                capture_output=True, timeout=60)
        assert result.returncode == 0, f"{self.where(block)}: `{text}` failed: {result.stderr.decode()}"
        self.env = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)

    def _background(self, block: Block) -> None:
        assert len(block.commands) == 1, f"{self.where(block)}: a background block holds one command"
        command = block.commands[0]
        text = self.substitute(command.text)
        if "--port" not in text:
            text += f" --port {self.port}"
        if "--grpc-port" not in text:
            text += " --grpc-port 0"
        log_path = self.workdir / f"background-{len(self.background)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["bash", "-c", "exec " + text], cwd=self.workdir, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((proc, log_path))
        expected = [self.substitute(e) for e in command.expected]
        deadline = time.monotonic() + 240
        while True:
            output = log_path.read_text(errors="replace")
            if self._ready() and not missing_lines(expected, output):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.where(block)}: `{command.text}` "
                                     f"{'exited' if proc.poll() is not None else 'never got ready'}; "
                                     f"missing {missing_lines(expected, output)}; it printed:\n{output[-5000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def close(self) -> None:
        for proc, _ in self.background:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log_path in self.background:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
