"""Control messages between a decode worker and a prefill worker: msgpack, versioned, signed.

Every message is one ZMQ frame of at most ``MAX_MESSAGE_BYTES``: a msgpack map with ``v`` (the
protocol version), ``type``, the type's fields and, when the deployment has a secret, ``mac``
(HMAC-SHA256 over the msgpack encoding of every other field, keys sorted). ``Codec.decode``
refuses another version, a missing or unknown field, a field of the wrong type (a bool is not an
int) or out of range, and a missing or wrong MAC. KV data never travels here: it moves over the
pair's torch.distributed link (see ``kvtransfer.link``).

Exchange, decode side first (``->`` decode to prefill, ``<-`` the reply):

    -> HELLO   peer_id, layout [, pid]  once per pair: the decode worker's KV layout; with
                                        ``pid``, it offers to read blocks itself (same host)
    <- WELCOME store_port, group [, reads]   join this TCPStore prefix to build the pair's
               link; with ``reads`` (the offer taken), no link: read the blocks directly
               (``kvtransfer.reads``): {pid, probe: [address, nonce], layers: [[address,
               stride], ...], num_blocks, timeout_ms: a read must end this soon after its
               PULL}. A
               decode worker whose probe fails says HELLO again without pid.
       (or ERROR layout / busy)
    -> CLAIM   transfer_id              a decode scheduler took the request: extend the lease
    -> PULL    peer_id, transfer_id, first_block, num_blocks, tag [, first_head, num_heads]
               (no heads: every head of the blocks)
    <- SENDING transfer_id, num_bytes, tag [, block_ids]   then that many bytes arrive over
               the link, with tag; with ``block_ids`` (a pair that reads: uint32, little
               endian), read those blocks now, then say DONE
       (or ERROR unknown / expired / state / range / link, with the transfer_id)
    -> DONE    transfer_id [, peer_id, pullers, failed]   no reply. Without ``pullers``: the
               blocks may be freed. With it: this peer is done, one of ``pullers`` decode
               workers that pull this transfer here (another TP size: each pulls its heads);
               the blocks are freed when that many have said DONE. ``failed``: this peer's
               load failed (a direct read's bytes are not counted as sent).

The same version travels in the transfer parameters a prefill engine returns (``protocol``,
kvtransfer.scheduler), and the decode side refuses parameters of another version. Version 3: the
parameters list one ``[host, port]`` per prefill worker (``remote_addresses``), where version 2
had one ``remote_host`` and a list of ports. Version 4: a PULL names a range of heads, and a
DONE may count pullers, so prefill and decode may use different TP sizes (kvtransfer.heads).
Version 5: direct reads (HELLO's ``pid``, WELCOME's ``reads``, SENDING's ``block_ids``).
Version 6: DONE's ``failed``.

Replay of a captured signed message is not prevented (there is no nonce): the MAC only proves
the message was made by a holder of the deployment's secret.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 6
MAX_MESSAGE_BYTES = 64 * 1024
MAC_BYTES = 32
MAX_ID_CHARS = 256
MAX_TAG = 2**31 - 1
MAX_HEADS = 65536  # KV heads of a layer, and decode workers pulling from one prefill worker
_MAX_INT = 2**63 - 1


class ErrorCode(str, enum.Enum):
    PROTOCOL = "protocol"  # malformed message: frames, encoding, version, field types
    AUTH = "auth"  # missing or wrong MAC
    TOO_LARGE = "too_large"  # control frame over MAX_MESSAGE_BYTES
    LAYOUT = "layout"  # the peer's KV layout cannot exchange blocks with ours
    LINK = "link"  # no usable link with this peer: say HELLO (again)
    UNKNOWN = "unknown"  # transfer never held here, or not yet: retry a little
    EXPIRED = "expired"  # was held, its lease ran out
    STATE = "state"  # held (or just released) but not pullable now
    RANGE = "range"  # blocks out of the held range
    BUSY = "busy"  # too many peers, or too many held blocks


class ProtocolError(Exception):
    """A control message that cannot be accepted (or built)."""

    code = ErrorCode.PROTOCOL


class TooLargeError(ProtocolError):
    code = ErrorCode.TOO_LARGE


class AuthError(ProtocolError):
    """The message's MAC is missing or wrong."""

    code = ErrorCode.AUTH


class MsgType(str, enum.Enum):
    HELLO = "hello"
    WELCOME = "welcome"
    CLAIM = "claim"
    PULL = "pull"
    SENDING = "sending"
    DONE = "done"
    ERROR = "error"


def _text(max_chars: int) -> Callable[[Any], bool]:
    return lambda x: type(x) is str and len(x) <= max_chars


def _int(low: int, high: int = _MAX_INT) -> Callable[[Any], bool]:
    return lambda x: type(x) is int and low <= x <= high


def _is_bool(x: Any) -> bool:
    return type(x) is bool


def _is_map(x: Any) -> bool:
    return type(x) is dict


def _block_ids(x: Any) -> bool:
    return type(x) is bytes and len(x) % 4 == 0


def _is_code(x: Any) -> bool:
    return type(x) is str and x in ErrorCode._value2member_map_


_ID = _text(MAX_ID_CHARS)
_MESSAGE = _text(4096)
_FIELD_HINTS = {"layout": "a map", "reads": "a map", "pid": "an int in [1, 2**31 - 1]",
                "block_ids": "bytes (uint32 ids)", "failed": "a bool",
                "code": f"one of {[c.value for c in ErrorCode]}",
                "tag": f"an int in [1, {MAX_TAG}]", "store_port": "an int in [1, 65535]",
                "message": "a str of at most 4096 chars"}

