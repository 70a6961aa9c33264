"""The decode worker's endpoint: pulls blocks from prefill workers, one thread per peer.

Threads (ZMQ sockets are not thread-safe, so each socket has exactly one owner):

- The worker's main thread only queues: ``submit`` (loads, release-only specs), ``claim``, and
  ``take_results`` each engine step. It never waits on a peer.
- One ``PeerChannel`` thread per prefill worker address owns that peer's control socket and
  link, and runs its loads in order. A slow or dead peer stalls only its own loads. A control
  reply is awaited ``control_timeout_s``, the data ``timeout_s``; a peer that did not answer a
  HELLO fails its further loads at once for ``control_timeout_s``. A channel idle for
  ``idle_s`` closes its socket and link and ends (replicas come and go).
- One notifier thread owns a socket per address for the messages that need no reply (CLAIM,
  DONE of release-only specs and of failed loads), so they go out at once even when that peer's
  channel is busy or stalled, and survive a dropped link.

A load fails (and vLLM recomputes the prompt) on a refusal, a timeout, a reply that is not for
this pull (a SENDING or ERROR whose transfer_id or tag differ: the link and socket are dropped,
the data is never scattered), a size mismatch, or a link error. Links that failed are dropped.
Every message is signed with the deployment's secret (``protocol.Codec``). ``close`` stops and
joins every thread before closing the sockets.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from kvtransfer.blocks import KVLayout
from kvtransfer.consumer_peer import LoadContext, PeerChannel
from kvtransfer.link import Link, TorchDistLink
from kvtransfer.metadata import ClaimSpec, LoadSpec
from kvtransfer.params import Address
from kvtransfer.protocol import MAX_TAG, Codec, MsgType
from kvtransfer.stats import SAMPLES

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
MAX_NOTIFY_SOCKETS = 256  # notifier sockets kept open (least recently used closed first)
NOTIFY_LINGER_MS = 1000  # how long a closing notifier socket still tries to deliver


@dataclasses.dataclass
class LoadResults:
    finished: set[str] = dataclasses.field(default_factory=set)
    failed: set[str] = dataclasses.field(default_factory=set)
    failed_block_ids: set[int] = dataclasses.field(default_factory=set)


class ConsumerEndpoint:
    def __init__(
        self,
        host: str,
        worker_index: int,
        kv_caches: dict[str, torch.Tensor],
        layout: KVLayout,
        timeout_s: float,
        unknown_retry_s: float,
        *,
        num_workers: int = 1,
        control_timeout_s: float = 5.0,
        idle_s: float = 600.0,
        codec: Codec | None = None,
        link_factory: Callable[..., Link] = TorchDistLink,
    ) -> None:
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.peer_id = f"{socket.gethostname()}-{os.getpid()}-{worker_index}-{uuid.uuid4().hex[:8]}"
        self._ctx = zmq.Context()
        tags = itertools.count(1)
        self.context = LoadContext(
            peer_id=self.peer_id, host=host, kv_caches=kv_caches, layout=layout,
            device=next(iter(kv_caches.values())).device, timeout_s=timeout_s,
            control_timeout_s=control_timeout_s, unknown_retry_s=unknown_retry_s, idle_s=idle_s,
            codec=codec if codec is not None else Codec.from_env(), zmq_ctx=self._ctx,
            link_factory=link_factory, next_tag=lambda: (next(tags) - 1) % MAX_TAG + 1,
            on_result=self._on_result, notify=self._notify_done,
        )
        self._lock = threading.Lock()
        self._results = LoadResults()
        self._samples: dict[str, list[float]] = {name: [] for name in SAMPLES}
        self.counts = {"num_bytes_received": 0, "num_loads": 0, "num_failed_loads": 0,
                       "num_claims_sent": 0}
        self._channels: dict[Address, PeerChannel] = {}
        self._closed = False
        self._notices: queue.SimpleQueue[tuple[Address, bytes] | None] = queue.SimpleQueue()
        self._notifier = threading.Thread(target=self._run_notifier, name="pdserve-kv-notify",
                                          daemon=True)
        self._notifier.start()

    # -- the worker's main thread --------------------------------------------------------------

    def submit(self, spec: LoadSpec) -> None:
        """Queue a load (or, for a release-only spec, DONE to the prefill workers)."""
        if spec.is_release_only:
            # Worker i releases on prefill workers i, i + n, ...: together the decode workers
            # reach every prefill worker, even when the two engines' TPxPP differ.
            for address in spec.remote_addresses[self.worker_index::self.num_workers]:
                self._notify(address, MsgType.DONE, spec.transfer_id)
            return
        address = spec.remote_addresses[self.worker_index]
        with self._lock:
            channel = self._channels.get(address)
            if channel is None or not channel.accepts_jobs:
                channel = self._channels[address] = PeerChannel(self.context, address,
                                                                 self._forget)
            channel.submit(spec)

    def claim(self, spec: ClaimSpec) -> None:
        """Ask prefill worker ``worker_index`` to keep the transfer for its claim lease."""
        if self.worker_index < len(spec.remote_addresses):
            self._notify(spec.remote_addresses[self.worker_index], MsgType.CLAIM, spec.transfer_id)
            with self._lock:
                self.counts["num_claims_sent"] += 1

    def take_results(self) -> LoadResults:
        with self._lock:
            results, self._results = self._results, LoadResults()
        return results


    def take_samples(self) -> dict[str, list[float]]:
        """Per-load samples since the last call (``kvtransfer.stats.SAMPLES``): each
        successful load's duration and number of blocks."""
        with self._lock:
            samples, self._samples = self._samples, {name: [] for name in SAMPLES}
        return samples
    def health(self) -> str | None:
        """None while every thread that should run does; else what is wrong."""
        if self._closed:
            return "the KV consumer is closed"
        if not self._notifier.is_alive():
            return "the KV consumer's notifier thread died"
        with self._lock:
            dead = [a for a, c in self._channels.items() if c.accepts_jobs and not c.is_alive()]
        if dead:
            return f"the KV consumer's peer thread(s) for {dead} died"
        return None

    def is_alive(self) -> bool:
        return self.health() is None

    def close(self) -> None:
        """Stop every thread, join them, then close the sockets and the ZMQ context."""
        self._closed = True
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.stop()
        self._notices.put(None)
        stuck = [c for c in channels if not c.join(self.context.timeout_s + 2)]
        self._notifier.join(timeout=5)
        if stuck or self._notifier.is_alive():
            logger.error("KV consumer: %d thread(s) did not stop; leaving the sockets open",
                         len(stuck) + self._notifier.is_alive())
            return
        self._ctx.term()

    # -- callbacks from the channels ------------------------------------------------------------

    def _on_result(self, spec: LoadSpec, ok: bool, num_bytes: int, duration_s: float) -> None:
        with self._lock:
            if ok:
                self._samples["xfer_time_seconds"].append(duration_s)
                self._samples["num_blocks_per_transfer"].append(len(spec.local_block_ids))
            self.counts["num_loads"] += 1
            self.counts["num_failed_loads"] += 0 if ok else 1
            self.counts["num_bytes_received"] += num_bytes
            if spec.request_id is not None:
                self._results.finished.add(spec.request_id)
                if not ok:
                    self._results.failed.add(spec.request_id)
                    self._results.failed_block_ids.update(spec.local_block_ids)

    def _forget(self, address: Address, channel: PeerChannel) -> bool:
        """An idle channel asks to end: True (and forgotten) unless a job came meanwhile."""
        with self._lock:
            if channel.has_jobs:
                return False
            if self._channels.get(address) is channel:
                del self._channels[address]
            return True

    def _notify_done(self, address: Address, transfer_id: str) -> None:
        self._notify(address, MsgType.DONE, transfer_id)

    def _notify(self, address: Address, kind: MsgType, transfer_id: str) -> None:
        try:
            data = self.context.codec.encode(kind, transfer_id=transfer_id)
        except Exception as e:  # an id the protocol refuses: nothing to tell the peer
            logger.warning("cannot send %s for transfer %.40r: %s", kind.value, transfer_id, e)
            return
        self._notices.put((address, data))

    # -- the notifier thread -------------------------------------------------------------------

    def _run_notifier(self) -> None:
        sockets: dict[Address, zmq.Socket] = {}
        try:
            while (notice := self._notices.get()) is not None:
                address, data = notice
                try:
                    sock = sockets.pop(address, None)
                    if sock is None:
                        sock = self._ctx.socket(zmq.DEALER)
                        sock.setsockopt(zmq.LINGER, NOTIFY_LINGER_MS)
                        sock.connect(f"tcp://{address[0]}:{address[1]}")
                    sockets[address] = sock  # most recently used last
                    if len(sockets) > MAX_NOTIFY_SOCKETS:
                        sockets.pop(next(iter(sockets))).close()
                    sock.send(data, zmq.NOBLOCK)
                except zmq.ZMQError as e:  # queue full (peer gone) or bad address
                    logger.warning("KV consumer: cannot notify %s: %s", address, e)
        finally:
            for sock in sockets.values():
                sock.close()
