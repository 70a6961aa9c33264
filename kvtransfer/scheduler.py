"""The scheduler-side half of the connector (runs in the engine-core process).

Prefill role (``kv_producer``): when a request that asked for remote decode finishes, keep its
blocks (``request_finished`` returns True), tell the workers to hold them, and return the
transfer parameters the decode side needs.

Decode role (``kv_consumer``): for a request carrying those parameters, claim every prompt token
beyond the local prefix cache as loadable asynchronously, and once vLLM has allocated blocks,
tell the workers which remote blocks go into which local blocks. A request that needs nothing
pulled (all cached locally) or that ends before allocation still tells the prefill side to let
its blocks go.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvtransfer.metadata import HoldSpec, LoadSpec, PDConnectorMetadata
from kvtransfer.protocol import PROTOCOL_VERSION
from kvtransfer.settings import ConnectorSettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

REQUIRED_REMOTE_PARAMS = ("transfer_id", "remote_host", "remote_port", "remote_block_ids",
                          "prompt_hash")


def prompt_hash(token_ids: list[int] | None) -> str:
    """A digest of the prompt's token ids: both sides must have computed the same tokens."""
    import hashlib
    import struct

    ids = list(token_ids or ())
    return hashlib.blake2b(struct.pack(f"<{len(ids)}q", *ids), digest_size=16).hexdigest()


class PDScheduler:
    def __init__(self, vllm_config: VllmConfig, settings: ConnectorSettings) -> None:
        self._settings = settings
        self._block_size = vllm_config.cache_config.block_size
        parallel = vllm_config.parallel_config
        self._tp_size = parallel.tensor_parallel_size
        self._pp_size = parallel.pipeline_parallel_size
        self._holds: list[HoldSpec] = []
        self._loads: list[LoadSpec] = []

    # -- decode side ---------------------------------------------------------------------------

    def _remote_params(self, request: Request) -> dict[str, Any] | None:
        """The request's transfer parameters if it should load its prompt from a prefill engine."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill"):
            return None
        missing = [k for k in REQUIRED_REMOTE_PARAMS if k not in params]
        if missing or params.get("protocol") != PROTOCOL_VERSION:
            logger.warning("request %s: bad transfer parameters (missing %s, protocol %r); "
                           "computing its prompt here", request.request_id, missing,
                           params.get("protocol"))
            params["do_remote_prefill"] = False
            return None
        if params["prompt_hash"] != prompt_hash(request.prompt_token_ids):
            logger.error("request %s: its prompt tokens differ from the ones the prefill engine "
                         "computed; computing its prompt here", request.request_id)
            self._release(params)
            return None
        if (params.get("tp_size"), params.get("pp_size")) != (self._tp_size, self._pp_size):
            logger.error("request %s: prefill TPxPP %sx%s differs from ours %sx%s; computing "
                         "its prompt here", request.request_id, params.get("tp_size"),
                         params.get("pp_size"), self._tp_size, self._pp_size)
            self._release(params)
            return None
        return params

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int):
        params = self._remote_params(request)
        if params is None:
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = self._remote_params(request)
        if params is None:
            return
        params["do_remote_prefill"] = False  # one transfer per request
        if num_external_tokens == 0:
            self._release(params)
            return
        group = blocks.blocks[0]
        num_cached = 0
        while num_cached < len(group) and group[num_cached].block_hash is not None:
            num_cached += 1
        num_remote = len(params["remote_block_ids"])
        local = [b.block_id for b in group[num_cached:num_remote]]
        self._loads.append(LoadSpec(params["transfer_id"], request.request_id,
                                    params["remote_host"], params["remote_port"], num_cached,
                                    local))

    def _release(self, params: dict[str, Any]) -> None:
        params["do_remote_prefill"] = False
        self._loads.append(LoadSpec(params["transfer_id"], None, params["remote_host"],
                                    params["remote_port"], 0, []))

    # -- both sides ----------------------------------------------------------------------------

    def build_connector_meta(self) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(self._holds, self._loads, self._settings.lease_s)
        self._holds, self._loads = [], []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):  # decode side, ended before its blocks came
            if self._remote_params(request) is not None:
                self._release(params)
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        finished_ok = request.status in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                         RequestStatus.FINISHED_STOPPED)
        transfer_id = params.get("transfer_id")
        if not finished_ok or not block_ids or not transfer_id:
            return False, None  # aborted or unusable: free the blocks now
        self._holds.append(HoldSpec(transfer_id, request.request_id, list(block_ids)))
        return True, {
            "do_remote_prefill": True,
            "transfer_id": transfer_id,
            "remote_host": self._settings.host,
            "remote_port": self._settings.port,
            "remote_block_ids": list(block_ids),
            "num_prompt_tokens": request.num_prompt_tokens,
            "prompt_hash": prompt_hash(request.prompt_token_ids),
            "tp_size": self._tp_size,
            "pp_size": self._pp_size,
            "protocol": PROTOCOL_VERSION,
        }
