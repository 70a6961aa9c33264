"""Where a replica's sockets listen: bound first on the configured host, then reported.

No port of a replica is chosen before the socket that uses it is bound, so any number of
replicas on one node cannot race for one:

- KV transfer (prefill workers): ``port`` 0 in the connector's settings; each worker binds a
  free port on ``host`` and reports it through vLLM's handshake metadata (kvtransfer/).
- KV cache events (every engine): vLLM's publisher binds ``tcp://*:0`` as the address
  ``VLLM_HOST_IP`` names (vLLM's ``ZmqEventPublisher._bind``), never every interface, for the
  PUB socket and the replay ROUTER socket, and reports both bound endpoints in its startup
  handshake (``get_kv_event_sources``). ``tcp://host:port`` would not do: vLLM *connects* a
  PUB socket to any endpoint without ``*`` or ``::``.

``free_port_block`` probes for free ports and releases them: another process may take them
before they are bound. Tests use it for ports the test itself binds soon after; replicas do not.
"""

from __future__ import annotations

import socket
from typing import Any

KV_EVENTS_CONFIG = {
    "enable_kv_cache_events": True,
    "publisher": "zmq",
    "endpoint": "tcp://*:0",
    "replay_endpoint": "tcp://*:0",
    "buffer_steps": 10_000,  # engine steps of events a subscriber can ask to have replayed
}


def kv_event_endpoints(engine: Any, host: str) -> tuple[str, str]:
    """The (publisher, replay) endpoints a started ``AsyncLLM`` reports; both must be on
    ``host`` (raises RuntimeError otherwise)."""
    sources = engine.engine_core.get_kv_event_sources()
    if 0 not in sources:
        raise RuntimeError(f"the engine reported no KV event endpoints ({sources})")
    endpoints = (sources[0].endpoint, sources[0].replay_endpoint)
    for endpoint in endpoints:
        if not isinstance(endpoint, str) or endpoint_host(endpoint) != host:
            raise RuntimeError(f"a KV event socket is bound at {endpoint!r}, not on {host}: "
                               "is VLLM_HOST_IP set to another address?")
    return endpoints


def endpoint_host(endpoint: str) -> str:
    """``tcp://10.0.0.1:5557`` -> ``10.0.0.1``; ``tcp://[::1]:5557`` -> ``::1``."""
    address = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return address.removeprefix("[").removesuffix("]")


def free_port_block(host: str, count: int, attempts: int = 50) -> int:
    """A base port such that ``base .. base + count - 1`` are all free on ``host`` right now."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        if all(_is_free(host, base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports on {host}")


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True
