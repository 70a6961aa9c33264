"""Per-replica bookkeeping of the KV index: a bit position and the blocks the replica holds."""

from __future__ import annotations

import dataclasses
import enum

from router.kvindex.keymap import EngineKeyMap


class ReplicaMode(enum.Enum):
    """Where the index's knowledge of a replica comes from."""

    EVENT_FED = "event_fed"  # the engine's own KV cache events: exact, evictions included
    GUESSED = "guessed"  # the router's own routing decisions, each forgotten after a TTL


@dataclasses.dataclass(eq=False)
class ReplicaState:
    """One replica as the index sees it. Owned by ``KVIndex``; never shared."""

    replica_id: str
    slot: int
    mode: ReplicaMode
    # Event-fed: engine hash -> chained hash.
    blocks: EngineKeyMap = dataclasses.field(default_factory=EngineKeyMap)
    # Event-fed, rare: chained hashes reached by more than one engine hash (count of the extra
    # ones), so that removing one engine hash keeps the block.
    extra_refs: dict[int, int] = dataclasses.field(default_factory=dict)
    # Guessed: chained hash -> monotonic time it expires.
    expiry: dict[int, float] = dataclasses.field(default_factory=dict)
    is_removed: bool = False

    @property
    def bit(self) -> int:
        return 1 << self.slot

    @property
    def num_blocks(self) -> int:
        """Distinct blocks this replica holds."""
        if self.mode is ReplicaMode.GUESSED:
            return len(self.expiry)
        return len(self.blocks) - sum(self.extra_refs.values())

    def chains(self) -> set[int]:
        """Distinct chained hashes this replica holds."""
        if self.mode is ReplicaMode.GUESSED:
            return set(self.expiry)
        return set(self.blocks.chains())

    def reset(self) -> None:
        self.blocks.clear()
        self.extra_refs = {}
        self.expiry = {}


class SlotTable:
    """Maps replica ids to small integers (bit positions), reusing the slots of removed ones."""

    def __init__(self) -> None:
        self.ids: list[str | None] = []
        self._free: list[int] = []

    def allocate(self, replica_id: str) -> int:
        if self._free:
            slot = min(self._free)
            self._free.remove(slot)
            self.ids[slot] = replica_id
            return slot
        self.ids.append(replica_id)
        return len(self.ids) - 1

    def release(self, slot: int) -> None:
        self.ids[slot] = None
        self._free.append(slot)
