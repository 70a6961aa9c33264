"""Hypothesis throws hostile frames at a LIVE ProducerEndpoint (raw DEALER and REQ sockets) while
a good, authenticated peer keeps completing real pulls over its Gloo link and checking the
bytes. The endpoint must stay alive, answer every refusal it can, and leave nothing SENDING."""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

import msgpack
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtransfer.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Codec, ErrorCode, MsgType
from tests.helpers import wait_until
from tests.unit.test_producer_support import (
    HOST,
    NUM_BLOCKS,
    RawPeer,
    expected_bytes,
    running_producer,
)

GOOD_PEER_ID = "good-peer"
WRONG = Codec(b"not the deployment's secret......")
PLAIN = Codec(None)

# Values of every msgpack type, with the edge cases the checks must get right.
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=300), st.binary(max_size=64),
    st.lists(st.integers(0, 10), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, True, False, 1.0, "", "t-good-0"]),
)
FIELD_NAMES = st.sampled_from(["peer_id", "transfer_id", "first_block", "num_blocks", "tag",
                               "layout", "store_port", "group", "num_bytes", "message", "code",
                               "mac", "extra"])
TYPES = st.sampled_from([t.value for t in MsgType] + ["pong", ""])


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """A msgpack map that looks like a message: any version, type and fields."""
    msg: dict[str, Any] = {"v": draw(st.one_of(st.just(PROTOCOL_VERSION), VALUES)),
                           "type": draw(st.one_of(TYPES, VALUES))}
    msg.update(draw(st.dictionaries(FIELD_NAMES, VALUES, max_size=6)))
    return msgpack.packb(msg)


@st.composite
def valid_but_unauthentic(draw: st.DrawFn) -> bytes:
    """A well-formed message aimed at the good peer's holds and link, unsigned or signed with
    the wrong secret: it must neither pull, free, claim nor re-pair anything."""
    codec = draw(st.sampled_from([PLAIN, WRONG]))
    transfer_id = f"t-good-{draw(st.integers(0, 3))}"
    kind = draw(st.sampled_from([MsgType.DONE, MsgType.CLAIM, MsgType.PULL, MsgType.HELLO]))
    fields: dict[str, Any] = {
        MsgType.DONE: {"transfer_id": transfer_id},
        MsgType.CLAIM: {"transfer_id": transfer_id},
        MsgType.PULL: {"peer_id": GOOD_PEER_ID, "transfer_id": transfer_id, "first_block": 0,
                       "num_blocks": 1, "tag": draw(st.integers(1, 2**31 - 1))},
        MsgType.HELLO: {"peer_id": GOOD_PEER_ID, "layout": {}},
    }[kind]
    return codec.encode(kind, **fields)


FRAME = st.one_of(
    st.binary(max_size=200),
    structured(),
    valid_but_unauthentic(),
    st.sampled_from([b"", b"\xc1", msgpack.packb({"v": 1, "type": "done", "transfer_id": "t"})]),
)
HUGE = st.integers(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES).map(lambda n: b"\x92" * n)
MESSAGES = st.one_of(
    st.lists(FRAME, min_size=1, max_size=1),  # one frame: the shape the protocol expects
    st.lists(FRAME, min_size=2, max_size=6),  # multi-frame
    st.lists(HUGE, min_size=1, max_size=1),  # ZMQ drops the connection (MAXMSGSIZE)
)


class GoodPeer(threading.Thread):
    """Pulls held blocks again and again, checking every byte, until told to stop."""

    def __init__(self, producer: Any) -> None:
        super().__init__(name="good-peer", daemon=True)
        self.producer = producer
        self.num_pulls = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        peer = RawPeer(self.producer.address, self.producer.layout, peer_id=GOOD_PEER_ID)
        rng = random.Random(7)
        try:
            peer.hello()
            for i in itertools.count():
                if self._stop_event.is_set():
                    return
                self._pull_once(peer, f"t-good-{i % 4}", i + 1, rng)
        except BaseException as e:  # handed to the test thread
            self.error = e
        finally:
            peer.close()

    def _pull_once(self, peer: RawPeer, transfer_id: str, tag: int, rng: random.Random) -> None:
        holds = self.producer.holds
        block_ids = rng.sample(range(NUM_BLOCKS), rng.randint(1, 4))
        holds.add(transfer_id, f"req-{tag}", block_ids, 60.0)
        got = peer.pull(transfer_id, 0, len(block_ids), tag)
        assert isinstance(got, torch.Tensor), f"good pull refused: {got}"
        assert torch.equal(got, expected_bytes(self.producer.caches, block_ids))
        peer.send(MsgType.DONE, transfer_id=transfer_id)
        wait_until(lambda: f"req-{tag}" in holds.take_released(), 10.0, what="release")
        self.num_pulls += 1


def _raw_socket(ctx: zmq.Context, kind: int, port: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{HOST}:{port}")
    return sock


def test_hostile_frames_never_stop_good_pulls() -> None:
    with running_producer(timeout_s=10.0) as producer:
        good = GoodPeer(producer)
        good.start()
        ctx = zmq.Context()
        dealer = _raw_socket(ctx, zmq.DEALER, producer.address[1])
        num_sent = {"dealer": 0, "req": 0, "huge": 0}

        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(frames=MESSAGES, use_req=st.booleans())
        def throw(frames: list[bytes], use_req: bool) -> None:
            if any(len(frame) > MAX_MESSAGE_BYTES for frame in frames):
                # ZMQ drops the sender's connection (MAXMSGSIZE): no answer. A socket of its
                # own, so the dealer's queued messages are not lost with it.
                huge = _raw_socket(ctx, zmq.DEALER, producer.address[1])
                huge.send_multipart(frames)
                assert not huge.poll(50)
                huge.close()
                num_sent["huge"] += 1
            elif use_req and len(frames) == 1:
                # A REQ client's message arrives as [identity, "", payload]: refused, answered.
                req = _raw_socket(ctx, zmq.REQ, producer.address[1])
                req.send(frames[0])
                assert req.poll(5000), "the REQ client got no answer"
                assert PLAIN.decode(req.recv())[1]["code"] is ErrorCode.PROTOCOL
                req.close()
                num_sent["req"] += 1
            else:  # every other message is refused with an answer
                dealer.send_multipart(frames)
                assert dealer.poll(5000), "the DEALER client got no answer"
                kind, msg = PLAIN.decode(dealer.recv_multipart()[-1])  # after any envelope
                assert kind is MsgType.ERROR, (kind, msg)
                assert msg["code"] in (ErrorCode.PROTOCOL, ErrorCode.AUTH), msg
                num_sent["dealer"] += 1
            assert producer.endpoint.is_alive()
            assert good.error is None, good.error

        try:
            throw()
            wait_until(lambda: good.num_pulls >= 5, 20.0, what="good pulls")
        finally:
            good.stop()
            dealer.close()
            ctx.term()
        assert good.error is None, good.error
        counts = producer.endpoint.counts
        assert producer.endpoint.is_alive()
        assert producer.holds.num_sending == 0
        num_answered = num_sent["dealer"] + num_sent["req"]
        assert counts["num_protocol_errors"] + counts["num_auth_failures"] == num_answered
        assert min(num_sent.values()) > 0, num_sent
        assert counts["num_internal_errors"] == 0
        assert counts["num_links_opened"] == 1  # nothing re-paired the good peer
        # Only the good peer's pulls ran (the producer counts each just after the send ends).
        wait_until(lambda: counts["num_pulls"] == good.num_pulls, what="pull count")
