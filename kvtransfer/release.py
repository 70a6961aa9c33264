"""One-way messages from the decode side to every worker of a prefill engine.

``release_transfer``: free blocks held for a request that will never pull them. Used when the
decode side rejects a request before its engine sees the transfer (for example a prompt plus
``max_tokens`` longer than the model allows): without it the prefill replica would hold the
blocks until the lease runs out.
``claim_transfer``: extend the hold's lease (to the prefill's ``claim_lease_s``) from a process
outside the decode engine; the engine's own workers claim through ``ConsumerEndpoint.claim``
when its scheduler receives the request.

Both send one signed message (DONE or CLAIM) to every worker ``remote_addresses`` lists (for
every prompt of a batch's parameters), and return without waiting (neither has a reply).
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from kvtransfer.params import Address, parse_addresses, transfer_entries
from kvtransfer.protocol import MAX_MESSAGE_BYTES, Codec, MsgType, ProtocolError

logger = logging.getLogger(__name__)
LINGER_MS = 1000


def release_targets(params: dict[str, Any]) -> tuple[list[Address], str]:
    """(worker addresses, transfer id) from a prefill's kv_transfer_params; ValueError if bad."""
    addresses = parse_addresses(params.get("remote_addresses"))
    transfer_id = params.get("transfer_id")
    if type(transfer_id) is not str or not transfer_id:
        raise ValueError(f"transfer_id must be a non-empty str, got {transfer_id!r:.80}")
    return addresses, transfer_id


def release_transfer(params: dict[str, Any], codec: Codec | None = None) -> bool:
    """Send DONE for ``params["transfer_id"]`` (each one of a batch) to every worker of the
    prefill engine.

    Returns False (and logs) when the parameters, or one set of a batch, cannot be used.
    ``codec`` defaults to one with the deployment's secret (``PDSERVE_KV_SECRET``).
    """
    try:
        entries = transfer_entries(params)
    except ValueError as e:
        logger.warning("cannot send DONE for KV transfers: %s", e)
        return False
    ok = [_notify(MsgType.DONE, entry, codec) for entry in entries]
    return all(ok)


def claim_transfer(params: dict[str, Any], codec: Codec | None = None) -> bool:
    """Send CLAIM for ``params["transfer_id"]`` to every worker of the prefill engine."""
    return _notify(MsgType.CLAIM, params, codec)


def _notify(kind: MsgType, params: dict[str, Any], codec: Codec | None) -> bool:
    try:
        addresses, transfer_id = release_targets(params)
        message = (codec or Codec.from_env()).encode(kind, transfer_id=transfer_id)
    except (ValueError, ProtocolError) as e:
        logger.warning("cannot send %s for a KV transfer: %s", kind.value.upper(), e)
        return False
    ctx = zmq.Context.instance()
    for host, port in addresses:
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sock.connect(f"tcp://{host}:{port}")
            sock.send(message, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("cannot send %s for KV transfer %s to %s:%d: %s", kind.value.upper(),
                           transfer_id, host, port, e)
        finally:
            sock.close()
    return True
