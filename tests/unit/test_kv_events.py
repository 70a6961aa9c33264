"""The KV event subscriber against vLLM's own publisher (``ZmqEventPublisher``) on 127.0.0.1.

No engine: a seeded ``FakeEngine`` makes the events an engine would publish (stores on top of
held blocks, evictions), and ``expected_chains`` is the brute-force state of the index after a
run of batches applied to an empty replica. Loss is made by ``LossyProxy``, a PUB relay that
drops chosen batch numbers; malformed messages come from a raw XPUB socket.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import (
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from router.kv_events import KVEventSubscriber
from router.kvindex import KVIndex, RemovedBlocks, hash_token_blocks

BLOCK = 4
REPLICA = "prefill-0"


class FakeEngine:
    """What an engine caches (engine hash -> whole prefix) and the batches it publishes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.held: dict[int, tuple[int, ...]] = {}
        self._next_hash = 1000

    def store(self, parent: int | None = None) -> BlockStored:
        prefix = () if parent is None else self.held[parent]
        hashes, tokens = [], []
        for _ in range(self.rng.randint(1, 3)):
            block = [self.rng.randrange(50_000) for _ in range(BLOCK)]
            prefix = prefix + tuple(block)
            self._next_hash += 1
            self.held[self._next_hash] = prefix
            hashes.append(self._next_hash)
            tokens += block
        return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                           block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None)

    def remove(self, hashes: Sequence[int]) -> BlockRemoved:
        for h in hashes:
            del self.held[h]
        return BlockRemoved(block_hashes=list(hashes), medium="GPU")

    def batch(self) -> KVEventBatch:
        events: list[Any] = []
        for _ in range(self.rng.randint(1, 3)):
            if self.held and self.rng.random() < 0.35:
                events.append(self.remove(self.rng.sample(sorted(self.held), 1)))
            else:
                parent = self.rng.choice([None, *self.held]) if self.held else None
                events.append(self.store(parent))
        return KVEventBatch(ts=time.time(), events=events)


def expected_chains(batches: Sequence[KVEventBatch]) -> set[int]:
    """The blocks an index that saw only ``batches`` (from empty) holds, as chained hashes."""
    held: dict[int, tuple[int, ...]] = {}
    for batch in batches:
        for event in batch.events:
            if isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    held.pop(h, None)
                continue
            prefix = () if event.parent_block_hash is None else held.get(event.parent_block_hash)
            if prefix is None or len(event.token_ids) != BLOCK * len(event.block_hashes):
                continue  # an orphan (its parent came before what the index saw), or malformed
            for i, h in enumerate(event.block_hashes):
                prefix = prefix + tuple(event.token_ids[i * BLOCK : (i + 1) * BLOCK])
                held[h] = prefix
    return {hash_token_blocks(list(p), BLOCK)[-1] for p in held.values()}


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def publish(pub: ZmqEventPublisher, batches: Sequence[KVEventBatch]) -> None:
    """Publish and wait until every batch is out (sent and in the replay buffer)."""
    target = len(pub._buffer) + len(batches)
    for b in batches:
        pub.publish(b)
    assert wait_for(lambda: len(pub._buffer) >= min(target, pub._buffer.maxlen or target))
    assert wait_for(lambda: pub._event_queue.unfinished_tasks == 0)


@pytest.fixture
def make_publisher(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ZmqEventPublisher]]:
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")  # tcp://*:0 binds this address
    made: list[ZmqEventPublisher] = []

    def make(buffer_steps: int = 10_000) -> ZmqEventPublisher:
        pub = ZmqEventPublisher(0, endpoint="tcp://*:0", replay_endpoint="tcp://*:0",
                                buffer_steps=buffer_steps)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.shutdown()


class LockedIndex:
    """An index the subscriber's thread writes, read by the test under the same lock."""

    def __init__(self, index: KVIndex | None = None) -> None:
        self.index = index or KVIndex()
        self.lock = threading.Lock()

    def read(self, query: Callable[[KVIndex], Any]) -> Any:
        with self.lock:
            return query(self.index)


@pytest.fixture
def index_and_subscriber() -> Iterator[tuple[LockedIndex, KVEventSubscriber]]:
    index = LockedIndex()
    sub = KVEventSubscriber(index.index, index.lock, replay_timeout_s=1.0)
    yield index, sub
    sub.close()
    assert not sub.is_alive()


