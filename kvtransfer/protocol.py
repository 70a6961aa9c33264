"""Control messages between a decode worker and a prefill worker: msgpack, versioned.

Every message is a msgpack map with ``v`` (the protocol version) and ``type``; the receiver
rejects any other version. KV data never travels here: it moves over the pair's
torch.distributed link (see ``kvtransfer.link``).

Exchange, decode side first (``->`` decode to prefill, ``<-`` the reply):

    -> HELLO   peer_id, layout          once per pair: the decode worker's KV layout
    <- WELCOME store_port, group        join this TCPStore prefix to build the pair's link
       (or ERROR when the layouts differ)
    -> PULL    transfer_id, first_block, num_blocks
    <- SENDING num_bytes                then that many bytes arrive over the link
       (or ERROR: unknown transfer, lease expired, bad range)
    -> DONE    transfer_id              the blocks may be freed (no reply)
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

PROTOCOL_VERSION = 1


class ProtocolError(Exception):
    """A control message that cannot be accepted."""


class MsgType(str, enum.Enum):
    HELLO = "hello"
    WELCOME = "welcome"
    PULL = "pull"
    SENDING = "sending"
    DONE = "done"
    ERROR = "error"


REQUIRED_FIELDS: dict[MsgType, tuple[str, ...]] = {
    MsgType.HELLO: ("peer_id", "layout"),
    MsgType.WELCOME: ("store_port", "group"),
    MsgType.PULL: ("transfer_id", "first_block", "num_blocks"),
    MsgType.SENDING: ("num_bytes",),
    MsgType.DONE: ("transfer_id",),
    MsgType.ERROR: ("message",),
}


def encode(kind: MsgType, **fields: Any) -> bytes:
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in fields]
    if missing:
        raise ProtocolError(f"{kind.value} message lacks {missing}")
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": kind.value, **fields})


def decode(data: bytes) -> tuple[MsgType, dict[str, Any]]:
    """Parse and check one message; raise ``ProtocolError`` on anything unexpected."""
    try:
        msg = msgpack.unpackb(data)
    except (msgpack.UnpackException, ValueError) as e:
        raise ProtocolError(f"undecodable control message: {e}") from e
    if not isinstance(msg, dict):
        raise ProtocolError("control message is not a map")
    version = msg.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version!r} does not match ours ({PROTOCOL_VERSION})"
        )
    try:
        kind = MsgType(msg.pop("type"))
    except (KeyError, ValueError) as e:
        raise ProtocolError(f"unknown control message type: {e}") from e
    msg.pop("v")
    missing = [name for name in REQUIRED_FIELDS[kind] if name not in msg]
    if missing:
        raise ProtocolError(f"{kind.value} message lacks {missing}")
    return kind, msg
