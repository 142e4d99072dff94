"""The worker's warm-up: libraries preloaded, startup objects frozen only while no model is loaded."""

from __future__ import annotations

import asyncio
import gc
import sys
from types import SimpleNamespace

from ember.worker.server import warm_up


def test_warm_up_preloads_and_freezes_only_when_no_instance_exists():
    agent = SimpleNamespace(instances={"busy": object()})

    async def scenario() -> None:
        task = asyncio.create_task(warm_up(agent, idle_poll_s=0.01))
        for _ in range(50):  # preload done, but an instance exists: it must keep waiting
            await asyncio.sleep(0.02)
            assert not task.done()
            if "transformers" in sys.modules:
                break
        assert gc.get_freeze_count() == 0
        agent.instances.clear()
        await asyncio.wait_for(task, timeout=60)

    gc.unfreeze()
    try:
        asyncio.run(scenario())
        assert "transformers" in sys.modules and "torch" in sys.modules
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
