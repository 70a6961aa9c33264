"""What the scheduler-side connector tells its workers each engine step, and what the workers
report back once at start-up (their bound addresses, through vLLM's handshake metadata)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)

from kvtransfer.params import Address


@dataclasses.dataclass
class HoldSpec:
    """Prefill side: keep these blocks of a finished request for the decode side."""

    transfer_id: str
    request_id: str
    block_ids: list[int]


@dataclasses.dataclass
class ClaimSpec:
    """Decode side: a scheduler took a request of this transfer; extend the hold's lease.

    Each decode worker sends CLAIM to the prefill workers it pulls from (``kvtransfer.heads``;
    with equal layouts, worker i to the prefill engine's worker i, at ``remote_addresses[i]``).
    """

    transfer_id: str
    remote_addresses: list[Address]
    remote_tp_size: int | None = None  # the prefill engine's TP; None: the same as ours


@dataclasses.dataclass
class LoadSpec:
    """Decode side: pull a request's prompt blocks from a prefill engine.

    ``remote_block_ids[first_block:]`` are copied into ``local_block_ids``. With equal layouts
    worker i pulls from the prefill engine's worker i, at ``remote_addresses[i]`` (its own
    node's host and port); with another prefill TP each decode worker pulls its heads from the
    prefill workers of its stage that hold them (``kvtransfer.heads``). A spec with no local
    blocks (and no request waiting on it) only tells the prefill side to let go (DONE).
    """

    transfer_id: str
    request_id: str | None
    remote_addresses: list[Address]
    first_block: int
    local_block_ids: list[int]
    remote_tp_size: int | None = None  # the prefill engine's TP; None: the same as ours

    @property
    def is_release_only(self) -> bool:
        return not self.local_block_ids


@dataclasses.dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    holds: list[HoldSpec] = dataclasses.field(default_factory=list)
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    claims: list[ClaimSpec] = dataclasses.field(default_factory=list)
    lease_s: float = 30.0


@dataclasses.dataclass
class PDHandshake(KVConnectorHandshakeMetadata):
    """One prefill worker's control endpoint, as it bound it: its own node's address (the
    workers of one engine may sit on several nodes) and its port (port 0 picks a free one)."""

    host: str
    port: int


@dataclasses.dataclass
class Outbox:
    """The scheduler side's specs for its workers' next step, and its counters: shared by its
    prefill and decode halves (``kvtransfer.scheduler``, ``kvtransfer.scheduler_decode``)."""

    counts: dict[str, int]
    holds: list[HoldSpec] = dataclasses.field(default_factory=list)
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    claims: list[ClaimSpec] = dataclasses.field(default_factory=list)
    warned: set[str] = dataclasses.field(default_factory=set)

    def warn(self, kind: str, message: str, *args: Any) -> None:
        """Log the first problem of each kind as a warning, later ones at debug level."""
        logging.getLogger("kvtransfer.scheduler").log(
            logging.DEBUG if kind in self.warned else logging.WARNING, message, *args)
        self.warned.add(kind)

    def take(self, lease_s: float) -> PDConnectorMetadata:
        """This step's specs (and the queues emptied for the next)."""
        meta = PDConnectorMetadata(self.holds, self.loads, self.claims, lease_s)
        self.holds, self.loads, self.claims = [], [], []
        return meta
