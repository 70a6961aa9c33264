"""Worker addresses in the transfer parameters, and the address a worker binds.

A prefill engine answers a held request with ``kv_transfer_params`` (kvtransfer.scheduler) whose
``remote_addresses`` lists one ``[host, port]`` per prefill worker, in vLLM's worker order
(``pp_rank * tp_size + tp_rank``): each worker binds on its own node, so the workers of one
engine whose pipeline stages sit on different nodes report different hosts. The parameters
travel as JSON through the router, so an address arrives as a two-item list.
"""

from __future__ import annotations

import sys
from typing import Any

Address = tuple[str, int]


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
