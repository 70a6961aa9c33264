"""Building blocks of the trace generators: Mooncake-style block ids and seeded draws.

A prompt is built from content segments (``(segment id, tokens)``); a 512-token block's id is
interned from its parent's id and the segment pieces it covers, so equal ids mean equal prefixes,
as in the public traces.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

from benchmarks.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest

Segment = tuple[int, int]  # (segment id, tokens)


class BlockIds:
    """Interns 512-token blocks of segment sequences into Mooncake-style hash ids."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = {}

    def assign(self, segments: Sequence[Segment]) -> tuple[int, ...]:
        ids: list[int] = []
        parent, pieces, filled = -1, [], 0
        for seg_id, length in segments:
            pos = 0
            while pos < length:
                take = min(TRACE_BLOCK_TOKENS - filled, length - pos)
                pieces.append((seg_id, pos, pos + take))
                pos, filled = pos + take, filled + take
                if filled == TRACE_BLOCK_TOKENS:
                    parent = self._intern(parent, pieces)
                    ids.append(parent)
                    pieces, filled = [], 0
        if pieces:
            ids.append(self._intern(parent, pieces))
        return tuple(ids)

    def _intern(self, parent: int, pieces: list[tuple[int, int, int]]) -> int:
        key = (parent, tuple(pieces))
        block_id = self._ids.get(key)
        if block_id is None:
            block_id = self._ids[key] = len(self._ids)
        return block_id


class TraceBuilder:
    """Seeded draws, fresh segment ids and request assembly, shared by every generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.blocks = BlockIds()
        self._segments = itertools.count()

    def segment(self, tokens: int) -> Segment:
        return (next(self._segments), tokens)

    def lognormal(self, median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, self.rng.lognormvariate(math.log(median), sigma))))

    def seconds(self, median_s: float, sigma: float, low_s: float, high_s: float) -> float:
        """A lognormal duration (think time, tool latency), clipped to ``[low_s, high_s]``."""
        return min(high_s, max(low_s, self.rng.lognormvariate(math.log(median_s), sigma)))

    def zipf_weights(self, n: int, s: float) -> list[float]:
        return [1.0 / (k + 1) ** s for k in range(n)]

    def request(self, t_s: float, segments: Sequence[Segment], output: int) -> TraceRequest:
        return TraceRequest(
            timestamp_ms=round(t_s * 1000.0, 3),
            input_length=sum(length for _, length in segments),
            output_length=output,
            hash_ids=self.blocks.assign(segments),
        )
