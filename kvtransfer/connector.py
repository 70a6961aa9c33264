"""``PDConnector``: pdserve's vLLM KV connector, a thin facade over its two halves.

Loaded by vLLM through::

    kv_transfer_config={"kv_connector": "PDConnector",
                        "kv_connector_module_path": "kvtransfer.connector",
                        "kv_role": "kv_producer" | "kv_consumer",
                        "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {...}}   # see kvtransfer.settings

Scheduler side (engine-core process) -> ``kvtransfer.scheduler.PDScheduler``:
    ``on_new_request``            decode: claim the request's transfer (CLAIM extends the lease)
    ``get_num_new_matched_tokens`` decode: prompt tokens to load, or (None, False) while a request
                                   of the same transfer loads it
    ``update_state_after_alloc``  decode: which remote blocks go into which local blocks
    ``build_connector_meta``      holds, claims and loads for the workers, once each
    ``update_connector_output``   finished sends free held blocks; finished loads free siblings
    ``request_finished``          prefill: hold the blocks (or refuse: duplicate id, busy);
                                   decode: release a transfer nobody will load
    ``set_xfer_handshake_metadata(_pp_aware)``  the prefill workers' bound addresses
    ``get_kv_connector_stats``    counters and the ``num_held_blocks`` gauge (``kvtransfer.stats``)
Worker side (each TP x PP worker process) -> ``kvtransfer.worker.PDWorker``:
    ``register_kv_caches``        start the endpoint threads (bind, then report the address)
    ``get_handshake_metadata``    this worker's bound host and port (``PDHandshake``)
    ``bind_connector_metadata``   register holds, send claims, queue loads, before the forward
                                   (vLLM calls ``start_load_kv`` after the forward when no load
                                   is synchronous: on a CPU, a whole prefill step later, while
                                   decode already pulls the hold; ``start_load_kv`` is a no-op)
    ``get_transfer_results``      finished sends, finished and failed loads
    ``get_block_ids_with_load_errors``  blocks of failed loads (vLLM recomputes them)
    ``get_kv_connector_stats``    counter deltas; ``shutdown`` joins the threads
Blocks move whole, after the prefill has finished, so the per-layer hooks
(``save_kv_layer``, ``wait_for_layer_load``, ``wait_for_save``) have nothing to do.

No hook raises into the engine once it runs: a bad or duplicate spec fails that request only
(logged once per kind, counted in ``num_bad_specs``), and an unexpected error in a hook is
logged, counted (``num_hook_errors``) and answered with the hook's neutral result, so an engine
never dies of a transfer. ``PDWorker.health`` says whether the transfer threads still run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtransfer.metadata import PDConnectorMetadata, PDHandshake
from kvtransfer.scheduler import PDScheduler
from kvtransfer.settings import ConnectorSettings
from kvtransfer.stats import TransferStats
from kvtransfer.worker import PDWorker

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)
T = TypeVar("T")


def never_raises(fallback: Callable[[], Any]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Log (once per hook), count and swallow any exception of a hook; return ``fallback()``."""

    def wrap(hook: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(hook)
        def guarded(self: PDConnector, *args: Any, **kwargs: Any) -> T:
            try:
                return hook(self, *args, **kwargs)
            except Exception:
                self.num_hook_errors += 1
                if hook.__name__ not in self._failed_hooks:
                    self._failed_hooks.add(hook.__name__)
                    logger.exception("KV connector hook %s failed (later failures of this hook "
                                     "are counted, not logged)", hook.__name__)
                return fallback()

        return guarded

    return wrap


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
        self.num_hook_errors = 0
        self._reported_hook_errors = 0
        self._failed_hooks: set[str] = set()
        self.scheduler_side: PDScheduler | None = None
        self.worker_side: PDWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = PDScheduler(vllm_config, settings)
        else:
            self.worker_side = PDWorker(vllm_config, settings, kv_cache_config.num_blocks)

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches)  # a failure here fails start-up

    def get_handshake_metadata(self) -> PDHandshake | None:
        return None if self.worker_side is None else self.worker_side.handshake()

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._start_step(connector_metadata)

    @never_raises(lambda: None)
    def _start_step(self, meta: KVConnectorMetadata) -> None:
        if not isinstance(meta, PDConnectorMetadata):
            raise TypeError(f"connector metadata is a {type(meta).__name__}")
        self.worker_side.start(meta)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return  # done in bind_connector_metadata

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return

    @never_raises(KVConnectorTransferResults)
    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self.worker_side.transfer_results(KVConnectorTransferResults())

    @never_raises(set)
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors()

    @never_raises(lambda: None)
    def get_kv_connector_stats(self) -> TransferStats | None:
        side = self.worker_side if self.worker_side is not None else self.scheduler_side
        stats = side.take_stats()
        errors = self.num_hook_errors - self._reported_hook_errors
        if errors:
            self._reported_hook_errors = self.num_hook_errors
            stats = stats or TransferStats.from_counts({})
            stats.aggregate(TransferStats.from_counts({"num_hook_errors": errors}))
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TransferStats:
        return TransferStats.from_counts(data or {})

    def shutdown(self) -> None:
        if self.worker_side is not None:
            self.worker_side.shutdown()

    # -- scheduler side ------------------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        self.set_xfer_handshake_metadata_pp_aware({(0, rank): m for rank, m in metadata.items()})

    def set_xfer_handshake_metadata_pp_aware(self, metadata: dict[tuple[int, int], Any]) -> None:
        self.scheduler_side.set_handshake(metadata)

    @never_raises(lambda: None)
    def on_new_request(self, request: Request) -> None:
        self.scheduler_side.on_new_request(request)

    @never_raises(lambda: (0, False))
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    @never_raises(lambda: None)
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    @never_raises(PDConnectorMetadata)
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PDConnectorMetadata:
        return self.scheduler_side.build_connector_meta()

    @never_raises(lambda: None)
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler_side.update_connector_output(connector_output.finished_sending,
                                                    connector_output.finished_recving)

    @never_raises(lambda: (False, None))
    def request_finished(self, request: Request, block_ids: list[int]):
        return self.scheduler_side.request_finished(request, block_ids)
