"""Free TCP ports for a prefill engine's KV transfer endpoints."""

from __future__ import annotations

import socket


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
