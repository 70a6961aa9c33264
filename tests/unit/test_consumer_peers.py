"""The consumer against misbehaving prefill peers (real ZMQ, real TCPStore): stalled peers,
replies that are not for the pull, claims, releases that must not wait, health."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import zmq

from kvtransfer.blocks import KVLayout
from kvtransfer.consumer import ConsumerEndpoint, LoadResults
from kvtransfer.holds import HoldTable
from kvtransfer.link import Link
from kvtransfer.metadata import ClaimSpec, LoadSpec
from kvtransfer.producer import ProducerEndpoint
from kvtransfer.protocol import Codec, MsgType
from tests.helpers import BLOCK_SIZE, make_kv_caches, wait_until

HOST = "127.0.0.1"
NUM_BLOCKS = 10
SECRET = b"0123456789abcdef-test-secret"
CODEC = Codec(SECRET)


class FakePeer:
    """A prefill worker's ROUTER socket, scripted: ``answer(kind, msg)`` returns the reply
    (kind, fields) or None to stay silent. Records every message it got."""

    def __init__(self, answer: Callable[[MsgType, dict[str, Any]], Any]) -> None:
        self.store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
        self.received: list[tuple[MsgType, dict[str, Any]]] = []
        self._answer = answer
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.port = self._sock.bind_to_random_port(f"tcp://{HOST}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            identity, data = self._sock.recv_multipart()
            kind, msg = CODEC.decode(data)
            self.received.append((kind, msg))
            reply = self._answer(kind, msg)
            if reply is not None:
                self._sock.send_multipart([identity, CODEC.encode(reply[0], **reply[1])])

    def kinds(self) -> list[MsgType]:
        return [kind for kind, _ in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()


class FillLink(Link):
    """Writes 0xFF into whatever it receives: any scatter of it would show in the cache."""

    num_recvs = 0

    def __init__(self, *args: Any) -> None:
        pass

    def send(self, buffer: torch.Tensor, tag: int) -> None:
        raise AssertionError("the consumer never sends")

    def recv(self, buffer: torch.Tensor, tag: int) -> None:
        FillLink.num_recvs += 1
        buffer.fill_(0xFF)


def welcome_then(on_pull: Callable[[dict[str, Any]], Any], store: list[Any]) -> Callable:
    def answer(kind: MsgType, msg: dict[str, Any]) -> Any:
        if kind is MsgType.HELLO:
            return MsgType.WELCOME, {"store_port": store[0].store.port, "group": "g"}
        if kind is MsgType.PULL:
            return on_pull(msg)
        return None

    return answer


@pytest.fixture
def make_consumer() -> Iterator[Callable[..., ConsumerEndpoint]]:
    made: list[ConsumerEndpoint] = []

    def make(**kwargs: Any) -> ConsumerEndpoint:
        caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
        layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
        options = {"control_timeout_s": 2.0, "codec": CODEC, **kwargs}
        endpoint = ConsumerEndpoint(HOST, 0, caches, layout, 5.0, 0.3, **options)
        endpoint.test_caches = caches
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close()


def collect(consumer: ConsumerEndpoint, *request_ids: str, timeout_s: float = 10) -> LoadResults:
    merged = LoadResults()

    def done() -> bool:
        got = consumer.take_results()
        merged.finished |= got.finished
        merged.failed |= got.failed
        merged.failed_block_ids |= got.failed_block_ids
        return merged.finished >= set(request_ids)

    wait_until(done, timeout_s, what=f"results of {request_ids}")
    return merged


def spec(port: int, transfer_id: str, request_id: str | None, blocks: list[int]) -> LoadSpec:
    return LoadSpec(transfer_id, request_id, [(HOST, port)], 0, blocks)


@pytest.mark.parametrize(
    "reply",
    [lambda m: {**m, "transfer_id": "someone-else"}, lambda m: {**m, "tag": m["tag"] % 1000 + 1}],
    ids=["other-transfer", "other-tag"],
)
def test_a_sending_for_another_pull_is_refused_and_never_scattered(
    make_consumer: Callable[..., ConsumerEndpoint], reply: Callable
) -> None:
    holder: list[Any] = []

    def on_pull(msg: dict[str, Any]) -> Any:
        fields = reply({"transfer_id": msg["transfer_id"], "tag": msg["tag"]})
        return MsgType.SENDING, {"num_bytes": 2 * 1024, **fields}

    peer = FakePeer(welcome_then(on_pull, holder))
    holder.append(peer)
    try:
        FillLink.num_recvs = 0
        consumer = make_consumer(link_factory=FillLink)
        consumer.submit(spec(peer.port, "t-1", "req-1", [3, 4]))
        results = collect(consumer, "req-1")
        assert results.failed == {"req-1"} and results.failed_block_ids == {3, 4}
        assert FillLink.num_recvs == 0
        for tensor in consumer.test_caches.values():
            assert not torch.any(tensor)
        wait_until(lambda: MsgType.DONE in peer.kinds(), 5, what="DONE after the failure")
        assert [m.get("failed") for k, m in peer.received if k is MsgType.DONE] == [True]
        assert consumer.counts["num_failed_loads"] == 1
        # The link was dropped: the next load pairs again.
        consumer.submit(spec(peer.port, "t-2", "req-2", [5]))
        collect(consumer, "req-2")
        assert peer.kinds().count(MsgType.HELLO) == 2
    finally:
        peer.close()


def test_a_matching_sending_is_received_and_scattered(
    make_consumer: Callable[..., ConsumerEndpoint]
) -> None:
    holder: list[Any] = []
    peer = FakePeer(welcome_then(lambda m: (MsgType.SENDING, {
        "transfer_id": m["transfer_id"], "tag": m["tag"], "num_bytes": 1024}), holder))
    holder.append(peer)
    try:
        FillLink.num_recvs = 0
        consumer = make_consumer(link_factory=FillLink)
        consumer.submit(spec(peer.port, "t-1", "req-1", [6]))
        assert collect(consumer, "req-1").failed == set()
        assert FillLink.num_recvs == 1
        caches = consumer.test_caches
        assert all(torch.any(t[6]) and not torch.any(t[5]) for t in caches.values())
        wait_until(lambda: MsgType.DONE in peer.kinds(), 5, what="DONE")
        assert [m.get("failed") for k, m in peer.received if k is MsgType.DONE] == [None]
        tags = [m["tag"] for k, m in peer.received if k is MsgType.PULL]
        assert len(tags) == 1 and 1 <= tags[0] < 2**31
    finally:
        peer.close()


def test_a_stalled_peer_does_not_stall_loads_from_another_peer(
    make_consumer: Callable[..., ConsumerEndpoint]
) -> None:
    stalled = FakePeer(lambda kind, msg: None)  # never answers
    caches = make_kv_caches("cpu", NUM_BLOCKS, seed=3)
    layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
    holds = HoldTable()
    producer = ProducerEndpoint(HOST, 0, caches, layout, holds, 5.0, codec=CODEC)
    try:
        holds.add("t-ok", "engine-ok", [2, 7], 60)
        consumer = make_consumer(control_timeout_s=4.0)
        consumer.submit(spec(stalled.port, "t-stuck", "req-stuck", [0]))
        start = time.monotonic()
        consumer.submit(spec(producer.address[1], "t-ok", "req-ok", [4, 5]))
        results = collect(consumer, "req-ok")
        assert time.monotonic() - start < 3.0  # well before the stalled peer's timeout
        assert results.failed == set() and "req-stuck" not in results.finished
        for name, tensor in consumer.test_caches.items():
            assert torch.equal(tensor[4], caches[name][2])
            assert torch.equal(tensor[5], caches[name][7])
        assert consumer.health() is None
        later = collect(consumer, "req-stuck")
        assert later.failed == {"req-stuck"}
        # A dead peer fails its next loads at once instead of waiting again.
        consumer.submit(spec(stalled.port, "t-stuck-2", "req-stuck-2", [1]))
        start = time.monotonic()
        assert collect(consumer, "req-stuck-2").failed == {"req-stuck-2"}
        assert time.monotonic() - start < 1.0
    finally:
        producer.close()
        stalled.close()


def test_a_release_goes_out_while_the_peer_channel_waits_on_a_pull(
    make_consumer: Callable[..., ConsumerEndpoint]
) -> None:
    holder: list[Any] = []
    peer = FakePeer(welcome_then(lambda msg: None, holder))  # pulls are never answered
    holder.append(peer)
    try:
        consumer = make_consumer(link_factory=FillLink, control_timeout_s=4.0)
        consumer.submit(spec(peer.port, "t-slow", "req-slow", [1]))
        wait_until(lambda: MsgType.PULL in peer.kinds(), 5, what="the pull")
        consumer.submit(spec(peer.port, "t-rel", None, []))
        consumer.claim(ClaimSpec("t-claim", [(HOST, peer.port)]))
        wait_until(lambda: MsgType.DONE in peer.kinds() and MsgType.CLAIM in peer.kinds(), 2,
                   what="DONE and CLAIM while the pull is pending")
        done = [m["transfer_id"] for k, m in peer.received if k is MsgType.DONE]
        assert done == ["t-rel"]
        assert consumer.take_results().finished == set()  # the pull is still pending
        assert consumer.counts["num_claims_sent"] == 1
    finally:
        peer.close()


def test_a_claim_extends_the_hold_to_the_claim_lease(
    make_consumer: Callable[..., ConsumerEndpoint]
) -> None:
    caches = make_kv_caches("cpu", NUM_BLOCKS, seed=5)
    layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
    holds = HoldTable()
    producer = ProducerEndpoint(HOST, 0, caches, layout, holds, 5.0, claim_lease_s=60.0,
                                codec=CODEC)
    try:
        holds.add("t-claimed", "engine-c", [1], 0.5)
        holds.add("t-unclaimed", "engine-u", [2], 0.5)
        consumer = make_consumer()
        consumer.claim(ClaimSpec("t-claimed", [producer.address]))
        time.sleep(1.5)
        assert holds.take_released() == {"engine-u"}
        assert len(holds) == 1  # the claimed one is still held
    finally:
        producer.close()


def test_health_reports_a_closed_consumer(make_consumer: Callable[..., ConsumerEndpoint]) -> None:
    consumer = make_consumer()
    assert consumer.health() is None and consumer.is_alive()
    consumer.close()
    assert consumer.health() is not None and not consumer.is_alive()
