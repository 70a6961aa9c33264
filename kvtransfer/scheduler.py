"""The scheduler-side half of the connector (runs in the engine-core process). Never raises on
bad transfer parameters: the request is served without a transfer (counted, logged once).

Prefill role (``kv_producer``): when a request that asked for remote decode finishes, keep its
blocks (``request_finished`` returns True), tell the workers to hold them, and return the
transfer parameters the decode side needs, with each worker's own bound control address (host
and port, reported through vLLM's handshake metadata; kvtransfer.params). It refuses to hold,
and frees the blocks at once, when the transfer id is already held here (e.g. n > 1, or one set
of parameters sent with several prompts: returns None) or when ``max_held_blocks`` would be
passed (returns ``{"busy": True}``).
Held blocks are counted until the workers report them sent or expired (``finished_sending``).

Decode role (``kv_consumer``): ``kvtransfer.scheduler_decode.DecodeScheduler`` claims, loads
and releases transfers; this class hands it the decode-side hooks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvtransfer.heads import model_kv_heads
from kvtransfer.metadata import HoldSpec, Outbox, PDConnectorMetadata, PDHandshake
from kvtransfer.params import Address
from kvtransfer.protocol import MAX_ID_CHARS, PROTOCOL_VERSION
from kvtransfer.scheduler_decode import DecodeScheduler, prompt_hash
from kvtransfer.settings import ConnectorSettings
from kvtransfer.stats import COUNTERS, TransferStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

__all__ = ["PDScheduler", "prompt_hash"]


class PDScheduler:
    def __init__(self, vllm_config: VllmConfig, settings: ConnectorSettings) -> None:
        self._settings = settings
        parallel = vllm_config.parallel_config
        self._tp_size = parallel.tensor_parallel_size
        self._pp_size = parallel.pipeline_parallel_size
        self._is_producer = vllm_config.kv_transfer_config.is_kv_producer
        self._addresses: list[Address] | None = None
        if settings.port:  # fixed ports: worker i listens on port + i (until the handshake)
            self._addresses = [(settings.host, settings.port + i)
                               for i in range(self._tp_size * self._pp_size)]
        self._out = Outbox(dict.fromkeys(COUNTERS, 0))
        self.counts = self._out.counts
        self._warn = self._out.warn
        self._reported: dict[str, int] = {}
        self._reported_held = 0
        self._held: dict[str, tuple[str, int]] = {}  # transfer id -> (request id, num blocks)
        self._held_transfer: dict[str, str] = {}  # engine request id -> transfer id
        self.decode = DecodeScheduler(self._tp_size, self._pp_size,
                                      model_kv_heads(vllm_config)[0], self._out)

    # -- handshake -----------------------------------------------------------------------------

    def set_handshake(self, metadata: dict[tuple[int, int], Any]) -> None:
        """The workers' bound addresses, keyed by (pp_rank, tp_rank) as vLLM collects them."""
        if not self._is_producer:
            return  # only a prefill engine's workers listen
        num_workers = self._tp_size * self._pp_size
        addresses: dict[int, Address] = {}
        for (pp_rank, tp_rank), meta in metadata.items():
            if isinstance(meta, PDHandshake):
                addresses[pp_rank * self._tp_size + tp_rank] = (meta.host, meta.port)
        if sorted(addresses) != list(range(num_workers)):
            logger.error("KV handshake metadata covers workers %s of %d; keeping addresses %s",
                         sorted(addresses), num_workers, self._addresses)
            return
        self._addresses = [addresses[i] for i in range(num_workers)]
        logger.info("KV producer workers listen on %s", self._addresses)

    @property
    def remote_addresses(self) -> list[Address] | None:
        return None if self._addresses is None else list(self._addresses)

    # -- prefill side --------------------------------------------------------------------------

    @property
    def num_held_blocks(self) -> int:
        return sum(n for _, n in self._held.values())

    def _hold(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        transfer_id = request.kv_transfer_params.get("transfer_id")
        if type(transfer_id) is not str or not transfer_id or len(transfer_id) > MAX_ID_CHARS:
            self._warn("bad_id", "request %s: transfer id %.40r is not a str of 1-%d chars; "
                       "not held", request.request_id, transfer_id, MAX_ID_CHARS)
            self.counts["num_bad_specs"] += 1
            return False, None
        if transfer_id in self._held:
            self.counts["num_duplicate_holds"] += 1
            self._warn("duplicate", "request %s: transfer %s is already held for request %s "
                       "(n > 1, or one transfer id sent with several prompts); not held",
                       request.request_id, transfer_id, self._held[transfer_id][0])
            return False, None
        cap = self._settings.max_held_blocks
        if cap is not None and self.num_held_blocks + len(block_ids) > cap:
            self.counts["num_busy_holds"] += 1
            self._warn("busy", "holding %d more blocks would pass max_held_blocks=%d (%d held); "
                       "request %s answered busy", len(block_ids), cap, self.num_held_blocks,
                       request.request_id)
            return False, {"busy": True}
        if self._addresses is None:
            self.counts["num_bad_specs"] += 1
            self._warn("no_ports", "the workers reported no KV addresses (handshake metadata) "
                       "and no fixed port is set; request %s not held", request.request_id)
            return False, None
        self._held[transfer_id] = (request.request_id, len(block_ids))
        self._held_transfer[request.request_id] = transfer_id
        self._out.holds.append(HoldSpec(transfer_id, request.request_id, list(block_ids)))
        return True, {
            "do_remote_prefill": True,
            "transfer_id": transfer_id,
            "remote_addresses": [[host, port] for host, port in self._addresses],
            "remote_block_ids": list(block_ids),
            "num_prompt_tokens": request.num_prompt_tokens,
            "prompt_hash": prompt_hash(request.prompt_token_ids),
            "tp_size": self._tp_size,
            "pp_size": self._pp_size,
            "protocol": PROTOCOL_VERSION,
        }

    def _on_sent(self, request_id: str) -> None:
        transfer_id = self._held_transfer.pop(request_id, None)
        if transfer_id is not None:
            self._held.pop(transfer_id, None)

    # -- decode side: DecodeScheduler --------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self.decode.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.decode.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self.decode.update_state_after_alloc(request, blocks, num_external_tokens)

    # -- both sides ----------------------------------------------------------------------------

    def update_connector_output(self, finished_sending: set[str] | None,
                                finished_recving: set[str] | None) -> None:
        for request_id in finished_sending or ():
            self._on_sent(request_id)
        for request_id in finished_recving or ():
            self.decode.on_loaded(request_id)

    def build_connector_meta(self) -> PDConnectorMetadata:
        return self._out.take(self._settings.lease_s)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not isinstance(params, dict):
            return False, None
        if params.get("do_remote_prefill") is True:  # decode side
            self.decode.finish(request)
            return False, None
        if params.get("do_remote_decode") is not True or not block_ids:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: free the blocks now
        return self._hold(request, block_ids)

    def take_stats(self) -> TransferStats | None:
        """Counter deltas since the last call, plus ``num_held_blocks`` when it changed."""
        data: dict[str, int] = {name: value - self._reported.get(name, 0)
                                for name, value in self.counts.items()}
        self._reported = dict(self.counts)
        held = self.num_held_blocks
        if held != self._reported_held:
            data["num_held_blocks"] = self._reported_held = held
        stats = TransferStats.from_counts(data)
        return None if stats.is_empty() else stats
