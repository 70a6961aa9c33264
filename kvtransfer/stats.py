"""Transfer counters, carried from the workers to the engine's stat loggers by vLLM itself."""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTERS = ("num_bytes_sent", "num_bytes_received", "num_loads", "num_failed_loads")


@dataclasses.dataclass
class TransferStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> TransferStats:
        for name in COUNTERS:
            self.data[name] += other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    @classmethod
    def from_counts(cls, counts: dict[str, Any]) -> TransferStats:
        return cls(data={name: int(counts.get(name, 0)) for name in COUNTERS})
