"""A replica's prefix cache: a finite LRU of blocks that publishes KV events like vLLM's engine.

Blocks are keyed by the index's chained hashes; the events carry opaque engine hashes (a fixed
bijection of those) and the blocks' pseudo-tokens, so the index has to do what it does with a
real engine: recompute its own hashes from tokens, and map engine hashes back on removal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from router.kvindex import KVEvent, RemovedBlocks, StoredBlocks

_ENGINE_SALT = 0x9E3779B97F4A7C15


def engine_hash(chain: int) -> int:
    """The engine's (opaque) hash of a block: not the index's own hash."""
    return chain ^ _ENGINE_SALT


class LRUBlockCache:
    """Holds at most ``capacity`` blocks; evicts the least recently used and reports it."""

    def __init__(self, capacity: int, publish: Callable[[KVEvent], None]) -> None:
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._publish = publish
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.num_events = 0  # block events published (stored + removed blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, chain: int) -> bool:
        return chain in self._blocks

    def cached_prefix(self, chains: Sequence[int]) -> int:
        """Leading blocks of ``chains`` that are cached, without touching them."""
        hit = 0
        for chain in chains:
            if chain not in self._blocks:
                break
            hit += 1
        return hit

    def lookup(self, chains: Sequence[int]) -> int:
        """Leading blocks of ``chains`` that are cached; they become most recently used."""
        hit = self.cached_prefix(chains)
        for chain in chains[:hit]:
            self._blocks.move_to_end(chain)
        return hit

    def store(self, chains: Sequence[int], tokens: Sequence[int]) -> None:
        """Cache every block of a computed prompt (``tokens``: one pseudo-token per block)."""
        blocks = self._blocks
        run_start: int | None = None
        for i, chain in enumerate(chains):
            if chain in blocks:
                blocks.move_to_end(chain)
                if run_start is not None:
                    self._stored(chains, tokens, run_start, i)
                    run_start = None
                continue
            blocks[chain] = None
            if run_start is None:
                run_start = i
        if run_start is not None:
            self._stored(chains, tokens, run_start, len(chains))
        self._evict_overflow(keep=set(chains))

    def _stored(self, chains: Sequence[int], tokens: Sequence[int], start: int, end: int) -> None:
        parent = engine_hash(chains[start - 1]) if start else None
        hashes = [engine_hash(c) for c in chains[start:end]]
        self._publish(StoredBlocks(hashes, parent, list(tokens[start:end]), 1))
        self.num_events += end - start

    def _evict_overflow(self, keep: set[int]) -> None:
        blocks = self._blocks
        removed: list[int] = []
        while len(blocks) > self.capacity:
            chain, _ = blocks.popitem(last=False)
            if chain in keep and len(keep) < self.capacity:
                blocks[chain] = None  # in use by the request being stored; keep it
                continue
            removed.append(engine_hash(chain))
        if removed:
            self._publish(RemovedBlocks(removed))
            self.num_events += len(removed)