class LossyProxy:
    """Relays a publisher's PUB stream on its own XPUB socket, dropping chosen batch numbers."""

    def __init__(self, upstream: str, drop: set[int]) -> None:
        self.drop = drop
        self._ctx = zmq.Context()
        self._up = self._ctx.socket(zmq.SUB)
        self._up.setsockopt(zmq.SUBSCRIBE, b"")
        monitor = self._up.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._up.connect(upstream)
        self._down = self._ctx.socket(zmq.XPUB)
        port = self._down.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        assert monitor.poll(5000), "the relay never connected to the publisher"
        monitor.close(linger=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def wait_for_subscriber(self) -> None:
        """Block until a subscriber joined, then start relaying."""
        assert self._down.poll(5000), "no subscriber joined the relay"
        assert self._down.recv() == b"\x01"
        time.sleep(0.1)  # the relay's own subscription reaches the publisher
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._up.poll(20):
                frames = self._up.recv_multipart()
                if int.from_bytes(frames[1], "big") not in self.drop:
                    self._down.send_multipart(frames)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)


def chains(index: LockedIndex) -> set[int]:
    return index.read(lambda i: set(i.chains_of(REPLICA)))


def settles_at(index: LockedIndex, want: set[int]) -> bool:
    return bool(wait_for(lambda: chains(index) == want))


# -- re-learning from the replay buffer ---------------------------------------------------------


def test_late_subscriber_relearns_from_the_replay_buffer(make_publisher, index_and_subscriber):
    index, sub = index_and_subscriber
    pub = make_publisher()
    engine = FakeEngine(seed=1)
    batches = [engine.batch() for _ in range(30)]
    publish(pub, batches)  # nobody listens yet

    sub.sync({REPLICA: pub._endpoint}, replay_endpoints={REPLICA: pub._replay_endpoint})
    assert settles_at(index, expected_chains(batches))
    batches += [engine.batch() for _ in range(10)]
    publish(pub, batches[30:])
    assert settles_at(index, expected_chains(batches))
    assert chains(index) == {hash_token_blocks(list(p), BLOCK)[-1] for p in engine.held.values()}
    assert (sub.num_resyncs, sub.num_bad_events) == (0, 0)
    assert sub.num_events == sum(len(b.events) for b in batches)


def test_blocks_older_than_the_buffer_stay_unknown_never_wrongly_present(
        make_publisher, index_and_subscriber):
    index, sub = index_and_subscriber
    pub = make_publisher(buffer_steps=5)
    engine = FakeEngine(seed=2)
    batches = [engine.batch() for _ in range(35)]
    for _ in range(5):  # new prompts, and prompts extending ones cached long ago
        old = engine.rng.choice(sorted(engine.held))
        batches.append(KVEventBatch(ts=0.0, events=[engine.store(), engine.store(old)]))
    publish(pub, batches)

    sub.sync({REPLICA: pub._endpoint}, replay_endpoints={REPLICA: pub._replay_endpoint})
    window = expected_chains(batches[-5:])
    assert window and settles_at(index, window)
    truth = expected_chains(batches)
    assert window <= truth and window != truth  # some held blocks are unknown, none invented
    assert index.read(KVIndex.stats).num_orphan_blocks > 0


# -- gaps -----------------------------------------------------------------------------------


def follow_through_proxy(pub: ZmqEventPublisher, sub: KVEventSubscriber, drop: set[int],
                         with_replay: bool = True) -> LossyProxy:
    proxy = LossyProxy(pub._endpoint, drop)
    replay = {REPLICA: pub._replay_endpoint} if with_replay else None
    sub.sync({REPLICA: proxy.endpoint}, replay_endpoints=replay)
    proxy.wait_for_subscriber()
    return proxy


def test_gap_is_filled_by_replay(make_publisher, index_and_subscriber):
    index, sub = index_and_subscriber
    pub = make_publisher()
    engine = FakeEngine(seed=3)
    proxy = follow_through_proxy(pub, sub, drop={5, 6, 7})
    try:
        batches = [engine.batch() for _ in range(5)]
        publish(pub, batches)
        assert settles_at(index, expected_chains(batches))
        gaps_before = sub.num_gaps
        batches += [engine.batch() for _ in range(8)]
        publish(pub, batches[5:])
        assert settles_at(index, expected_chains(batches))
        assert sub.num_gaps == gaps_before + 1
        assert sub.num_replays >= 2  # on subscribing, then for the gap
        assert sub.num_resyncs == 0
    finally:
        proxy.close()


