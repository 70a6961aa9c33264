"""The prefill side's table of KV blocks held for decode workers.

A finished prefill's blocks stay allocated until the decode side confirms it has them, or until
the hold's lease runs out. Each decode worker that pulls a hold (a *puller*, named by its peer
id) goes through:

    HELD --pull--> SENDING --sent--> SENT --DONE--> done
      ^               |
      +--send failed--+

and the hold is released once every puller is done. With equal TP sizes one decode worker pulls
each hold, and its DONE (``pullers`` 1, or none) releases it. With another TP size several
decode workers pull different heads of the same blocks, each at its own pace, and each DONE
says how many pullers there are (``kvtransfer.heads``); the hold is released when that many
distinct pullers have said DONE. A DONE without ``pullers`` (the decode side will not pull)
releases the hold at once. Either way a release waits for sends in flight to end.

    any hold, no send in flight, lease expired --> released
    CLAIM --> lease now + claim_lease_s (never shortened)

A hold with a send in flight does not expire: its blocks are being read. The producer guarantees
that every ``start_send`` is followed by one ``finish_send``: a send over a link in try/finally,
bounded by the link's deadline; a direct read (``kvtransfer.reads``) on the reader's DONE or at
its deadline (the endpoint's ``_expire_reads``). So no send stays in flight forever. Released
holds are handed to vLLM, by engine request id, through ``take_released`` so that it frees
their blocks. The table remembers the transfer ids of recently released or expired holds
(bounded in number and age) so that a late pull gets ``expired`` or ``state`` rather than
``unknown``.

Thread-safe: the endpoint's threads pull, claim and confirm; the worker's main thread adds and
reaps.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

from kvtransfer.protocol import ErrorCode


class HoldError(Exception):
    """A pull that the table cannot serve; ``code`` says why (unknown, expired, state, range)."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class Hold:
    request_id: str
    block_ids: list[int]
    deadline_s: float
    sending: set[str] = dataclasses.field(default_factory=set)  # pullers with a send in flight
    sent: set[str] = dataclasses.field(default_factory=set)  # pullers that got their blocks
    done: set[str] = dataclasses.field(default_factory=set)  # pullers that said DONE
    release_when_idle: bool = False  # released as soon as no send is in flight


