"""Every command the hand-written docs show runs, against a real `ember serve` / `ember controller`
started the way the docs say (see doc_runner.py for the rules), and prints what the docs show."""

from __future__ import annotations

from pathlib import Path

import pytest
from doc_runner import DocRun, missing_lines, parse

DOCS = Path(__file__).resolve().parent.parent / "docs"
RUNNABLE = ["quickstart.md", "concepts.md", "troubleshooting.md"]
OWN = [*RUNNABLE, "cli.md", "http.md"]
# Commands a doc test cannot run, each with the reason it gives; anything else skipped is a mistake.
ALLOWED_SKIPS = {"make run", "make test", "source .venv/bin/activate"}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", RUNNABLE)
def test_every_command_in_the_doc_runs_and_prints_what_it_shows(name: str, tmp_path: Path) -> None:
    path = DOCS / name
    blocks = parse(path.read_text())
    skipped = {c.text.split("#")[0].strip() for b in blocks if b.skip for c in b.commands}
    assert skipped <= ALLOWED_SKIPS, f"{name} skips commands that could run: {skipped - ALLOWED_SKIPS}"
    run = DocRun(path, tmp_path)
    try:
        for block in blocks:
            run.run(block)
    finally:
        run.close()


def test_every_hand_written_doc_is_run_and_generated_ones_show_no_commands() -> None:
    for path in sorted(DOCS.glob("*.md")):
        blocks = parse(path.read_text())
        if path.name in ("cli.md", "http.md"):
            assert blocks == [], f"{path.name} is generated: it shows no commands to run"
        elif blocks and path.name not in RUNNABLE and path.name in OWN:
            raise AssertionError(f"{path.name} shows commands: add it to RUNNABLE")
    assert sum(len(b.commands) for b in parse((DOCS / "quickstart.md").read_text()) if not b.skip) >= 10


def test_the_runner_parses_markers_continuations_and_expected_output() -> None:
    blocks = parse(
        "<!-- doctest: background -->\n```console\n$ ember serve\nEmber is serving on …\n```\n\n"
        "<!-- doctest: exit 1 -->\n```console\n$ ember list \\\n  --json\nerror: …\n$ true\n```\n"
        "<!-- doctest: skip make test runs these tests -->\n\n```console\n$ make test\n```\n"
        "<!-- doctest: exit 1 -->\nsome prose resets the marker\n```console\n$ echo hi\nhi\n```\n"
        "```python\nprint(1)\n```\n```text\n$ not a command\n```\n"
    )
    assert [(b.lang, b.background, b.exit_code, b.skip) for b in blocks] == [
        ("console", True, 0, None), ("console", False, 1, None), ("console", False, 0, "make test runs these tests"),
        ("console", False, 0, None), ("python", False, 0, None)]
    assert blocks[1].commands[0].text == "ember list \\\n  --json" and blocks[1].commands[0].expected == ["error: …"]
    assert blocks[1].commands[1].expected == [] and blocks[4].code == "print(1)\n"
    with pytest.raises(ValueError, match="needs a reason"):
        parse("<!-- doctest: skip -->\n```console\n$ x\n```\n")


def test_the_runner_matches_lines_in_order_with_wildcards() -> None:
    output = "deployed tiny (/tmp/x/tiny.ember, 8.5 MB)\nready tiny-12ab on   local-0 (loaded from disk in 2.1 s)\n"
    assert missing_lines(["deployed tiny (…/tiny.ember, … MB)", "ready tiny-… on local-0 (…)"], output) == []
    assert missing_lines(["ready …", "deployed …"], output) == ["deployed …"]
    assert missing_lines(["deployed tiny"], output) == ["deployed tiny"]  # a whole line, not a prefix


def test_a_failing_command_fails_the_doc(tmp_path: Path) -> None:
    doc = tmp_path / "bad.md"
    doc.write_text("```console\n$ echo one\ntwo\n```\n")
    run = DocRun(doc, tmp_path)
    with pytest.raises(AssertionError, match="not printed"):
        run.run(parse(doc.read_text())[0])
    doc.write_text("```console\n$ false\n```\n")
    with pytest.raises(AssertionError, match="exit status 1, not 0"):
        run.run(parse(doc.read_text())[0])
