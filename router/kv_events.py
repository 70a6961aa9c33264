"""Feeding the KV index from the engines' own KV cache events.

Every engine publishes vLLM's ``KVEventBatch`` messages (``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared``) on a ZMQ PUB socket (vLLM's ``kv_events_config``); each replica reports its
endpoint in its routing stats. ``KVEventSubscriber`` keeps one SUB socket per replica on a
thread of its own and applies every event to the index under the index's lock, so the index
mirrors what the engines really cache, evictions included. ``sync`` (called from the event
loop) adds replicas that appeared and drops those that left.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from router.kvindex import AllCleared, KVEvent, KVIndex, RemovedBlocks, StoredBlocks

logger = logging.getLogger(__name__)
POLL_MS = 100


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


class KVEventSubscriber:
    def __init__(self, index: KVIndex, lock: threading.Lock,
                 on_replica_gone: Callable[[str], None] | None = None) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        self._index = index
        self._lock = lock
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._ctx = zmq.Context()
        self._endpoints: dict[str, str] = {}
        self._commands: queue.Queue[tuple[str, str, str | None]] = queue.Queue()
        self.num_events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-events", daemon=True)
        self._thread.start()

    def sync(self, endpoints: dict[str, str]) -> None:
        """Subscribe to exactly these ``replica_id -> endpoint`` publishers."""
        for replica_id in set(self._endpoints) - set(endpoints):
            self._commands.put(("drop", replica_id, None))
        for replica_id, endpoint in endpoints.items():
            if self._endpoints.get(replica_id) != endpoint:
                self._commands.put(("add", replica_id, endpoint))
        self._endpoints = dict(endpoints)

    def subscribed(self) -> set[str]:
        return set(self._endpoints)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._ctx.term()

    def _run(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        poller = zmq.Poller()
        while not self._stop.is_set():
            self._apply_commands(sockets, poller)
            for sock, _ in poller.poll(POLL_MS):
                replica_id = next(r for r, s in sockets.items() if s is sock)
                self._consume(replica_id, sock.recv_multipart())
        for sock in sockets.values():
            sock.close(linger=0)

    def _apply_commands(self, sockets: dict[str, zmq.Socket], poller: zmq.Poller) -> None:
        while True:
            try:
                action, replica_id, endpoint = self._commands.get_nowait()
            except queue.Empty:
                return
            old = sockets.pop(replica_id, None)
            if old is not None:
                poller.unregister(old)
                old.close(linger=0)
            if action == "drop":
                with self._lock:
                    self._index.remove_replica(replica_id)
                continue
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint)
            sockets[replica_id] = sock
            poller.register(sock, zmq.POLLIN)
            with self._lock:
                self._index.add_replica(replica_id, is_event_fed=True)
            logger.info("following the KV cache events of %s at %s", replica_id, endpoint)

    def _consume(self, replica_id: str, frames: list[bytes]) -> None:
        try:
            batch = self._decoder.decode(frames[-1])
        except Exception as e:
            logger.warning("undecodable KV event batch from %s: %s", replica_id, e)
            return
        events = [e for e in (convert(raw) for raw in batch.events) if e is not None]
        with self._lock:
            for event in events:
                self._index.apply(replica_id, event)
        self.num_events += len(events)
