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

Decode role (``kv_consumer``): the first time it sees a request carrying those parameters it
claims the transfer (a ``ClaimSpec``: the workers send CLAIM so the prefill side keeps the blocks
for ``claim_lease_s`` while the request queues). It reports every prompt token beyond the local
prefix cache as loadable asynchronously and, once vLLM has allocated blocks, tells the workers
which remote blocks go into which local blocks. Requests that share a transfer id (vLLM fans a
request with n > 1 out into n requests with the same parameters) load it once: while one loads,
the others get ``(None, False)`` ("ask again later"); once it has loaded, vLLM has put the loaded
blocks in its prefix cache (``Scheduler._update_waiting_for_remote_kv`` caches them before the
waiting queue is scanned, since requests holding blocks are drained first), so the others find
them there and compute only what is not cached. A transfer nobody will load (all cached, request
ended first, parameters refused) is released (DONE) unless another request still uses it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import struct
from typing import TYPE_CHECKING, Any

from kvtransfer.heads import model_kv_heads, pair_problem
from kvtransfer.metadata import ClaimSpec, HoldSpec, LoadSpec, PDConnectorMetadata, PDHandshake
from kvtransfer.params import Address, parse_addresses
from kvtransfer.protocol import MAX_ID_CHARS, PROTOCOL_VERSION
from kvtransfer.settings import ConnectorSettings
from kvtransfer.stats import COUNTERS, TransferStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

REQUIRED_REMOTE_PARAMS = ("transfer_id", "remote_addresses", "remote_block_ids", "prompt_hash")


def prompt_hash(token_ids: list[int] | None) -> str:
    """A digest of the prompt's token ids: both sides must have computed the same tokens."""
    ids = list(token_ids or ())
    return hashlib.blake2b(struct.pack(f"<{len(ids)}q", *ids), digest_size=16).hexdigest()


class LoadState(enum.Enum):
    CLAIMED = "claimed"  # seen and claimed; no request is loading it
    LOADING = "loading"  # ``loader`` is pulling it
    DONE = "done"  # loaded, failed or released: the requests compute what is not cached


@dataclasses.dataclass
class DecodeTransfer:
    params: dict[str, Any]
    requests: set[str]
    loader: str | None = None
    state: LoadState = LoadState.CLAIMED


