"""The worker-side half of the connector (runs in each TP x PP worker process).

Prefill role: serve pulls of held blocks (``ProducerEndpoint``, bound on this worker's own node
address, ``kvtransfer.params.own_host``, since the workers of one engine may sit on several
nodes, and on a free port unless a fixed base port is set; the bound address goes to the
scheduler side through vLLM's handshake metadata) and report held requests as finished sending
once confirmed or expired, so vLLM frees their blocks.
Decode role: hand claims and load specs to the ``ConsumerEndpoint`` and report finished and
failed loads; failed ones fall back to recomputation in vLLM (``kv_load_failure_policy=recompute``).
With equal layouts, worker i of a prefill engine pairs with worker i of a decode engine (same
TP and PP rank); with different TP sizes each decode worker pulls its KV heads from the prefill
workers of its PP stage that hold them (kvtransfer.heads). The decode worker's link binds its
own node address too.

Nothing here raises into the engine on a bad spec: a hold that cannot be registered is reported
finished sending at once (vLLM frees its blocks), a load that cannot be queued is reported
failed (vLLM recomputes). Each is counted (``num_bad_specs``) and the first of each kind logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvtransfer.blocks import KVLayout
from kvtransfer.consumer import ConsumerEndpoint, LoadResults, Place
from kvtransfer.heads import model_kv_heads
from kvtransfer.holds import HoldError, HoldTable
from kvtransfer.link import TorchDistLink
from kvtransfer.link_shm import same_host_link
from kvtransfer.metadata import HoldSpec, LoadSpec, PDConnectorMetadata, PDHandshake
from kvtransfer.params import own_host
from kvtransfer.producer import ProducerEndpoint
from kvtransfer.protocol import Codec
from kvtransfer.reads import own_regions
from kvtransfer.settings import ConnectorSettings
from kvtransfer.stats import TransferStats

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

logger = logging.getLogger(__name__)


def worker_place(num_kv_heads: int | None) -> Place:
    """This worker's TP rank and size and PP rank, from vLLM's process groups."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return Place(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size(),
                 get_pp_group().rank_in_group, num_kv_heads)


