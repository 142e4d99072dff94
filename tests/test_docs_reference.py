"""docs/cli.md and docs/http.md are generated from the code and current; the docs' links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
OWN_DOCS = ["quickstart.md", "concepts.md", "cli.md", "http.md", "troubleshooting.md"]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_committed_references_are_what_the_code_generates() -> None:
    for path, text in _generator().outputs().items():
        assert path.read_text() == text, f"{path.name} is out of date: run `.venv/bin/python docs/gen_reference.py`"


def test_the_references_cover_every_command_and_route() -> None:
    gen = _generator()
    cli = (DOCS / "cli.md").read_text()
    for command in ("serve", "deploy", "status", "invoke", "convert", "worker", "controller"):
        assert f"## ember {command}\n" in cli
    assert "`--wait`" in cli and "`--json`" in cli
    spec = gen.openapi_spec()
    http = (DOCS / "http.md").read_text()
    for path, methods in spec["paths"].items():
        for method in methods:
            assert f"## {method.upper()} {path}\n" in http
    assert "### Status\n" in http and "### ColdStart\n" in http


def _anchors(markdown: str) -> set[str]:
    return {re.sub(r"[^a-z0-9 -]", "", m.lower()).replace(" ", "-") for m in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_links_between_docs_resolve() -> None:
    for name in OWN_DOCS:
        text = (DOCS / name).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (DOCS / file).resolve() if file else DOCS / name
            assert dest.exists(), f"{name} links to {target}, which does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest.read_text()), f"{name} links to {target}: no such heading"
