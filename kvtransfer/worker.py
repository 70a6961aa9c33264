"""The worker-side half of the connector (runs in each TP x PP worker process).

Prefill role: serve pulls of held blocks (``ProducerEndpoint``) and report held requests as
finished sending once confirmed or expired, so vLLM frees their blocks.
Decode role: hand load specs to the ``ConsumerEndpoint`` thread and report finished and failed
loads; failed ones fall back to recomputation in vLLM (``kv_load_failure_policy=recompute``).
Worker i of a prefill engine pairs with worker i of a decode engine (same TP and PP rank).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvtransfer.blocks import KVLayout
from kvtransfer.consumer import ConsumerEndpoint
from kvtransfer.holds import HoldTable
from kvtransfer.metadata import PDConnectorMetadata
from kvtransfer.producer import ProducerEndpoint
from kvtransfer.settings import ConnectorSettings
from kvtransfer.stats import COUNTERS, TransferStats

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

logger = logging.getLogger(__name__)


def worker_index() -> int:
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return get_pp_group().rank_in_group * get_tensor_model_parallel_world_size() + \
        get_tensor_model_parallel_rank()


class PDWorker:
    def __init__(self, vllm_config: VllmConfig, settings: ConnectorSettings, num_blocks: int):
        kv_config = vllm_config.kv_transfer_config
        self._is_producer = kv_config.is_kv_producer
        self._is_consumer = kv_config.is_kv_consumer
        self._settings = settings
        self._num_blocks = num_blocks
        self._block_size = vllm_config.cache_config.block_size
        self.holds = HoldTable()
        self.producer: ProducerEndpoint | None = None
        self.consumer: ConsumerEndpoint | None = None
        self._load_errors: set[int] = set()
        self._reported: dict[str, int] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = KVLayout.from_caches(kv_caches, self._num_blocks, self._block_size)
        index = worker_index()
        s = self._settings
        if self._is_producer:
            self.producer = ProducerEndpoint(s.host, s.port + index, kv_caches, layout,
                                             self.holds, s.timeout_s)
            logger.info("KV producer worker %d serving on %s:%d", index, s.host, s.port + index)
        if self._is_consumer:
            self.consumer = ConsumerEndpoint(s.host, index, kv_caches, layout, s.timeout_s,
                                             s.unknown_retry_s)

    def start(self, meta: PDConnectorMetadata) -> None:
        for hold in meta.holds:
            self.holds.add(hold.transfer_id, hold.request_id, hold.block_ids, meta.lease_s)
        if meta.loads and self.consumer is None:
            raise RuntimeError("a KV load was scheduled on a worker that is not a consumer")
        for load in meta.loads:
            self.consumer.submit(load)

    def transfer_results(self, results: KVConnectorTransferResults) -> KVConnectorTransferResults:
        if self._is_producer:
            results.finished_sending = self.holds.take_released()
        if self.consumer is not None:
            loads = self.consumer.take_results()
            results.finished_recving = loads.finished
            results.failed_recving = loads.failed
            self._load_errors = loads.failed_block_ids
        return results

    def take_stats(self) -> TransferStats | None:
        """Counters since the last call, or None when nothing moved."""
        totals = {}
        for endpoint in (self.producer, self.consumer):
            if endpoint is not None:
                totals.update(endpoint.counts)
        delta = {name: totals.get(name, 0) - self._reported.get(name, 0) for name in COUNTERS}
        self._reported = totals
        stats = TransferStats.from_counts(delta)
        return None if stats.is_empty() else stats

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        for endpoint in (self.producer, self.consumer):
            if endpoint is not None:
                endpoint.close()
