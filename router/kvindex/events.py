"""KV cache events as the index consumes them, mirroring ``vllm.distributed.kv_events``.

The serving stack converts vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` into
these plain dataclasses (this package imports nothing from vLLM). Engine block hashes are opaque
to the index: it keeps, per replica, a map from engine hash to its own chained hash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import TypeAlias

# An engine's block hash: an int or bytes the index never interprets, only compares.
EngineHash: TypeAlias = Hashable

# Media the index tracks; blocks offloaded to CPU or storage are not prefix-cache hits on the GPU.
TRACKED_MEDIA: frozenset[str | None] = frozenset({None, "GPU"})


@dataclasses.dataclass(frozen=True, slots=True)
class StoredBlocks:
    """Consecutive full blocks a replica just cached (vLLM ``BlockStored``).

    ``token_ids`` holds ``block_size`` tokens per block, in order; ``parent_block_hash`` is the
    engine hash of the block before the first one, ``None`` when they start the sequence.
    """

    block_hashes: Sequence[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: Sequence[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class RemovedBlocks:
    """Blocks a replica evicted (vLLM ``BlockRemoved``); only engine hashes are known."""

    block_hashes: Sequence[EngineHash]
    medium: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AllCleared:
    """The replica dropped its whole prefix cache (vLLM ``AllBlocksCleared``)."""


KVEvent: TypeAlias = StoredBlocks | RemovedBlocks | AllCleared