def test_gap_the_buffer_cannot_fill_drops_the_replica_and_rebuilds(
        make_publisher, index_and_subscriber):
    index, sub = index_and_subscriber
    pub = make_publisher(buffer_steps=2)
    engine = FakeEngine(seed=4)
    proxy = follow_through_proxy(pub, sub, drop={5, 6, 7})
    try:
        batches = [KVEventBatch(ts=0.0, events=[engine.store()]) for _ in range(5)]
        publish(pub, batches)
        assert settles_at(index, expected_chains(batches))
        evicted = next(iter(engine.held))
        batches.append(KVEventBatch(ts=0.0, events=[engine.remove([evicted])]))  # 5: lost
        batches += [engine.batch() for _ in range(3)]  # 6, 7 lost; 8 arrives
        publish(pub, batches[5:])
        # The replay from 5 only has 7 and 8: the index keeps just what they say.
        assert settles_at(index, expected_chains(batches[7:]))
        assert sub.num_resyncs == 1 and sub.num_gaps == 1
        batches.append(engine.batch())
        publish(pub, batches[9:])
        assert settles_at(index, expected_chains(batches[7:]))
    finally:
        proxy.close()


def test_gap_without_replay_endpoint_drops_and_rebuilds(make_publisher, index_and_subscriber):
    index, sub = index_and_subscriber
    pub = make_publisher()
    engine = FakeEngine(seed=5)
    proxy = follow_through_proxy(pub, sub, drop={3}, with_replay=False)
    try:
        batches = [engine.batch() for _ in range(3)]
        publish(pub, batches)
        assert settles_at(index, expected_chains(batches))
        batches += [engine.batch() for _ in range(4)]
        publish(pub, batches[3:])
        assert settles_at(index, expected_chains(batches[4:]))
        assert (sub.num_gaps, sub.num_resyncs, sub.num_replays) == (1, 1, 0)
    finally:
        proxy.close()


def test_dead_replay_socket_times_out_without_blocking_live_events():
    index = LockedIndex()
    sub = KVEventSubscriber(index.index, index.lock, replay_timeout_s=0.3)
    raw = RawPublisher()
    try:
        dead = f"tcp://127.0.0.1:{free_port()}"
        sub.sync({REPLICA: raw.endpoint}, replay_endpoints={REPLICA: dead})
        raw.wait_for_subscriber()
        engine = FakeEngine(seed=6)
        first = KVEventBatch(ts=0.0, events=[engine.store()])
        raw.send(0, first)
        assert settles_at(index, expected_chains([first]))  # after the initial replay gave up
        later = KVEventBatch(ts=0.0, events=[engine.store()])
        started = time.monotonic()
        raw.send(5, later)  # 1..4 lost and no replay answers
        assert settles_at(index, expected_chains([later]))
        assert time.monotonic() - started < 3.0  # one replay timeout, not a blocked thread
        assert (sub.num_gaps, sub.num_resyncs) == (1, 1) and sub.is_alive()
    finally:
        sub.close()
        raw.close()


# -- bad input ----------------------------------------------------------------------------------


class RawPublisher:
    """An XPUB socket sending whatever frames a test wants, once a subscriber has joined."""

    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.XPUB)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._encoder = msgspec.msgpack.Encoder()

    def wait_for_subscriber(self) -> None:
        assert self.sock.poll(5000) and self.sock.recv() == b"\x01"

    def send(self, seq: int, batch: KVEventBatch) -> None:
        self.sock.send_multipart([b"", seq.to_bytes(8, "big"), self._encoder.encode(batch)])

    def close(self) -> None:
        self._ctx.destroy(linger=0)


def free_port() -> int:
    from cluster.ports import free_port_block

    return free_port_block("127.0.0.1", 1)


@pytest.fixture
def raw_publisher() -> Iterator[RawPublisher]:
    raw = RawPublisher()
    yield raw
    raw.close()


