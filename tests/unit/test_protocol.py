"""The versioned msgpack control messages between decode and prefill workers."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from kvtransfer.protocol import PROTOCOL_VERSION, MsgType, ProtocolError, decode, encode

LAYOUT = {"block_size": 16, "layers": [["layer.0", [2, 16, 64], "float32"]]}

# One valid message of each type, with only the fields it needs plus, for some, extras.
SAMPLES: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {"peer_id": "host-1-0-abcd", "layout": LAYOUT},
    MsgType.WELCOME: {"store_port": 29517, "group": "host-1-0-abcd/0f0f"},
    MsgType.PULL: {"transfer_id": "t-1", "first_block": 2, "num_blocks": 5, "peer_id": "p"},
    MsgType.SENDING: {"num_bytes": 1 << 33, "transfer_id": "t-1"},
    MsgType.DONE: {"transfer_id": "t-1"},
    MsgType.ERROR: {"message": "blocks [0, 9) out of range", "code": "hold"},
}
WIRE_NAMES = {
    MsgType.HELLO: "hello", MsgType.WELCOME: "welcome", MsgType.PULL: "pull",
    MsgType.SENDING: "sending", MsgType.DONE: "done", MsgType.ERROR: "error",
}


def test_samples_cover_every_type() -> None:
    assert set(SAMPLES) == set(MsgType)


@pytest.mark.parametrize("kind", list(MsgType), ids=lambda k: k.value)
def test_round_trip(kind: MsgType) -> None:
    data = encode(kind, **SAMPLES[kind])
    got_kind, got = decode(data)
    assert got_kind is kind
    assert got == SAMPLES[kind]


@pytest.mark.parametrize("kind", list(MsgType), ids=lambda k: k.value)
def test_wire_form_is_a_versioned_map(kind: MsgType) -> None:
    raw = msgpack.unpackb(encode(kind, **SAMPLES[kind]))
    assert raw == {"v": 1, "type": WIRE_NAMES[kind], **SAMPLES[kind]}


def _packed(**msg: Any) -> bytes:
    return msgpack.packb(msg)


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_wrong_version_is_refused(version: Any) -> None:
    data = _packed(v=version, type="done", transfer_id="t")
    with pytest.raises(ProtocolError, match="version"):
        decode(data)


def test_missing_version_is_refused() -> None:
    with pytest.raises(ProtocolError, match="version"):
        decode(_packed(type="done", transfer_id="t"))


def test_current_version_is_one() -> None:
    assert PROTOCOL_VERSION == 1


# The fields each type needs, written out here rather than read from the module.
REQUIRED: dict[MsgType, tuple[str, ...]] = {
    MsgType.HELLO: ("peer_id", "layout"),
    MsgType.WELCOME: ("store_port", "group"),
    MsgType.PULL: ("transfer_id", "first_block", "num_blocks"),
    MsgType.SENDING: ("num_bytes",),
    MsgType.DONE: ("transfer_id",),
    MsgType.ERROR: ("message",),
}


@pytest.mark.parametrize(
    ("kind", "name"),
    [(kind, name) for kind, names in REQUIRED.items() for name in names],
    ids=lambda x: x.value if isinstance(x, MsgType) else x,
)
def test_decode_refuses_a_missing_required_field(kind: MsgType, name: str) -> None:
    fields = {k: v for k, v in SAMPLES[kind].items() if k != name}
    with pytest.raises(ProtocolError, match=name):
        decode(_packed(v=PROTOCOL_VERSION, type=WIRE_NAMES[kind], **fields))


@pytest.mark.parametrize(
    ("kind", "fields", "missing"),
    [
        (MsgType.PULL, {"transfer_id": "t", "first_block": 0}, "num_blocks"),
        (MsgType.HELLO, {"peer_id": "p"}, "layout"),
        (MsgType.WELCOME, {"group": "g"}, "store_port"),
        (MsgType.SENDING, {"transfer_id": "t"}, "num_bytes"),
        (MsgType.DONE, {}, "transfer_id"),
        (MsgType.ERROR, {"code": "hold"}, "message"),
    ],
)
def test_encode_refuses_missing_fields(
    kind: MsgType, fields: dict[str, Any], missing: str
) -> None:
    with pytest.raises(ProtocolError, match=missing):
        encode(kind, **fields)


@pytest.mark.parametrize("type_", ["pong", "", None, 3, [1]])
def test_unknown_type_is_refused(type_: Any) -> None:
    with pytest.raises(ProtocolError, match="type"):
        decode(_packed(v=PROTOCOL_VERSION, type=type_, transfer_id="t"))


def test_missing_type_is_refused() -> None:
    with pytest.raises(ProtocolError, match="type"):
        decode(_packed(v=PROTOCOL_VERSION, transfer_id="t"))


@pytest.mark.parametrize(
    "value", [1, "done", [PROTOCOL_VERSION, "done"], None, b"bytes"], ids=repr
)
def test_non_map_is_refused(value: Any) -> None:
    with pytest.raises(ProtocolError, match="not a map"):
        decode(msgpack.packb(value))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # reserved msgpack byte
        b"\x92\x01",  # a two-element array cut short
        b"\xff" * 10,  # trailing data after one value
        encode(MsgType.DONE, transfer_id="t") + b"\x00",
        msgpack.packb({1: 2}),  # non-string map key
    ],
    ids=["empty", "reserved", "truncated", "extra", "trailing", "int-key"],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_random_bytes_raise_only_protocol_errors() -> None:
    import random

    rng = random.Random(1234)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
        try:
            decode(data)
        except ProtocolError:
            pass
