"""The versioned, signed msgpack control messages between decode and prefill workers."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgpack
import pytest

from kvtransfer.env import parse_secret
from kvtransfer.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    AuthError,
    Codec,
    ErrorCode,
    MsgType,
    ProtocolError,
    TooLargeError,
    pack_block_ids,
    unpack_block_ids,
)

SECRET = b"0123456789abcdef0123456789abcdef"
LAYOUT = {"block_size": 16, "layers": [["layer.0", [2, 16, 64], "float32"]]}
PLAIN = Codec(None)
SIGNED = Codec(SECRET)

# One valid message of each type with all its fields (ERROR's transfer_id is optional).
SAMPLES: dict[MsgType, dict[str, Any]] = {
    MsgType.HELLO: {"peer_id": "host-1-0-abcd", "layout": LAYOUT, "pid": 4242},
    MsgType.WELCOME: {"store_port": 29517, "group": "0f0f",
                      "reads": {"pid": 7, "probe": [1 << 40, b"n" * 16],
                                "layers": [[1 << 41, 4096]], "num_blocks": 512,
                                "timeout_ms": 30000}},
    MsgType.CLAIM: {"transfer_id": "t-1"},
    MsgType.PULL: {"peer_id": "p", "transfer_id": "t-1", "first_block": 2, "num_blocks": 5,
                   "tag": 17, "first_head": 1, "num_heads": 2},
    MsgType.SENDING: {"transfer_id": "t-1", "num_bytes": 1 << 33, "tag": 17,
                      "block_ids": pack_block_ids([3, 70000, 2**32 - 1])},
    MsgType.DONE: {"transfer_id": "t-1", "peer_id": "p", "pullers": 2, "failed": True},
    MsgType.ERROR: {"message": "blocks [0, 9) out of range", "code": "range",
                    "transfer_id": "t-1"},
}
WIRE_NAMES = {
    MsgType.HELLO: "hello", MsgType.WELCOME: "welcome", MsgType.CLAIM: "claim",
    MsgType.PULL: "pull", MsgType.SENDING: "sending", MsgType.DONE: "done",
    MsgType.ERROR: "error",
}
# The fields each type needs, written out here rather than read from the module.
REQUIRED: dict[MsgType, tuple[str, ...]] = {
    MsgType.HELLO: ("peer_id", "layout"),
    MsgType.WELCOME: ("store_port", "group"),
    MsgType.CLAIM: ("transfer_id",),
    MsgType.PULL: ("peer_id", "transfer_id", "first_block", "num_blocks", "tag"),
    MsgType.SENDING: ("transfer_id", "num_bytes", "tag"),
    MsgType.DONE: ("transfer_id",),
    MsgType.ERROR: ("message", "code"),
}


def _packed(**msg: Any) -> bytes:
    return msgpack.packb(msg)


def _signed(**msg: Any) -> bytes:
    """A message signed as the protocol says, built here without the Codec."""
    body = msgpack.packb({k: msg[k] for k in sorted(msg)})
    return msgpack.packb({**msg, "mac": hmac.new(SECRET, body, hashlib.sha256).digest()})


def test_samples_cover_every_type() -> None:
    assert set(SAMPLES) == set(MsgType) == set(REQUIRED)


def test_current_version_is_six() -> None:
    assert PROTOCOL_VERSION == 6


@pytest.mark.parametrize("codec", [PLAIN, SIGNED], ids=["plain", "signed"])
@pytest.mark.parametrize("kind", list(MsgType), ids=lambda k: k.value)
def test_round_trip(codec: Codec, kind: MsgType) -> None:
    got_kind, got = codec.decode(codec.encode(kind, **SAMPLES[kind]))
    assert got_kind is kind
    assert got == SAMPLES[kind]


def test_error_code_decodes_to_the_enum() -> None:
    _, msg = PLAIN.decode(PLAIN.encode(MsgType.ERROR, message="m", code="expired"))
    assert msg["code"] is ErrorCode.EXPIRED


def test_error_codes_are_distinct_strings() -> None:
    values = [c.value for c in ErrorCode]
    assert len(set(values)) == len(values)
    assert {"unknown", "expired", "auth", "protocol", "too_large"} <= set(values)


@pytest.mark.parametrize("kind", list(MsgType), ids=lambda k: k.value)
def test_wire_form_is_a_versioned_map(kind: MsgType) -> None:
    raw = msgpack.unpackb(PLAIN.encode(kind, **SAMPLES[kind]))
    assert raw == {"v": 6, "type": WIRE_NAMES[kind], **SAMPLES[kind]}


@pytest.mark.parametrize("kind", list(MsgType), ids=lambda k: k.value)
def test_signed_wire_form_matches_an_independent_hmac(kind: MsgType) -> None:
    fields = {"v": 6, "type": WIRE_NAMES[kind], **SAMPLES[kind]}
    assert msgpack.unpackb(SIGNED.encode(kind, **SAMPLES[kind])) == msgpack.unpackb(
        _signed(**fields))
    assert SIGNED.decode(_signed(**fields))[0] is kind


# 2: before remote_addresses; 3: before head ranges and pullers; 4: before direct reads
@pytest.mark.parametrize("version", [0, 2, 3, 4, 5, 7, None, "6", 6.0, True])
def test_wrong_version_is_refused(version: Any) -> None:
    with pytest.raises(ProtocolError, match="version"):
        PLAIN.decode(_packed(v=version, type="done", transfer_id="t"))


def test_missing_version_is_refused() -> None:
    with pytest.raises(ProtocolError, match="version"):
        PLAIN.decode(_packed(type="done", transfer_id="t"))


@pytest.mark.parametrize(
    ("kind", "name"),
    [(kind, name) for kind, names in REQUIRED.items() for name in names],
    ids=lambda x: x.value if isinstance(x, MsgType) else x,
)
def test_a_missing_required_field_is_refused(kind: MsgType, name: str) -> None:
    fields = {k: v for k, v in SAMPLES[kind].items() if k != name}
    with pytest.raises(ProtocolError, match=name):
        PLAIN.decode(_packed(v=PROTOCOL_VERSION, type=WIRE_NAMES[kind], **fields))
    with pytest.raises(ProtocolError, match=name):
        PLAIN.encode(kind, **fields)


def test_error_without_transfer_id_is_fine() -> None:
    assert PLAIN.decode(PLAIN.encode(MsgType.ERROR, message="m", code="busy"))[1] == {
        "message": "m", "code": "busy"}


@pytest.mark.parametrize("kind", list(MsgType), ids=lambda k: k.value)
def test_unknown_fields_are_refused(kind: MsgType) -> None:
    data = _packed(v=PROTOCOL_VERSION, type=WIRE_NAMES[kind], **SAMPLES[kind], extra=1)
    with pytest.raises(ProtocolError, match="unknown fields"):
        PLAIN.decode(data)


# (type, field, bad value): bool is not an int, floats are not ints, ranges are enforced.
BAD_VALUES = [
    (MsgType.PULL, "first_block", 1.0),
    (MsgType.PULL, "first_block", True),
    (MsgType.PULL, "first_block", -1),
    (MsgType.PULL, "first_block", 2**31),
    (MsgType.PULL, "first_block", "0"),
    (MsgType.PULL, "num_blocks", False),
    (MsgType.PULL, "num_blocks", -3),
    (MsgType.PULL, "num_blocks", None),
    (MsgType.PULL, "tag", 0),
    (MsgType.PULL, "tag", 2**31),
    (MsgType.PULL, "tag", 1.5),
    (MsgType.PULL, "transfer_id", b"t-1"),
    (MsgType.PULL, "transfer_id", 7),
    (MsgType.PULL, "transfer_id", "x" * 257),
    (MsgType.PULL, "peer_id", ["p"]),
    (MsgType.HELLO, "peer_id", "p" * 257),
    (MsgType.HELLO, "layout", [1, 2]),
    (MsgType.HELLO, "layout", "layout"),
    (MsgType.WELCOME, "store_port", 0),
    (MsgType.WELCOME, "store_port", 65536),
    (MsgType.WELCOME, "store_port", True),
    (MsgType.WELCOME, "group", 5),
    (MsgType.SENDING, "num_bytes", -1),
    (MsgType.SENDING, "num_bytes", 1e3),
    (MsgType.SENDING, "tag", True),
    (MsgType.SENDING, "block_ids", [3, 4]),
    (MsgType.SENDING, "block_ids", b"abc"),
    (MsgType.HELLO, "pid", 0),
    (MsgType.HELLO, "pid", "4242"),
    (MsgType.WELCOME, "reads", [7]),
    (MsgType.PULL, "first_head", -1),
    (MsgType.PULL, "first_head", True),
    (MsgType.PULL, "num_heads", 0),
    (MsgType.PULL, "num_heads", 65537),
    (MsgType.DONE, "transfer_id", None),
    (MsgType.DONE, "pullers", 0),
    (MsgType.DONE, "pullers", 2.0),
    (MsgType.DONE, "peer_id", 3),
    (MsgType.DONE, "failed", 1),
    (MsgType.DONE, "failed", "yes"),
    (MsgType.CLAIM, "transfer_id", {"id": "t"}),
    (MsgType.ERROR, "code", "hold"),
    (MsgType.ERROR, "code", 1),
    (MsgType.ERROR, "message", "m" * 4097),
    (MsgType.ERROR, "transfer_id", 3),
]


@pytest.mark.parametrize(("kind", "name", "value"), BAD_VALUES, ids=repr)
def test_wrong_types_and_ranges_are_refused(kind: MsgType, name: str, value: Any) -> None:
    fields = {**SAMPLES[kind], name: value}
    with pytest.raises(ProtocolError, match=name):
        PLAIN.decode(_packed(v=PROTOCOL_VERSION, type=WIRE_NAMES[kind], **fields))
    with pytest.raises(ProtocolError, match=name):
        PLAIN.encode(kind, **fields)


@pytest.mark.parametrize(("name", "value"), [("first_block", 2**31 - 1), ("num_blocks", 0),
                                             ("tag", 1), ("tag", 2**31 - 1)])
def test_range_edges_are_accepted(name: str, value: int) -> None:
    fields = {**SAMPLES[MsgType.PULL], name: value}
    assert PLAIN.decode(PLAIN.encode(MsgType.PULL, **fields))[1][name] == value


@pytest.mark.parametrize("type_", ["pong", "", None, 3, [1]])
def test_unknown_type_is_refused(type_: Any) -> None:
    with pytest.raises(ProtocolError, match="type"):
        PLAIN.decode(_packed(v=PROTOCOL_VERSION, type=type_, transfer_id="t"))


def test_missing_type_is_refused() -> None:
    with pytest.raises(ProtocolError, match="type"):
        PLAIN.decode(_packed(v=PROTOCOL_VERSION, transfer_id="t"))


@pytest.mark.parametrize("value", [1, "done", [PROTOCOL_VERSION, "done"], None, b"bytes"],
                         ids=repr)
def test_non_map_is_refused(value: Any) -> None:
    with pytest.raises(ProtocolError, match="not a map"):
        PLAIN.decode(msgpack.packb(value))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # reserved msgpack byte
        b"\x92\x01",  # a two-element array cut short
        b"\xff" * 10,  # trailing data after one value
        PLAIN.encode(MsgType.DONE, transfer_id="t") + b"\x00",
        msgpack.packb({1: 2}),  # non-string map key
        b"\x81\xa1v\xd4\x05\x00",  # an extension type as the version
        b"\x81\xa1v\xa2\xff\xfe",  # invalid UTF-8
    ],
    ids=["empty", "reserved", "truncated", "extra", "trailing", "int-key", "ext", "utf8"],
)
def test_garbage_bytes_are_refused(data: bytes) -> None:
    for codec in (PLAIN, SIGNED):
        with pytest.raises(ProtocolError):
            codec.decode(data)


def test_random_bytes_raise_only_protocol_errors() -> None:
    import random

    rng = random.Random(1234)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
        for codec in (PLAIN, SIGNED):
            try:
                codec.decode(data)
            except ProtocolError:
                pass


# -- size ---------------------------------------------------------------------------------------


def test_oversized_frame_is_refused_before_parsing() -> None:
    data = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(TooLargeError) as info:
        PLAIN.decode(data)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_oversized_message_is_not_encoded() -> None:
    layout = {"layers": ["x" * 1000] * 70}
    with pytest.raises(TooLargeError):
        PLAIN.encode(MsgType.HELLO, peer_id="p", layout=layout)
    with pytest.raises(TooLargeError):
        PLAIN.decode(_packed(v=PROTOCOL_VERSION, type="hello", peer_id="p", layout=layout))


# -- the MAC ------------------------------------------------------------------------------------


def test_signed_message_decodes_and_has_no_mac_field() -> None:
    kind, msg = SIGNED.decode(SIGNED.encode(MsgType.DONE, transfer_id="t"))
    assert (kind, msg) == (MsgType.DONE, {"transfer_id": "t"})


def test_unsigned_message_is_refused_with_a_secret() -> None:
    with pytest.raises(AuthError, match="not signed") as info:
        SIGNED.decode(PLAIN.encode(MsgType.DONE, transfer_id="t"))
    assert info.value.code is ErrorCode.AUTH


def test_message_signed_with_another_secret_is_refused() -> None:
    other = Codec(b"another secret, also 32 bytes!!!")
    with pytest.raises(AuthError, match="wrong MAC"):
        SIGNED.decode(other.encode(MsgType.DONE, transfer_id="t"))


@pytest.mark.parametrize("mac", [b"", b"\x00" * 31, b"\x00" * 33, "a" * 32, 5], ids=repr)
def test_malformed_mac_is_refused(mac: Any) -> None:
    with pytest.raises(AuthError):
        SIGNED.decode(_packed(v=PROTOCOL_VERSION, type="done", transfer_id="t", mac=mac))


@pytest.mark.parametrize(("name", "value"), [("transfer_id", "t-2"), ("first_block", 0),
                                             ("tag", 18), ("type", "claim")])
def test_tampered_field_is_refused(name: str, value: Any) -> None:
    raw = msgpack.unpackb(SIGNED.encode(MsgType.PULL, **SAMPLES[MsgType.PULL]))
    raw[name] = value
    with pytest.raises(AuthError, match="wrong MAC"):
        SIGNED.decode(msgpack.packb(raw))


def test_field_order_does_not_matter() -> None:
    raw = msgpack.unpackb(SIGNED.encode(MsgType.PULL, **SAMPLES[MsgType.PULL]))
    reordered = dict(reversed(list(raw.items())))
    assert SIGNED.decode(msgpack.packb(reordered))[1] == SAMPLES[MsgType.PULL]


def test_a_side_without_secret_reads_signed_messages() -> None:
    assert PLAIN.decode(SIGNED.encode(MsgType.DONE, transfer_id="t"))[1] == {"transfer_id": "t"}


@pytest.mark.parametrize("secret", [b"", "text", 5])
def test_codec_refuses_a_bad_secret(secret: Any) -> None:
    with pytest.raises(ValueError):
        Codec(secret)


def test_authentication_is_reported() -> None:
    assert SIGNED.is_authenticated and not PLAIN.is_authenticated


# -- the secret from the environment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", None), ("   ", None), ("00ff10", b"\x00\xff\x10"), ("abc", b"abc"),
     ("not hex at all", b"not hex at all"), (" 0a0b ", b"\x0a\x0b")],
)
def test_secret_is_hex_or_text(text: str, expected: bytes | None) -> None:
    assert parse_secret(text) == expected


def test_kv_secret_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtransfer.env import KV_SECRET_ENV, kv_secret

    monkeypatch.setenv(KV_SECRET_ENV, SECRET.hex())
    assert kv_secret() == SECRET
    assert Codec.from_env().is_authenticated
    monkeypatch.delenv(KV_SECRET_ENV)
    assert kv_secret() is None


def test_secret_is_never_logged(monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    from kvtransfer import env

    monkeypatch.setattr(env, "_warned", set())
    monkeypatch.setenv(env.KV_SECRET_ENV, "short-secret")
    with caplog.at_level("DEBUG"):
        assert env.kv_secret() == b"short-secret"
    assert "shorter than" in caplog.text
    assert "short-secret" not in caplog.text


def test_block_ids_travel_as_uint32() -> None:
    ids = [0, 1, 65535, 65536, 2**32 - 1]
    kind, msg = PLAIN.decode(PLAIN.encode(MsgType.SENDING, transfer_id="t", num_bytes=0, tag=1,
                                          block_ids=pack_block_ids(ids)))
    assert unpack_block_ids(msg["block_ids"]) == ids
    assert len(pack_block_ids(ids)) == 4 * len(ids)
