"""Let a prefill engine free blocks held for a request that will never pull them.

Used when the decode side rejects a request before its engine sees the transfer (for example
a prompt plus ``max_tokens`` longer than the model allows): without it the prefill replica would
hold the blocks until the lease runs out.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from kvtransfer import protocol
from kvtransfer.protocol import MsgType

logger = logging.getLogger(__name__)


def release_transfer(params: dict[str, Any]) -> None:
    """Send DONE for ``params["transfer_id"]`` to every worker of the prefill engine."""
    try:
        host, base = params["remote_host"], int(params["remote_port"])
        num_workers = int(params.get("tp_size", 1)) * int(params.get("pp_size", 1))
        message = protocol.encode(MsgType.DONE, transfer_id=params["transfer_id"])
    except (KeyError, TypeError, ValueError) as e:
        logger.warning("cannot release transfer with parameters %s: %s", params, e)
        return
    ctx = zmq.Context.instance()
    for index in range(num_workers):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(f"tcp://{host}:{base + index}")
        sock.send(message)
        sock.close()
