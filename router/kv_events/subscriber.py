"""``KVEventSubscriber``: the thread that follows every replica's KV events (see the package)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from router.kv_events.feed import MALFORMED, ReplicaFeed
from router.kvindex import AllCleared, KVEvent, KVIndex, RemovedBlocks, StoredBlocks
from router.kvindex.stream import Action, ReplicaStream, Step, StreamCounters

logger = logging.getLogger(__name__)
POLL_MS = 100
_SCHEMES = ("tcp://", "ipc://", "inproc://")


def convert(event: Any) -> KVEvent | None:
    """vLLM's event object to the index's own, or None for anything else."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    if isinstance(event, BlockStored):
        return StoredBlocks(event.block_hashes, event.parent_block_hash, event.token_ids,
                            event.block_size, event.lora_id, event.medium)
    if isinstance(event, BlockRemoved):
        return RemovedBlocks(event.block_hashes, event.medium)
    if isinstance(event, AllBlocksCleared):
        return AllCleared()
    return None


def _counter(name: str) -> property:
    return property(lambda self: getattr(self.counters, name), doc=f"StreamCounters.{name}")


class KVEventSubscriber:
    """Follows the replicas' KV event publishers on one thread.

    Counters (read from any thread; all in ``stats()``): ``num_events`` (events applied),
    ``num_bad_events`` and ``bad_events_by_kind`` (``frame``, ``replay_frame``, ``undecodable``,
    ``rejected``, ``subscribe``), ``num_gaps``, ``num_replays``, ``num_resyncs``,
    ``num_restarts`` (see ``StreamCounters``), ``num_thread_errors``. ``on_replica_gone`` is
    called on the subscriber's thread with the id of a replica that left ``sync``'s set, after
    its entries were dropped.
    """

    num_gaps = _counter("num_gaps")
    num_replays = _counter("num_replays")
    num_resyncs = _counter("num_resyncs")
    num_restarts = _counter("num_restarts")

    def __init__(self, index: KVIndex, lock: threading.Lock,
                 on_replica_gone: Callable[[str], None] | None = None, *,
                 replay_timeout_s: float = 2.0) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        if replay_timeout_s <= 0:
            raise ValueError(f"replay_timeout_s must be positive, got {replay_timeout_s}")
        self._index = index
        self._lock = lock
        self._on_replica_gone = on_replica_gone
        self._replay_timeout_s = replay_timeout_s
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._ctx = zmq.Context()
        self._endpoints: dict[str, tuple[str, str | None]] = {}
        self._failed: set[str] = set()  # replicas the thread could not subscribe to
        self._commands: queue.Queue[tuple[str, str, str | None, str | None]] = queue.Queue()
        self._feeds: dict[str, ReplicaFeed] = {}
        self._poller = zmq.Poller()
        self._logged: set[tuple[str, str]] = set()
        self.counters = StreamCounters()
        self.num_events = 0
        self.num_thread_errors = 0
        self._bad: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-events", daemon=True)
        self._thread.start()

    # -- the caller's side (event loop) -----------------------------------------------------

    def sync(self, endpoints: dict[str, str],
             replay_endpoints: dict[str, str] | None = None) -> None:
        """Follow exactly these ``replica_id -> PUB endpoint`` publishers.

        ``replay_endpoints`` maps replica ids to their publishers' replay (ROUTER) endpoints;
        replicas absent from it cannot replay (a gap then drops their entries). Entries for
        replicas absent from ``endpoints`` are ignored. A replica whose endpoints changed is
        followed afresh (its entries are dropped first). Raises ValueError for an endpoint that
        is not a ZMQ address.
        """
        replay_endpoints = replay_endpoints or {}
        wanted = {rid: (ep, replay_endpoints.get(rid) or None) for rid, ep in endpoints.items()}
        for rid, addresses in wanted.items():
            for address in addresses:
                if address is not None and not (isinstance(address, str)
                                                and address.startswith(_SCHEMES)):
                    raise ValueError(f"replica {rid}: not a ZMQ endpoint: {address!r}")
        for rid in set(self._endpoints) - set(wanted):
            self._commands.put(("drop", rid, None, None))
        for rid, (ep, replay_ep) in wanted.items():
            if self._endpoints.get(rid) != (ep, replay_ep) or rid in self._failed:
                self._failed.discard(rid)
                self._commands.put(("add", rid, ep, replay_ep))
        self._endpoints = wanted

    def subscribed(self) -> set[str]:
        """Replicas whose events are followed."""
        return set(self._endpoints) - self._failed

    def is_alive(self) -> bool:
        """False once the thread has stopped (after ``close``, or if it died)."""
        return self._thread.is_alive()

    @property
    def num_bad_events(self) -> int:
        return sum(self._bad.values())

    @property
    def bad_events_by_kind(self) -> dict[str, int]:
        return dict(self._bad)

    def stats(self) -> dict[str, Any]:
        """Every counter, JSON-ready (for ``GET /routing`` and metrics)."""
        return {"is_alive": self.is_alive(), "num_replicas": len(self.subscribed()),
                "num_events": self.num_events, "num_bad_events": self.num_bad_events,
                "bad_events_by_kind": self.bad_events_by_kind, "num_gaps": self.num_gaps,
                "num_replays": self.num_replays, "num_resyncs": self.num_resyncs,
                "num_restarts": self.num_restarts, "num_thread_errors": self.num_thread_errors}

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.destroy(linger=0)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except Exception:
                    self.num_thread_errors += 1
                    logger.exception("KV event subscriber: unexpected error (continuing)")
                    time.sleep(POLL_MS / 1000)
        finally:
            for feed in self._feeds.values():
                feed.close()
            if not self._stop.is_set():
                logger.error("KV event subscriber thread stopped unexpectedly")

    def _step(self) -> None:
        self._apply_commands()
        if not self._feeds:  # zmq's poll returns at once when it has no socket
            self._stop.wait(POLL_MS / 1000)
            return
        ready = dict(self._poller.poll(POLL_MS))
        now = time.monotonic()
        for feed in list(self._feeds.values()):
            if feed.sub in ready:
                for message in feed.recv_live():
                    if message is MALFORMED:
                        self._count_bad(feed.replica_id, "frame", "malformed KV event message "
                                        "(expected topic, 8-byte seq, payload)")
                    else:
                        self._execute(feed, feed.stream.on_live(*message))
            if feed.replay is not None and feed.replay in ready:
                for _ in feed.recv_replay():
                    self._count_bad(feed.replica_id, "replay_frame", "malformed replay message")
            if feed.is_replay_done:
                self._execute(feed, feed.stream.on_replay_done(feed.take_replayed()))
            elif feed.is_replay_overdue(now):
                self._log_once(feed.replica_id, "replay_timeout", "replay from %s got no answer "
                               "within %.1f s", feed.stream.replaying_from, self._replay_timeout_s)
                self._execute(feed, feed.stream.on_replay_done(feed.take_replayed()))

    def _apply_commands(self) -> None:
        while True:
            try:
                action, rid, endpoint, replay_endpoint = self._commands.get_nowait()
            except queue.Empty:
                return
            old = self._feeds.pop(rid, None)
            if old is not None:
                old.close()
            if action == "drop":
                with self._lock:
                    self._index.remove_replica(rid)
                if self._on_replica_gone is not None:
                    self._on_replica_gone(rid)
                continue
            with self._lock:
                self._index.clear_replica(rid)  # whatever came from an old publisher is stale
                self._index.add_replica(rid, is_event_fed=True)
            stream = ReplicaStream(replay_endpoint is not None, self.counters)
            try:
                feed = ReplicaFeed(self._ctx, self._poller, rid, endpoint,  # type: ignore[arg-type]
                                   replay_endpoint, stream, self._replay_timeout_s)
            except zmq.ZMQError as e:
                self._failed.add(rid)
                self._count_bad(rid, "subscribe", "cannot follow %s: %s", endpoint, e)
                continue
            self._feeds[rid] = feed
            logger.info("following the KV cache events of %s at %s (replay: %s)",
                        rid, endpoint, replay_endpoint or "none")
            self._execute(feed, stream.start())

    # -- carrying out the stream's decisions ----------------------------------------------------

    def _execute(self, feed: ReplicaFeed, actions: list[Action]) -> None:
        for action in actions:
            if action.step is Step.APPLY:
                self._apply_batch(feed.replica_id, action.payload)
            elif action.step is Step.RESET:
                self._reset(feed.replica_id, "sequence")
            else:
                self._replay(feed, action.seq)

    def _replay(self, feed: ReplicaFeed, start: int) -> None:
        try:
            feed.start_replay(start)
        except zmq.ZMQError as e:
            self._log_once(feed.replica_id, "replay_error", "cannot ask %s for a replay: %s",
                           feed.replay_endpoint, e)
            self._execute(feed, feed.stream.on_replay_done([]))

    def _apply_batch(self, rid: str, payload: bytes) -> None:
        try:
            batch = self._decoder.decode(payload)
        except Exception as e:
            self._count_bad(rid, "undecodable", "undecodable KV event batch: %s", e)
            self._reset(rid, "undecodable")  # it may have removed blocks
            return
        applied = 0
        with self._lock:
            for raw in batch.events:
                event = convert(raw)
                try:
                    self._index.apply(rid, event)  # type: ignore[arg-type]
                except Exception as e:
                    self._count_bad(rid, "rejected", "the index rejected a %s: %s",
                                    type(raw).__name__, e)
                    if not isinstance(event, StoredBlocks):  # a removal it may have half done
                        self._reset_locked(rid, "rejected")
                    continue
                applied += 1
        self.num_events += applied

    def _reset(self, rid: str, why: str) -> None:
        with self._lock:
            self._reset_locked(rid, why)

    def _reset_locked(self, rid: str, why: str) -> None:
        """Drop the replica's entries; what follows rebuilds them."""
        if why != "sequence":
            self.counters.num_resyncs += 1  # the stream counts its own resets
        self._index.clear_replica(rid)
        self._index.add_replica(rid, is_event_fed=True)
        self._log_once(rid, "resync:" + why, "dropped its KV index entries (%s); rebuilding "
                       "from the events that follow", why)

    # -- counting -----------------------------------------------------------------------------

    def _count_bad(self, rid: str, kind: str, msg: str, *args: Any) -> None:
        self._bad[kind] = self._bad.get(kind, 0) + 1
        self._log_once(rid, kind, msg, *args)

    def _log_once(self, rid: str, kind: str, msg: str, *args: Any) -> None:
        if (rid, kind) not in self._logged:
            self._logged.add((rid, kind))
            logger.warning("KV events of %s: " + msg + " (logged once)", rid, *args)
