"""What the scheduler-side connector tells its workers each engine step."""

from __future__ import annotations

import dataclasses

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclasses.dataclass
class HoldSpec:
    """Prefill side: keep these blocks of a finished request for the decode side."""

    transfer_id: str
    request_id: str
    block_ids: list[int]


@dataclasses.dataclass
class LoadSpec:
    """Decode side: pull a request's prompt blocks from a prefill engine.

    ``remote_block_ids[first_block:]`` are copied into ``local_block_ids``. A spec with no
    local blocks (and no request waiting on it) only tells the prefill side to let go.
    """

    transfer_id: str
    request_id: str | None
    remote_host: str
    remote_base_port: int
    first_block: int
    local_block_ids: list[int]

    @property
    def is_release_only(self) -> bool:
        return not self.local_block_ids


@dataclasses.dataclass
class PDConnectorMetadata(KVConnectorMetadata):
    holds: list[HoldSpec] = dataclasses.field(default_factory=list)
    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    lease_s: float = 30.0
