"""``PDConnector``: pdserve's vLLM KV connector, a thin facade over its two halves.

Loaded by vLLM through::

    kv_transfer_config={"kv_connector": "PDConnector",
                        "kv_connector_module_path": "kvtransfer.connector",
                        "kv_role": "kv_producer" | "kv_consumer",
                        "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {...}}   # see kvtransfer.settings

The scheduler-side calls go to ``kvtransfer.scheduler.PDScheduler`` (engine-core process), the
worker-side calls to ``kvtransfer.worker.PDWorker`` (each worker process). Blocks move whole,
after the prefill has finished, so the per-layer hooks (``save_kv_layer``,
``wait_for_layer_load``, ``wait_for_save``) have nothing to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtransfer.metadata import PDConnectorMetadata
from kvtransfer.scheduler import PDScheduler
from kvtransfer.settings import ConnectorSettings
from kvtransfer.stats import TransferStats
from kvtransfer.worker import PDWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class PDConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        settings = ConnectorSettings.from_extra_config(
            vllm_config.kv_transfer_config.kv_connector_extra_config
        )
        self.scheduler_side: PDScheduler | None = None
        self.worker_side: PDWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = PDScheduler(vllm_config, settings)
        else:
            self.worker_side = PDWorker(vllm_config, settings, kv_cache_config.num_blocks)

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PDConnectorMetadata)
        self.worker_side.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker_side.transfer_results(KVConnectorTransferResults())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors()

    def get_kv_connector_stats(self) -> TransferStats | None:
        return None if self.worker_side is None else self.worker_side.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TransferStats:
        return TransferStats.from_counts(data or {})

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()

    # -- scheduler side ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        return self.scheduler_side.build_connector_meta()

    def request_finished(self, request: Request, block_ids: list[int]):
        return self.scheduler_side.request_finished(request, block_ids)
