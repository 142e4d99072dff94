"""The status page in a real headless Chromium, served by a real `ember serve` with the tiny demo model.

`make test` installs Chromium (`make services`); outside make, on a machine without it, these
tests skip and say why (never pass silently). Set EMBER_UPDATE_SCREENSHOT=1 to refresh the
screenshot committed in docs/img/status-page.png.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from chromium_cdp import CHROMIUM_FLAGS, Chromium, chromium_binary

from ember.api.client import EmberClient

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parent.parent
SCREENSHOT = REPO / "docs" / "img" / "status-page.png"
WIDTH, HEIGHT = 1400, 900


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("MAKELEVEL") or os.environ.get("CI"):
            pytest.fail("chromium is not on PATH although `make test` should have installed it (make services)")
        pytest.skip("chromium is not installed: `apt-get install chromium`, or run `make test`, which installs it")
    return binary


@pytest.fixture(scope="module")
def serve(launch_serve, demo_checkpoint: Path):
    """`ember serve` with two local workers and the tiny model deployed twice (both scaled to zero)."""
    server = launch_serve(["--workers", "2"])
    with EmberClient(server.url) as client:
        client.deploy("tiny", str(demo_checkpoint), keep_alive_s=600)
        client.deploy("tiny-chat", str(demo_checkpoint), keep_alive_s=600, max_instances=2)
    return server


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_dump_dom_after_the_script_ran_shows_the_node_and_the_deployment(chromium: str, serve, tmp_path: Path) -> None:
    # Virtual time runs the page's timers (its 2 s refresh) without waiting for them in real time.
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", f"{serve.url}/"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dom = result.stdout
    refreshes = re.search(r'data-refreshes="(\d+)"', dom)
    assert refreshes and int(refreshes.group(1)) >= 1, "the page's script never refreshed it:\n" + dom[:3000]
    assert 'data-state="live"' in dom and "live · updated" in dom
    for node in ("local-0", "local-1"):
        assert re.search(rf'data-node="{node}" data-state="up"', dom), node
    row = re.search(r'<tr data-deployment="tiny">(.*?)</tr>', dom, re.S)
    assert row and "scaled to zero" in row.group(1) and "tiny.ember" in row.group(1)
    assert 'data-tier="dram"' in dom and 'data-tier="disk"' in dom and 'data-tier="s3"' in dom


def test_the_page_follows_a_cold_start_live_and_is_screenshotted(chromium: str, serve, tmp_path: Path) -> None:
    with EmberClient(serve.url) as client, Chromium(chromium, WIDTH, HEIGHT) as browser:
        browser.open(f"{serve.url}/")
        browser.wait_for("document.querySelector('[data-deployment=\"tiny\"]') !== null", "the deployment row")
        refreshes = browser.evaluate("Number(document.body.dataset.refreshes)")
        # A request while the page is open: it cold-starts an instance; the page must show it without a reload.
        result = client.invoke("tiny", "Hello", max_tokens=4)
        instance = result["instance"]
        [record] = [i for i in client.list_instances("tiny") if i["id"] == instance]
        browser.wait_for(f"document.querySelector('[data-cold-start=\"{instance}\"]') !== null",
                         f"the cold start of {instance} to appear")
        assert browser.evaluate("Number(document.body.dataset.refreshes)") > refreshes
        cold = browser.evaluate(f"document.querySelector('[data-cold-start=\"{instance}\"]').textContent")
        assert "tiny" in cold and result["node"] in cold and record["source_tier"] in cold, cold
        assert re.search(r"\d+(\.\d+)? (ms|s)", cold), cold  # estimated and actual times
        browser.wait_for(f"document.querySelector('[data-instance=\"{instance}\"][data-state=\"ready\"]') !== null",
                         "the instance to show as ready under its deployment")
        # The node that loaded it reports the checkpoint in its DRAM tier with its next heartbeat.
        browser.wait_for(
            f"(document.querySelector('[data-node=\"{result['node']}\"] [data-tier=\"dram\"]') || {{}}).innerText"
            f"?.includes('tiny.ember')", "the DRAM tier to list the cached checkpoint")
        summary = browser.evaluate("document.getElementById('summary').innerText")
        assert re.search(r"NODES UP\s+2\s*/\s*2", summary, re.I), summary
        assert "unreachable" not in browser.evaluate("document.getElementById('live').innerText")
        assert [c["instance"] for c in client.status()["cold_starts"]] == [instance]
        # A second model (same checkpoint): the screenshot shows both, and the second start's tier.
        second = client.invoke("tiny-chat", "Hello", max_tokens=4)["instance"]
        browser.wait_for(f"document.querySelector('[data-cold-start=\"{second}\"]') !== null",
                         f"the cold start of {second} to appear")
        shot = tmp_path / "status-page.png"
        browser.screenshot(shot)
    assert png_size(shot) == (WIDTH, HEIGHT)
    assert shot.stat().st_size > 20_000, "a blank page compresses to almost nothing"
    if os.environ.get("EMBER_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, SCREENSHOT)
    assert png_size(SCREENSHOT) == (WIDTH, HEIGHT), "docs/img/status-page.png: run with EMBER_UPDATE_SCREENSHOT=1"


def test_with_api_keys_the_page_asks_for_one_keeps_it_and_says_when_the_controller_is_gone(
        chromium: str, launch_controller) -> None:
    from conftest import TEST_ADMIN_KEY  # `ember controller` requires API keys; the fixture's admin key

    controller = launch_controller()
    with Chromium(chromium, WIDTH, HEIGHT) as browser:
        browser.open(f"{controller.url}/")
        browser.wait_for("document.getElementById('key-form') !== null", "the key form")
        assert "No worker node" not in browser.text()

        def submit(value: str) -> None:
            browser.evaluate(f"document.getElementById('key-input').value = {value!r};"
                             "document.getElementById('key-form').requestSubmit(); true")

        submit("ember_wrong_key")
        browser.wait_for("document.body.innerText.includes('not valid')", "the form again, saying the key is wrong")
        submit(TEST_ADMIN_KEY)
        browser.wait_for("document.body.innerText.includes('No worker node has registered')", "the status")
        # A page load cannot carry the key: after a reload the script sends the one this tab kept.
        browser.open(f"{controller.url}/")
        browser.wait_for("Number(document.body.dataset.refreshes) >= 1", "the status after a reload")
        assert browser.evaluate("document.getElementById('key-form')") is None
        controller.stop()
        state = browser.wait_for(
            "document.getElementById('live').dataset.state === 'error' && document.getElementById('live').innerText",
            "the live indicator to report the lost controller")
    assert "unreachable" in state and "retrying" in state
