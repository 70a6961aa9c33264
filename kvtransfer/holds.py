"""The prefill side's table of KV blocks held for decode workers.

A finished prefill's blocks stay allocated until the decode side confirms it has them, or until
the hold's lease runs out. One state machine per held request:

    HELD --pull--> SENDING --sent--> SENT --DONE--> released
      ^               |                |
      +---send failed-+                +--lease expired--> released
    HELD --lease expired--> released

A SENDING hold never expires: its blocks are being read. Released holds are handed to vLLM, by
engine request id, through ``take_released`` so that it frees their blocks. Thread-safe: the
transfer thread pulls and confirms, the worker's main thread adds and reaps.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable


class HoldState(enum.Enum):
    HELD = "held"
    SENDING = "sending"
    SENT = "sent"


class HoldError(Exception):
    """A pull that the table cannot serve (unknown transfer, wrong state, bad range)."""


@dataclasses.dataclass
class Hold:
    request_id: str
    block_ids: list[int]
    deadline_s: float
    state: HoldState = HoldState.HELD


class HoldTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._holds: dict[str, Hold] = {}
        self._released: set[str] = set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    def add(self, transfer_id: str, request_id: str, block_ids: list[int], lease_s: float) -> None:
        with self._lock:
            if transfer_id in self._holds:
                raise HoldError(f"transfer {transfer_id} is already held")
            self._holds[transfer_id] = Hold(request_id, list(block_ids), self._clock() + lease_s)

    def start_send(self, transfer_id: str, first_block: int, num_blocks: int) -> list[int]:
        """Mark the hold SENDING and return the block ids of the requested range."""
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None:
                raise HoldError(f"transfer {transfer_id} is not held here (expired or unknown)")
            if hold.state is not HoldState.HELD:
                raise HoldError(f"transfer {transfer_id} is {hold.state.value}, not held")
            end = first_block + num_blocks
            if first_block < 0 or num_blocks < 0 or end > len(hold.block_ids):
                raise HoldError(
                    f"blocks [{first_block}, {end}) out of range for {len(hold.block_ids)} held"
                )
            hold.state = HoldState.SENDING
            return hold.block_ids[first_block:end]

    def finish_send(self, transfer_id: str, ok: bool) -> None:
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is not None and hold.state is HoldState.SENDING:
                hold.state = HoldState.SENT if ok else HoldState.HELD

    def confirm(self, transfer_id: str) -> bool:
        """The decode side has the blocks (or will not pull them): release the hold."""
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None or hold.state is HoldState.SENDING:
                return False
            del self._holds[transfer_id]
            self._released.add(hold.request_id)
            return True

    def take_released(self) -> set[str]:
        """Engine request ids whose blocks may now be freed: confirmed or expired holds."""
        now = self._clock()
        with self._lock:
            for transfer_id, hold in list(self._holds.items()):
                if hold.state is not HoldState.SENDING and hold.deadline_s <= now:
                    del self._holds[transfer_id]
                    self._released.add(hold.request_id)
            released, self._released = self._released, set()
            return released
