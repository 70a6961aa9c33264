"""Traces in the public Mooncake format: JSON lines of ``timestamp`` (ms), ``input_length``,
``output_length`` and ``hash_ids`` (one id per 512-token block of the prompt, the trailing partial
block included; equal ids at equal positions mean equal prefixes)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from router.kvindex import hash_token_blocks

# Tokens per hash id in the Mooncake format.
TRACE_BLOCK_TOKENS = 512


@dataclasses.dataclass(frozen=True, slots=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    @property
    def num_full_blocks(self) -> int:
        """Blocks of the prompt a prefix cache can hold (the trailing partial one cannot)."""
        return min(len(self.hash_ids), self.input_length // TRACE_BLOCK_TOKENS)

    @property
    def full_block_ids(self) -> tuple[int, ...]:
        return self.hash_ids[: self.num_full_blocks]

    def to_json(self) -> str:
        record = {
            "timestamp": round(self.timestamp_ms, 3),
            "input_length": self.input_length,
            "output_length": self.output_length,
            "hash_ids": list(self.hash_ids),
        }
        return json.dumps(record, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> TraceRequest:
        record = json.loads(line)
        return cls(
            timestamp_ms=float(record["timestamp"]),
            input_length=int(record["input_length"]),
            output_length=int(record["output_length"]),
            hash_ids=tuple(int(h) for h in record["hash_ids"]),
        )


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a Mooncake-format trace, sorted by timestamp."""
    with open(path, encoding="utf-8") as lines:
        requests = [TraceRequest.from_json(line) for line in lines if line.strip()]
    return sorted(requests, key=lambda r: r.timestamp_ms)


def save_trace(requests: Iterable[TraceRequest], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for request in requests:
            out.write(request.to_json() + "\n")


def chain_hashes(request: TraceRequest) -> list[int]:
    """The index's chained hashes of a request's full blocks (one pseudo-token per trace block)."""
    return hash_token_blocks(request.full_block_ids, 1)


def count_distinct_blocks(chains: Iterable[Sequence[int]]) -> int:
    """Distinct cacheable blocks over all requests' chained hashes."""
    seen: set[int] = set()
    for request_chains in chains:
        seen.update(request_chains)
    return len(seen)
