"""Fakes the server unit tests share."""

from __future__ import annotations

from typing import Any

from cluster.engine import StatsSnapshot
from cluster.worker_health import EngineHealth

# Transfer parameters as a prefill engine returns them.
PARAMS = {"do_remote_prefill": True, "transfer_id": "t1",
          "remote_addresses": [["127.0.0.1", 5555]], "remote_block_ids": [1, 2]}


class FakeEngine:
    """An ``OpenAIEngine``'s surface for the servers: ``call`` records each body and returns
    ``result``; ``errored`` makes it dead."""

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.errored = False
        self.stats = StatsSnapshot()
        self.health = EngineHealth(self, probe_workers=False)
        self.kv_events_endpoint = self.kv_events_replay_endpoint = None
        self.bodies: list[dict] = []

    @property
    def is_dead(self) -> bool:
        return self.errored

    async def check_health(self) -> None:
        pass

    async def call(self, kind: str, body: dict) -> Any:
        self.bodies.append(body)
        return self.result