def test_bad_messages_are_counted_and_the_thread_lives_on(index_and_subscriber, raw_publisher,
                                                          caplog):
    index, sub = index_and_subscriber
    raw = raw_publisher
    sub.sync({REPLICA: raw.endpoint})
    raw.wait_for_subscriber()
    engine = FakeEngine(seed=7)
    good = KVEventBatch(ts=0.0, events=[engine.store()])
    raw.send(0, good)
    assert settles_at(index, expected_chains([good]))

    with caplog.at_level(logging.WARNING, logger="router.kv_events"):
        raw.sock.send_multipart([b"one frame"])
        raw.sock.send_multipart([b"", b"\x01\x02", b"short seq"])
        raw.sock.send_multipart([b"", b"\x01\x02", b"short seq again"])
        raw.sock.send_multipart([b"", (1).to_bytes(8, "big"), b"\xc1 not msgpack"])
        mismatched = BlockStored(block_hashes=[1, 2], parent_block_hash=None,
                                 token_ids=[1] * BLOCK, block_size=BLOCK, lora_id=None,
                                 medium="GPU", lora_name=None)
        after = KVEventBatch(ts=0.0, events=[mismatched, engine.store()])
        raw.send(2, after)
        assert wait_for(lambda: sub.num_events == 2)
    assert sub.bad_events_by_kind == {"frame": 3, "undecodable": 1, "rejected": 1}
    assert sub.num_bad_events == 5
    # The undecodable batch may have removed blocks: the replica was dropped and rebuilt.
    assert chains(index) == expected_chains([after])
    assert sub.num_resyncs == 1 and sub.is_alive()
    logged = [r for r in caplog.records if "malformed KV event message" in r.getMessage()]
    assert len(logged) == 1  # once per replica and kind


class FlakyIndex(KVIndex):
    """An index that fails on removals, as any bug in ``apply`` might."""

    def apply(self, replica_id, event):  # type: ignore[no-untyped-def]
        if isinstance(event, RemovedBlocks):
            raise RuntimeError("boom")
        super().apply(replica_id, event)


def test_any_exception_in_apply_is_survived_and_drops_what_may_be_wrong(raw_publisher):
    index = LockedIndex(FlakyIndex())
    gone: list[str] = []

    def on_gone(rid: str) -> None:
        gone.append(rid)
        raise RuntimeError("a callback bug")

    sub = KVEventSubscriber(index.index, index.lock, on_gone)
    raw = raw_publisher
    try:
        sub.sync({REPLICA: raw.endpoint})
        raw.wait_for_subscriber()
        engine = FakeEngine(seed=8)
        stored = KVEventBatch(ts=0.0, events=[engine.store(), engine.store()])
        raw.send(0, stored)
        assert settles_at(index, expected_chains([stored]))
        removal = KVEventBatch(ts=0.0, events=[engine.remove([next(iter(engine.held))])])
        raw.send(1, removal)
        assert wait_for(lambda: sub.num_bad_events == 1)
        assert chains(index) == set()  # a failed removal could leave stale blocks: dropped
        assert sub.bad_events_by_kind == {"rejected": 1} and sub.num_resyncs == 1
        again = KVEventBatch(ts=0.0, events=[engine.store()])
        raw.send(2, again)
        assert settles_at(index, expected_chains([again]))

        sub.sync({})
        assert wait_for(lambda: gone == [REPLICA] and sub.num_thread_errors == 1)
        assert sub.is_alive() and index.read(KVIndex.replica_ids) == []
    finally:
        sub.close()
    assert not sub.is_alive()


def test_sync_rejects_bad_endpoints_and_reports_what_it_follows(index_and_subscriber):
    _, sub = index_and_subscriber
    with pytest.raises(ValueError, match="not a ZMQ endpoint"):
        sub.sync({REPLICA: "localhost:5557"})
    with pytest.raises(ValueError, match="not a ZMQ endpoint"):
        sub.sync({REPLICA: "tcp://127.0.0.1:1"}, replay_endpoints={REPLICA: "nowhere"})
    sub.sync({REPLICA: "tcp://127.0.0.1:1"})  # the old one-argument form
    assert sub.subscribed() == {REPLICA}
    sub.sync({"other": "tcp://256.0.0.1:x"})  # zmq refuses it on the thread
    assert wait_for(lambda: sub.bad_events_by_kind.get("subscribe") == 1)
    assert sub.subscribed() == set() and sub.is_alive()
