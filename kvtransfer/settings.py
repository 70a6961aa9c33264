"""The connector's settings, read from vLLM's ``kv_connector_extra_config``.

``TransferSettings`` are the ones a deployment configures (``cluster.config.KVTransferConfig``
is that class); deploy/ passes them through and adds ``host`` and ``port``, which are per
replica, to make ``ConnectorSettings``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TransferSettings(BaseModel):
    """How KV blocks move from prefill to decode, the same for every replica."""

    model_config = ConfigDict(extra="forbid")

    lease_s: float = Field(
        30.0, gt=0, description="How long a prefill worker holds blocks nobody claimed or pulled."
    )
    claim_lease_s: float = Field(
        300.0,
        gt=0,
        description="How long a prefill worker keeps holding blocks once a decode scheduler has "
        "claimed the transfer (the pull may wait for decode KV space).",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Limit for one block transfer over a link (data plane)."
    )
    control_timeout_s: float = Field(
        5.0, gt=0, description="Limit for one control reply (HELLO, PULL) from a prefill worker."
    )
    unknown_retry_s: float = Field(
        2.0,
        ge=0,
        description="How long a decode worker retries a pull for a transfer the prefill worker "
        "has not registered yet (the hold reaches it one engine step after the prefill ends).",
    )
    max_held_blocks: int | None = Field(
        None,
        ge=1,
        description="Cap on KV blocks one prefill engine holds for decode; past it the prefill "
        "scheduler holds no more and the request is answered busy. None: no cap.",
    )
    link_idle_s: float = Field(
        600.0,
        gt=0,
        description="A prefill worker closes a link to a decode worker idle this long (and "
        "deletes its rendezvous keys); the peer pairs again on its next pull.",
    )
    shared_memory: bool = Field(
        False,
        description="Move KV blocks through shared memory (/dev/shm) when a prefill worker and a "
        "decode worker share a host and their caches are in CPU memory "
        "(kvtransfer/link_shm.py); pairs on different hosts, or on GPUs, keep "
        "torch.distributed (Gloo, NCCL).",
    )
    direct_reads: bool = Field(
        True,
        description="Let a decode worker copy held blocks straight out of the prefill worker's "
        "cache when both share a host and their caches are in CPU memory (Linux "
        "process_vm_readv, kvtransfer/reads.py): no gather, no link, nothing for the prefill "
        "worker to do. A pair that cannot (another host, GPUs, a kernel that forbids it) finds "
        "out when it pairs and uses a link (shared_memory's, or torch.distributed).",
    )


class ConnectorSettings(TransferSettings):
    """``TransferSettings`` and where this replica's workers listen."""

    host: str = Field(
        "127.0.0.1",
        description="Address the workers listen on (ZMQ, TCPStore and Gloo bind it only) and "
        "advertise to their peers: the replica's node IP. A worker of vLLM's Ray executor uses "
        "its own node's address instead (kvtransfer.params.own_host).",
    )
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Base control port of a prefill engine: 0 lets each worker bind a free port "
        "and report it through vLLM's handshake metadata; otherwise worker i "
        "(pp_rank * tp + tp_rank) listens on port + i. Ignored on the decode side.",
    )

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        return cls.model_validate(dict(extra or {}))
