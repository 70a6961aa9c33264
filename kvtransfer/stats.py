"""Transfer counters and gauges, carried to the engine's stat loggers by vLLM itself.

vLLM merges stats with ``aggregate``: the workers' stats of one step (summed by its output
aggregator), then the scheduler side's (``PDScheduler.take_stats``), then every step of a logging
interval, oldest first. So:

- a *counter* (``COUNTERS``, or any other int key) is a delta since the last report, and sums;
- a *gauge* (``GAUGES``) is a level, reported by the scheduler side only when it changed, and
  is never summed: the newest value wins, and a report without the key keeps the last value.

A stat logger must therefore add counters to its totals and *set* gauges to the reported value
when the key is present (``is_gauge(name)``), leaving them unchanged when it is absent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTERS = (
    "num_bytes_sent",  # prefill workers: KV bytes sent over links
    "num_bytes_received",  # decode workers: KV bytes received and scattered
    "num_loads",  # decode workers: loads finished, ok or not
    "num_failed_loads",  # decode workers: loads that failed (the prompt is recomputed)
    "num_claims_sent",  # decode workers: CLAIM messages sent
    "num_read_fallbacks",  # decode workers: pairs offered direct reads whose probe failed
    "num_bad_specs",  # workers: hold or load specs refused (the request fails, the engine lives)
    "num_duplicate_holds",  # prefill scheduler: a second hold under a held transfer id, refused
    "num_busy_holds",  # prefill scheduler: holds refused at max_held_blocks (answered busy)
    "num_duplicate_loads",  # decode scheduler: requests that shared a transfer id with another
    "num_hook_errors",  # either side: unexpected errors a connector hook swallowed
    "num_expired_holds",  # prefill workers: holds whose lease ran out, never confirmed
    # prefill workers (kvtransfer/producer_peer.py):
    "num_pulls", "num_failed_sends", "num_protocol_errors", "num_auth_failures", "num_busy",
    "num_layout_mismatches",
    "num_links_opened", "num_link_failures", "num_links_closed", "num_internal_errors",
    "num_read_pairs",  # decode peers that read the blocks themselves (kvtransfer/reads.py)
)
GAUGES = ("num_held_blocks",)  # prefill scheduler: KV blocks held for decode right now
# Per-transfer samples (lists, concatenated when stats merge), from decode workers:
SAMPLES = ("xfer_time_seconds",  # one successful load's duration, PULL to scattered blocks
           "pull_wait_seconds",  # one successful part's wait from PULL to the peer's SENDING
           "num_blocks_per_transfer")  # one successful load's blocks


def is_gauge(name: str) -> bool:
    return name in GAUGES


@dataclasses.dataclass
class TransferStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for name in COUNTERS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> TransferStats:
        for name, value in other.data.items():
            if isinstance(value, list):
                self.data[name] = [*self.data.get(name, []), *value]
            elif is_gauge(name):
                self.data[name] = value  # newest wins
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """For vLLM's log line: samples as their mean."""
        return {name: (sum(value) / len(value) if value else 0) if isinstance(value, list)
                else value for name, value in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in (*COUNTERS, *SAMPLES)) and not any(
            name in self.data for name in GAUGES)

    @classmethod
    def from_counts(cls, counts: dict[str, Any]) -> TransferStats:
        """Counters (missing ones are 0), other int counters, and the gauges present."""
        data = {name: int(counts.get(name, 0)) for name in COUNTERS}
        for name, value in counts.items():
            if name not in data and (type(value) is int or
                                     (name in SAMPLES and isinstance(value, list))):
                data[name] = list(value) if isinstance(value, list) else value
        return cls(data=data)