class PDWorker:
    def __init__(self, vllm_config: VllmConfig, settings: ConnectorSettings, num_blocks: int):
        kv_config = vllm_config.kv_transfer_config
        parallel = vllm_config.parallel_config
        self._is_producer = kv_config.is_kv_producer
        self._is_consumer = kv_config.is_kv_consumer
        self._num_workers = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self._settings = settings
        self._num_blocks = num_blocks
        self._block_size = vllm_config.cache_config.block_size
        self._num_kv_heads, self._local_kv_heads = model_kv_heads(vllm_config)
        self.holds = HoldTable()
        self.producer: ProducerEndpoint | None = None
        self.consumer: ConsumerEndpoint | None = None
        self.counts = {"num_bad_specs": 0}
        self._warned: set[str] = set()
        self._refused_holds: set[str] = set()
        self._refused_loads = LoadResults()
        self._load_errors: set[int] = set()
        self._reported: dict[str, int] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor],
                           index: int | None = None) -> None:
        """``index``: this worker's index (tests); by default from vLLM's process groups."""
        layout = KVLayout.from_caches(kv_caches, self._num_blocks, self._block_size,
                                      self._local_kv_heads)
        if index is None:
            place = worker_place(self._num_kv_heads)
            index = place.pp_rank * place.tp_size + place.tp_rank
        else:
            place = Place(index, self._num_workers, 0, self._num_kv_heads)
        s = self._settings
        host = own_host(s.host)
        codec = Codec.from_env()
        links = same_host_link if s.shared_memory else TorchDistLink
        if self._is_producer:
            self.producer = ProducerEndpoint(
                host, s.port + index if s.port else 0, kv_caches, layout, self.holds,
                s.timeout_s, control_timeout_s=s.control_timeout_s,
                claim_lease_s=s.claim_lease_s, link_idle_s=s.link_idle_s, codec=codec,
                link_factory=links, direct_reads=s.direct_reads)
            logger.info("KV producer worker %d serving on %s:%d", index, *self.producer.address)
        if self._is_consumer:
            self.consumer = ConsumerEndpoint(
                host, index, kv_caches, layout, s.timeout_s, s.unknown_retry_s,
                num_workers=self._num_workers, place=place, control_timeout_s=s.control_timeout_s,
                idle_s=s.link_idle_s, codec=codec, link_factory=links,
                regions=own_regions(kv_caches, layout, "consumer") if s.direct_reads else None)

    def handshake(self) -> PDHandshake | None:
        """This worker's bound control endpoint, for the scheduler side (prefill role only)."""
        if self.producer is None:
            return None
        host, port = self.producer.address
        return PDHandshake(host, port)

    # -- each engine step ----------------------------------------------------------------------

    def start(self, meta: PDConnectorMetadata) -> None:
        """Register holds, send claims, queue loads. Never raises: see the module docstring."""
        for hold in meta.holds:
            self._add_hold(hold, meta.lease_s)
        for claim in meta.claims:
            if self.consumer is not None:
                try:
                    self.consumer.claim(claim)
                except Exception as e:
                    self._bad("claim", "cannot claim transfer %s: %r", claim.transfer_id, e)
        for load in meta.loads:
            self._submit(load)

    def _add_hold(self, hold: HoldSpec, lease_s: float) -> None:
        try:
            if self.producer is None:
                raise RuntimeError("this worker is not a KV producer")
            self.holds.add(hold.transfer_id, hold.request_id, hold.block_ids, lease_s)
        except (HoldError, Exception) as e:  # the request's blocks are freed; the engine goes on
            self._refused_holds.add(hold.request_id)
            self._bad("hold", "request %s: cannot hold transfer %s: %s", hold.request_id,
                      hold.transfer_id, e)

    def _submit(self, load: LoadSpec) -> None:
        try:
            if self.consumer is None:
                raise ValueError("this worker is not a KV consumer")
            if load.request_id is not None and not load.local_block_ids:
                raise ValueError("a load for a request with no local blocks")
            self.consumer.submit(load)  # ValueError when the remote layout does not fit
        except Exception as e:
            self._bad("load", "request %s: cannot load transfer %s: %s", load.request_id,
                      load.transfer_id, e)
            if load.request_id is not None:
                self._refused_loads.finished.add(load.request_id)
                self._refused_loads.failed.add(load.request_id)
                self._refused_loads.failed_block_ids.update(load.local_block_ids)

    def _bad(self, kind: str, message: str, *args: object) -> None:
        self.counts["num_bad_specs"] += 1
        level = logging.DEBUG if kind in self._warned else logging.ERROR
        self._warned.add(kind)
        logger.log(level, message, *args)

    def transfer_results(self, results: KVConnectorTransferResults) -> KVConnectorTransferResults:
        if self._is_producer:
            refused, self._refused_holds = self._refused_holds, set()
            results.finished_sending = self.holds.take_released() | refused
        if self._is_consumer:
            loads = self.consumer.take_results() if self.consumer is not None else LoadResults()
            refused, self._refused_loads = self._refused_loads, LoadResults()
            results.finished_recving = loads.finished | refused.finished
            results.failed_recving = loads.failed | refused.failed
            self._load_errors = loads.failed_block_ids | refused.failed_block_ids
        return results

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_stats(self) -> TransferStats | None:
        """Counter deltas since the last call, or None when nothing moved."""
        totals = dict(self.counts)
        if self._is_producer:
            totals["num_expired_holds"] = self.holds.num_expired
        for endpoint in (self.producer, self.consumer):
            if endpoint is not None:
                for name, value in dict(endpoint.counts).items():
                    totals[name] = totals.get(name, 0) + value
        delta: dict[str, Any] = {name: value - self._reported.get(name, 0)
                                 for name, value in totals.items()}
        self._reported = totals
        if self.consumer is not None:
            delta.update({name: samples for name, samples in
                          self.consumer.take_samples().items() if samples})
        stats = TransferStats.from_counts(delta)
        return None if stats.is_empty() else stats

    def health(self) -> str | None:
        """None when every transfer thread (producer, consumer and its peers) is alive."""
        if self._is_producer and (self.producer is None or not self.producer.is_alive()):
            return "the KV producer's thread is not running"
        if self._is_consumer:
            if self.consumer is None:
                return "the KV consumer was never started"
            return self.consumer.health()
        return None

    def shutdown(self) -> None:
        for endpoint in (self.producer, self.consumer):
            if endpoint is not None:
                endpoint.close()
