"""Worker addresses in the transfer parameters, and the address a worker binds.

A prefill engine answers a held request with ``kv_transfer_params`` (kvtransfer.scheduler) whose
``remote_addresses`` lists one ``[host, port]`` per prefill worker, in vLLM's worker order
(``pp_rank * tp_size + tp_rank``): each worker binds on its own node, so the workers of one
engine whose pipeline stages sit on different nodes report different hosts. The parameters
travel as JSON through the router, so an address arrives as a two-item list.

A decode request with several prompts (a completion's list of prompts) carries one such set per
prompt, under ``batch`` (``batch_params``): vLLM hands every engine request of an API request
the same parameters, and each prompt's request finds its own set by its tokens' digest.
"""

from __future__ import annotations

import sys
from typing import Any

Address = tuple[str, int]
BATCH_KEY = "batch"
MAX_BATCH = 4096  # transfer parameter sets in one request


def batch_params(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One decode request's parameters for several prompts, each prefilled on its own."""
    return {"do_remote_prefill": True, BATCH_KEY: entries}


def transfer_entries(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The transfers ``params`` names: each set of a batch, or ``params`` itself."""
    entries = params.get(BATCH_KEY)
    if entries is None:
        return [params]
    if type(entries) is not list or len(entries) > MAX_BATCH:
        raise ValueError(f"{BATCH_KEY} must be a list of at most {MAX_BATCH} parameter sets")
    if not all(type(e) is dict for e in entries):
        raise ValueError(f"every item of {BATCH_KEY} must be a dict")
    return entries


def parse_addresses(value: Any) -> list[Address]:
    """``remote_addresses`` as (host, port) tuples; ValueError when it is not a non-empty list
    of ``[host, port]`` pairs (a non-empty str and a port 1-65535)."""
    if type(value) is not list or not value:
        raise ValueError(f"remote_addresses must be a non-empty list, got {value!r:.80}")
    addresses = []
    for item in value:
        if type(item) not in (list, tuple) or len(item) != 2:
            raise ValueError(f"an address must be [host, port], got {item!r:.80}")
        host, port = item
        if type(host) is not str or not host:
            raise ValueError(f"an address's host must be a non-empty str, got {host!r:.80}")
        if type(port) is not int or not 0 < port < 65536:
            raise ValueError(f"an address's port must be 1-65535, got {port!r:.20}")
        addresses.append((host, port))
    return addresses


def own_host(configured: str) -> str:
    """The address this worker binds and reports.

    In a worker of vLLM's Ray executor (a Ray actor, possibly on another node than the replica
    that started the engine) it is that worker's own Ray node address; in a worker process the
    replica spawned on its own node (Ray not started there), the ``configured`` one.
    """
    ray = sys.modules.get("ray")  # never imported here: a Ray actor has it already
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    return configured