class PDScheduler:
    def __init__(self, vllm_config: VllmConfig, settings: ConnectorSettings) -> None:
        self._settings = settings
        parallel = vllm_config.parallel_config
        self._tp_size = parallel.tensor_parallel_size
        self._pp_size = parallel.pipeline_parallel_size
        self._num_kv_heads = model_kv_heads(vllm_config)[0]
        self._is_producer = vllm_config.kv_transfer_config.is_kv_producer
        self._addresses: list[Address] | None = None
        if settings.port:  # fixed ports: worker i listens on port + i (until the handshake)
            self._addresses = [(settings.host, settings.port + i)
                               for i in range(self._tp_size * self._pp_size)]
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._reported: dict[str, int] = {}
        self._reported_held = 0
        self._warned: set[str] = set()
        self._holds: list[HoldSpec] = []
        self._loads: list[LoadSpec] = []
        self._claims: list[ClaimSpec] = []
        self._held: dict[str, tuple[str, int]] = {}  # transfer id -> (request id, num blocks)
        self._held_transfer: dict[str, str] = {}  # engine request id -> transfer id
        self._transfers: dict[str, DecodeTransfer] = {}
        self._request_transfer: dict[str, str] = {}  # decode request id -> transfer id
        self._loading: dict[str, str] = {}  # loading request id -> transfer id
        self._local: set[str] = set()  # decode requests that compute their prompt here

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """Log the first problem of each kind as a warning, later ones at debug level."""
        level = logging.DEBUG if kind in self._warned else logging.WARNING
        self._warned.add(kind)
        logger.log(level, message, *args)

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
        self._holds.append(HoldSpec(transfer_id, request.request_id, list(block_ids)))
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

    # -- decode side ---------------------------------------------------------------------------

    def _remote_params(self, request: Request) -> dict[str, Any] | None:
        """The request's transfer parameters if it may load its prompt from a prefill engine;
        else None, after releasing the transfer when nobody else here uses it."""
        params = request.kv_transfer_params
        if not isinstance(params, dict) or params.get("do_remote_prefill") is not True:
            return None
        rid = request.request_id
        problem = _params_problem(params)
        if problem:
            self.counts["num_bad_specs"] += 1
            self._warn("bad_params", "request %s: bad transfer parameters (%s); computing its "
                       "prompt here", rid, problem)
            return None
        if params["prompt_hash"] != prompt_hash(request.prompt_token_ids):
            problem = "its prompt tokens differ from the ones the prefill engine computed"
        else:
            problem = self._layout_problem(params.get("tp_size", 1), params.get("pp_size", 1))
        if problem:
            self._warn("unusable", "request %s: %s; computing its prompt here", rid, problem)
            if params["transfer_id"] not in self._transfers:
                self._release(params)
            return None
        return params

    def _layout_problem(self, tp_size: int, pp_size: int) -> str | None:
        """Why this engine cannot pull from a prefill engine of that TP x PP, if it cannot."""
        if pp_size != self._pp_size:
            return f"prefill PP {pp_size} differs from ours ({self._pp_size})"
        if tp_size == self._tp_size:
            return None
        if self._num_kv_heads is None:
            return f"prefill TP {tp_size} differs from ours ({self._tp_size})"
        problem = pair_problem(self._num_kv_heads, tp_size, self._tp_size)
        return None if problem is None else f"prefill TP {tp_size} vs ours: {problem}"

    def on_new_request(self, request: Request) -> None:
        """Claim the request's transfer as soon as the request arrives (it may queue long)."""
        if request.request_id not in self._request_transfer:
            self._track(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        rid = request.request_id
        transfer_id = self._request_transfer.get(rid)
        if transfer_id is None:
            if rid in self._local:
                return 0, False
            transfer_id = self._track(request)
            if transfer_id is None:
                return 0, False
        entry = self._transfers[transfer_id]
        if entry.state is LoadState.LOADING and entry.loader != rid:
            return None, False  # a request of the same transfer is loading it: ask again
        if entry.state is not LoadState.CLAIMED:
            return 0, False  # loaded (now in the prefix cache), failed, or released
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def _track(self, request: Request) -> str | None:
        """Start following a request that carries transfer parameters; claim new transfers."""
        if request.request_id in self._local:
            return None
        params = self._remote_params(request)
        if params is None:
            params = request.kv_transfer_params
            if isinstance(params, dict) and params.get("do_remote_prefill") is True:
                self._local.add(request.request_id)  # forgotten in request_finished
            return None
        transfer_id = params["transfer_id"]
        entry = self._transfers.get(transfer_id)
        if entry is None:
            entry = self._transfers[transfer_id] = DecodeTransfer(dict(params), set())
            self._claims.append(ClaimSpec(transfer_id, parse_addresses(params["remote_addresses"]),
                                          params.get("tp_size", 1)))
        elif entry.params["prompt_hash"] != params["prompt_hash"]:
            self.counts["num_bad_specs"] += 1
            self._warn("shared_id", "request %s: transfer %s is used by another prompt here; "
                       "computing its prompt here", request.request_id, transfer_id)
            self._local.add(request.request_id)
            return None
        else:
            self.counts["num_duplicate_loads"] += 1
        entry.requests.add(request.request_id)
        self._request_transfer[request.request_id] = transfer_id
        return transfer_id

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        try:
            self._plan_load(request, blocks, num_external_tokens)
        except Exception:  # vLLM waits for this load now: it must be reported failed
            logger.exception("request %s: cannot plan its KV load; it will be recomputed",
                             request.request_id)
            self.counts["num_bad_specs"] += 1
            if num_external_tokens > 0:
                local = [b.block_id for b in blocks.blocks[0]]
                self._loads.append(LoadSpec("", request.request_id, [], 0, local))

    def _plan_load(self, request: Request, blocks: KVCacheBlocks, num_external: int) -> None:
        transfer_id = self._request_transfer.get(request.request_id)
        entry = self._transfers.get(transfer_id) if transfer_id is not None else None
        if entry is None or entry.state is not LoadState.CLAIMED:
            return
        params = entry.params
        if num_external == 0:  # all cached here
            if entry.requests == {request.request_id}:
                entry.state = LoadState.DONE
                self._release(params)
            return
        group = blocks.blocks[0]
        num_cached = 0
        while num_cached < len(group) and group[num_cached].block_hash is not None:
            num_cached += 1
        local = [b.block_id for b in group[num_cached:len(params["remote_block_ids"])]]
        entry.loader, entry.state = request.request_id, LoadState.LOADING
        self._loading[request.request_id] = transfer_id
        self._loads.append(LoadSpec(transfer_id, request.request_id,
                                    parse_addresses(params["remote_addresses"]), num_cached, local,
                                    params.get("tp_size", 1)))

    def _on_loaded(self, request_id: str) -> None:
        transfer_id = self._loading.pop(request_id, None)
        entry = self._transfers.get(transfer_id) if transfer_id is not None else None
        if entry is not None and entry.loader == request_id:
            entry.state = LoadState.DONE
            self._drop_if_unused(transfer_id)

    def _drop_if_unused(self, transfer_id: str) -> None:
        entry = self._transfers[transfer_id]
        if entry.requests or entry.state is LoadState.LOADING:
            return
        del self._transfers[transfer_id]
        if entry.state is LoadState.CLAIMED:  # claimed, never loaded
            self._release(entry.params)

    def _release(self, params: dict[str, Any]) -> None:
        self._loads.append(LoadSpec(params["transfer_id"], None,
                                    parse_addresses(params["remote_addresses"]), 0, [],
                                    params.get("tp_size", 1)))

    # -- both sides ----------------------------------------------------------------------------

    def update_connector_output(self, finished_sending: set[str] | None,
                                finished_recving: set[str] | None) -> None:
        for request_id in finished_sending or ():
            self._on_sent(request_id)
        for request_id in finished_recving or ():
            self._on_loaded(request_id)

    def build_connector_meta(self) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(self._holds, self._loads, self._claims, self._settings.lease_s)
        self._holds, self._loads, self._claims = [], [], []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not isinstance(params, dict):
            return False, None
        if params.get("do_remote_prefill") is True:  # decode side
            self._finish_decode(request)
            return False, None
        if params.get("do_remote_decode") is not True or not block_ids:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: free the blocks now
        return self._hold(request, block_ids)

    def _finish_decode(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._local:
            self._local.discard(rid)
            return
        transfer_id = self._request_transfer.pop(rid, None)
        if transfer_id is not None:
            self._transfers[transfer_id].requests.discard(rid)
            self._drop_if_unused(transfer_id)
            return
        params = self._remote_params(request)  # ended before the scheduler took it
        if params is not None and params["transfer_id"] not in self._transfers:
            self._release(params)

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


def _params_problem(params: dict[str, Any]) -> str | None:
    """What is wrong with a decode request's transfer parameters, if anything."""
    missing = [k for k in REQUIRED_REMOTE_PARAMS if k not in params]
    if missing:
        return f"missing {missing}"
    if params.get("protocol") != PROTOCOL_VERSION or type(params.get("protocol")) is not int:
        return f"protocol {params.get('protocol')!r:.20}, ours is {PROTOCOL_VERSION}"
    transfer_id = params["transfer_id"]
    if not all(type(params.get(k, 1)) is int and params.get(k, 1) >= 1
               for k in ("tp_size", "pp_size")):
        return "tp_size and pp_size must be positive ints"
    if type(transfer_id) is not str or not transfer_id or len(transfer_id) > MAX_ID_CHARS:
        return "transfer_id is not a str of 1-256 chars"
    try:
        addresses = parse_addresses(params["remote_addresses"])
    except ValueError as e:
        return str(e)
    num_remote = params.get("tp_size", 1) * params.get("pp_size", 1)
    if len(addresses) != num_remote:
        return f"{len(addresses)} remote addresses for {num_remote} prefill workers"
    blocks = params["remote_block_ids"]
    if type(blocks) is not list or not all(type(b) is int and b >= 0 for b in blocks):
        return "remote_block_ids is not a list of block ids"
    return None