# Each type's fields: name -> (check, required).
FIELDS: dict[MsgType, dict[str, tuple[Callable[[Any], bool], bool]]] = {
    MsgType.HELLO: {"peer_id": (_ID, True), "layout": (_is_map, True),
                    "pid": (_int(1, MAX_TAG), False)},
    MsgType.WELCOME: {"store_port": (_int(1, 65535), True), "group": (_ID, True),
                      "reads": (_is_map, False)},
    MsgType.CLAIM: {"transfer_id": (_ID, True)},
    MsgType.PULL: {"peer_id": (_ID, True), "transfer_id": (_ID, True),
                   "first_block": (_int(0, MAX_TAG), True), "num_blocks": (_int(0, MAX_TAG), True),
                   "first_head": (_int(0, MAX_HEADS), False),
                   "num_heads": (_int(1, MAX_HEADS), False), "tag": (_int(1, MAX_TAG), True)},
    MsgType.SENDING: {"transfer_id": (_ID, True), "num_bytes": (_int(0), True),
                      "tag": (_int(1, MAX_TAG), True), "block_ids": (_block_ids, False)},
    MsgType.DONE: {"transfer_id": (_ID, True), "peer_id": (_ID, False),
                   "pullers": (_int(1, MAX_HEADS), False), "failed": (_is_bool, False)},
    MsgType.ERROR: {"message": (_MESSAGE, True), "code": (_is_code, True),
                    "transfer_id": (_ID, False)},
}


def check_fields(kind: MsgType, fields: dict[str, Any]) -> None:
    """Raise ``ProtocolError`` unless ``fields`` are exactly a valid ``kind`` message's fields."""
    spec = FIELDS[kind]
    unknown = sorted(set(fields) - set(spec))
    if unknown:
        raise ProtocolError(f"{kind.value} message has unknown fields {unknown}")
    missing = [name for name, (_, required) in spec.items() if required and name not in fields]
    if missing:
        raise ProtocolError(f"{kind.value} message lacks {missing}")
    for name, value in fields.items():
        if not spec[name][0](value):
            hint = _FIELD_HINTS.get(name, "a str of at most 256 chars" if spec[name][0] is _ID
                                    else "a non-negative int in range")
            raise ProtocolError(
                f"{kind.value} field {name} must be {hint}, got {type(value).__name__}")


class Codec:
    """Encodes and checks control messages; signs and verifies them when given a secret.

    Stateless after construction, so one instance may be shared by threads.
    """

    def __init__(self, secret: bytes | None) -> None:
        if secret is not None and (type(secret) is not bytes or not secret):
            raise ValueError("the KV secret must be non-empty bytes (or None)")
        self._secret = secret

    @property
    def is_authenticated(self) -> bool:
        return self._secret is not None

    @classmethod
    def from_env(cls) -> Codec:
        from kvtransfer.env import kv_secret

        return cls(kv_secret())

    def encode(self, kind: MsgType, **fields: Any) -> bytes:
        """One message's wire form; raise ``ProtocolError`` on a field the peer would refuse."""
        check_fields(kind, fields)
        msg = {"v": PROTOCOL_VERSION, "type": kind.value, **fields}
        if self._secret is not None:
            msg["mac"] = self._mac(msg)
        data = msgpack.packb(msg)
        if len(data) > MAX_MESSAGE_BYTES:
            raise TooLargeError(f"{kind.value} message of {len(data)} bytes is over the limit")
        return data

    def decode(self, data: bytes) -> tuple[MsgType, dict[str, Any]]:
        """Parse and check one message: raise ``ProtocolError`` (``AuthError`` for the MAC)."""
        if len(data) > MAX_MESSAGE_BYTES:
            raise TooLargeError(f"control message of {len(data)} bytes is over the limit")
        try:
            msg = msgpack.unpackb(data)
        except Exception as e:  # msgpack raises several types on garbage
            raise ProtocolError(f"undecodable control message: {type(e).__name__}") from e
        if type(msg) is not dict:
            raise ProtocolError("control message is not a map")
        version = msg.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version!r:.20} does not match ours ({PROTOCOL_VERSION})")
        mac = msg.pop("mac", None)
        if self._secret is not None:
            self._verify(msg, mac)
        try:
            kind = MsgType(msg.pop("type"))
        except (KeyError, ValueError, TypeError) as e:
            raise ProtocolError("unknown control message type") from e
        msg.pop("v")
        check_fields(kind, msg)
        if kind is MsgType.ERROR:
            msg["code"] = ErrorCode(msg["code"])
        return kind, msg

    def _mac(self, msg: dict[str, Any]) -> bytes:
        body = msgpack.packb({k: msg[k] for k in sorted(msg)})
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def _verify(self, msg: dict[str, Any], mac: Any) -> None:
        if mac is None:
            raise AuthError("control message is not signed")
        if type(mac) is not bytes or len(mac) != MAC_BYTES:
            raise AuthError("control message has a malformed MAC")
        try:
            expected = self._mac(msg)
        except (TypeError, ValueError) as e:  # e.g. keys of mixed types cannot be sorted
            raise ProtocolError("control message cannot be canonicalised") from e
        if not hmac.compare_digest(mac, expected):
            raise AuthError("control message has a wrong MAC")


MAX_READ_BLOCKS = 8192  # blocks one SENDING may name (32 KiB of ids): a pair that reads pulls
# longer transfers in ranges of at most this many blocks


def pack_block_ids(block_ids: list[int]) -> bytes:
    """SENDING's ``block_ids``: uint32, little endian."""
    return np.asarray(block_ids, dtype="<u4").tobytes()


def unpack_block_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<u4").tolist()
