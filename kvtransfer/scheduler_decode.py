"""The decode half of the scheduler-side connector (``kvtransfer.scheduler``): claims, loads and
releases of transfers from prefill engines.

The first time it sees a request carrying a prefill engine's transfer parameters it claims the
transfer (a ``ClaimSpec``: the workers send CLAIM so the prefill side keeps the blocks for
``claim_lease_s`` while the request queues). It reports every prompt token beyond the local
prefix cache as loadable asynchronously and, once vLLM has allocated blocks, tells the workers
which remote blocks go into which local blocks. A request of several prompts carries one set of
parameters per prompt (``kvtransfer.params.batch_params``); each prompt's engine request takes
the set whose digest matches its tokens, and one without a set computes its prompt. Requests
that share a transfer id (vLLM fans a request with n > 1 out into n requests with the same
parameters; a batch's identical prompts share one set) load it once: while one loads, the
others get ``(None, False)`` ("ask again later"); once it has loaded, vLLM has put the loaded
blocks in its prefix cache (``Scheduler._update_waiting_for_remote_kv`` caches them before the
waiting queue is scanned, since requests holding blocks are drained first), so the others find
them there and compute only what is not cached. A transfer nobody will load (all cached, request
ended first, parameters refused) is released (DONE) unless another request still uses it.
Parameters it cannot use (another protocol, another PP, TP sizes whose heads do not pair, a
prompt that differs) make the request compute its prompt here: counted, logged once.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import struct
from typing import TYPE_CHECKING, Any

from kvtransfer.heads import pair_problem
from kvtransfer.metadata import ClaimSpec, LoadSpec, Outbox
from kvtransfer.params import BATCH_KEY, parse_addresses, transfer_entries
from kvtransfer.protocol import MAX_ID_CHARS, PROTOCOL_VERSION

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

logger = logging.getLogger("kvtransfer.scheduler")  # one logger for both halves
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


class DecodeScheduler:
    def __init__(self, tp_size: int, pp_size: int, num_kv_heads: int | None,
                 outbox: Outbox) -> None:
        self._tp_size = tp_size
        self._pp_size = pp_size
        self._num_kv_heads = num_kv_heads
        self._out = outbox
        self._transfers: dict[str, DecodeTransfer] = {}
        self._request_transfer: dict[str, str] = {}  # decode request id -> transfer id
        self._loading: dict[str, str] = {}  # loading request id -> transfer id
        self._local: set[str] = set()  # decode requests that compute their prompt here

    def _remote_params(self, request: Request) -> dict[str, Any] | None:
        """The request's transfer parameters if it may load its prompt from a prefill engine;
        else None, after releasing the transfer when nobody else here uses it."""
        params = request.kv_transfer_params
        if not isinstance(params, dict) or params.get("do_remote_prefill") is not True:
            return None
        rid = request.request_id
        digest = prompt_hash(request.prompt_token_ids)
        if BATCH_KEY in params:
            params = self._batch_entry(rid, params, digest)
            if params is None:
                return None
        problem = _params_problem(params)
        if problem:
            self._out.counts["num_bad_specs"] += 1
            self._out.warn("bad_params", "request %s: bad transfer parameters (%s); computing its "
                       "prompt here", rid, problem)
            return None
        if params["prompt_hash"] != digest:
            problem = "its prompt tokens differ from the ones the prefill engine computed"
        else:
            problem = self._layout_problem(params.get("tp_size", 1), params.get("pp_size", 1))
        if problem:
            self._out.warn("unusable", "request %s: %s; computing its prompt here", rid, problem)
            if params["transfer_id"] not in self._transfers:
                self._release(params)
            return None
        return params

    def _batch_entry(self, rid: str, params: dict[str, Any],
                     digest: str) -> dict[str, Any] | None:
        """The set of a batch's parameters made for the prompt whose tokens' digest is
        ``digest``, or None: a prompt the router could not prefill elsewhere has none and is
        computed here (the router counted it)."""
        try:
            entries = transfer_entries(params)
        except ValueError as e:
            self._out.counts["num_bad_specs"] += 1
            self._out.warn("bad_params", "request %s: bad transfer parameters (%s); computing its "
                           "prompt here", rid, e)
            return None
        return next((e for e in entries if e.get("prompt_hash") == digest), None)

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
            self._out.claims.append(ClaimSpec(
                transfer_id, parse_addresses(params["remote_addresses"]), params.get("tp_size", 1)))
        elif entry.params["prompt_hash"] != params["prompt_hash"]:
            self._out.counts["num_bad_specs"] += 1
            self._out.warn("shared_id", "request %s: transfer %s is used by another prompt here; "
                       "computing its prompt here", request.request_id, transfer_id)
            self._local.add(request.request_id)
            return None
        else:
            self._out.counts["num_duplicate_loads"] += 1
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
            self._out.counts["num_bad_specs"] += 1
            if num_external_tokens > 0:
                local = [b.block_id for b in blocks.blocks[0]]
                self._out.loads.append(LoadSpec("", request.request_id, [], 0, local))

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
        self._out.loads.append(LoadSpec(transfer_id, request.request_id,
                                    parse_addresses(params["remote_addresses"]), num_cached, local,
                                    params.get("tp_size", 1)))

    def on_loaded(self, request_id: str) -> None:
        """The workers report the request's load finished (ok or not)."""
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
        self._out.loads.append(LoadSpec(params["transfer_id"], None,
                                    parse_addresses(params["remote_addresses"]), 0, [],
                                    params.get("tp_size", 1)))

    def finish(self, request: Request) -> None:
        """The engine is done with a request that carried transfer parameters."""
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