class HoldTable:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        remember_s: float = 600.0,
        max_remembered: int = 10_000,
    ) -> None:
        self._clock = clock
        self._remember_s = remember_s
        self._max_remembered = max_remembered
        self._lock = threading.Lock()
        self._holds: dict[str, Hold] = {}
        self._released: set[str] = set()
        # transfer id -> (why it is gone: "expired" or "released", when)
        self._gone: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self.num_expired = 0  # holds whose lease ran out (never confirmed), since start

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    @property
    def num_held_blocks(self) -> int:
        """Blocks held by every hold still in the table (any state)."""
        with self._lock:
            return sum(len(hold.block_ids) for hold in self._holds.values())

    @property
    def num_sending(self) -> int:
        """Sends in flight right now (each ends within the link's deadline)."""
        with self._lock:
            return sum(len(hold.sending) for hold in self._holds.values())

    def add(self, transfer_id: str, request_id: str, block_ids: list[int], lease_s: float) -> None:
        with self._lock:
            if transfer_id in self._holds:
                raise HoldError(f"transfer {transfer_id} is already held", ErrorCode.STATE)
            self._gone.pop(transfer_id, None)
            self._holds[transfer_id] = Hold(request_id, list(block_ids), self._clock() + lease_s)

    def claim(self, transfer_id: str, lease_s: float) -> bool:
        """A decode scheduler took the transfer: keep it at least ``lease_s`` from now."""
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None:
                return False
            hold.deadline_s = max(hold.deadline_s, self._clock() + lease_s)
            return True

    def start_send(self, transfer_id: str, first_block: int, num_blocks: int,
                   puller: str = "") -> list[int]:
        """Mark ``puller``'s send in flight and return the block ids of the requested range.

        The caller must call ``finish_send`` once, whatever happens after this returns.
        """
        if type(first_block) is not int or type(num_blocks) is not int:
            raise HoldError("first_block and num_blocks must be ints", ErrorCode.RANGE)
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None:
                raise self._not_held(transfer_id)
            state = ("sending" if puller in hold.sending else "sent" if puller in hold.sent
                     else "released" if hold.release_when_idle else None)
            if state is not None:
                raise HoldError(f"transfer {transfer_id} is {state}, not held", ErrorCode.STATE)
            end = first_block + num_blocks
            if first_block < 0 or num_blocks < 0 or end > len(hold.block_ids):
                raise HoldError(
                    f"blocks [{first_block}, {end}) out of range for {len(hold.block_ids)} held",
                    ErrorCode.RANGE,
                )
            hold.sending.add(puller)
            return hold.block_ids[first_block:end]

    def blocks_in_flight(self, transfer_id: str, first_block: int, num_blocks: int,
                         puller: str) -> list[int]:
        """The block ids of a further range of ``puller``'s send in flight (a peer that reads
        a long transfer in ranges): no change of state."""
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None or puller not in hold.sending:
                raise HoldError(f"transfer {transfer_id} has no send in flight to {puller}",
                                ErrorCode.STATE)
            end = first_block + num_blocks
            if first_block < 0 or num_blocks < 0 or end > len(hold.block_ids):
                raise HoldError(
                    f"blocks [{first_block}, {end}) out of range for {len(hold.block_ids)} held",
                    ErrorCode.RANGE,
                )
            return hold.block_ids[first_block:end]

    def finish_send(self, transfer_id: str, ok: bool, puller: str = "") -> None:
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None or puller not in hold.sending:
                return
            hold.sending.discard(puller)
            if ok:
                hold.sent.add(puller)
            if hold.release_when_idle and not hold.sending:
                self._release(transfer_id, "released")

    def confirm(self, transfer_id: str, puller: str = "", pullers: int | None = None) -> bool:
        """``puller`` has the blocks (or will not pull them). Without ``pullers`` the hold is
        released; with it, once that many distinct pullers have confirmed. A release waits for
        the sends in flight to end. False when not held."""
        with self._lock:
            hold = self._holds.get(transfer_id)
            if hold is None:
                return False
            hold.done.add(puller)
            if pullers is None or len(hold.done) >= pullers:
                if hold.sending:
                    hold.release_when_idle = True
                else:
                    self._release(transfer_id, "released")
            return True

    def take_released(self) -> set[str]:
        """Engine request ids whose blocks may now be freed: confirmed or expired holds."""
        now = self._clock()
        with self._lock:
            for transfer_id, hold in list(self._holds.items()):
                if not hold.sending and hold.deadline_s <= now:
                    self._release(transfer_id, "expired")
                    self.num_expired += 1
            self._forget_old(now)
            released, self._released = self._released, set()
            return released

    def _release(self, transfer_id: str, why: str) -> None:
        hold = self._holds.pop(transfer_id)
        self._released.add(hold.request_id)
        self._gone[transfer_id] = (why, self._clock())
        self._gone.move_to_end(transfer_id)
        while len(self._gone) > self._max_remembered:
            self._gone.popitem(last=False)

    def _forget_old(self, now: float) -> None:
        while self._gone:
            _, (_, at) = next(iter(self._gone.items()))
            if at + self._remember_s > now:
                break
            self._gone.popitem(last=False)

    def _not_held(self, transfer_id: str) -> HoldError:
        gone = self._gone.get(transfer_id)
        if gone is None:
            return HoldError(f"transfer {transfer_id} is not held here (unknown, or not yet)",
                             ErrorCode.UNKNOWN)
        if gone[0] == "expired":
            return HoldError(f"transfer {transfer_id} expired: its lease ran out",
                             ErrorCode.EXPIRED)
        return HoldError(f"transfer {transfer_id} was already released", ErrorCode.STATE)
