"""The decode worker's endpoint: pulls blocks from prefill workers, one thread per peer.

Threads (ZMQ sockets are not thread-safe, so each socket has exactly one owner):

- The worker's main thread only queues: ``submit`` (loads, release-only specs), ``claim``, and
  ``take_results`` each engine step. It never waits on a peer.
- One ``PeerChannel`` thread per prefill worker address owns that peer's control socket and
  link, and runs its loads in order. With equal TP sizes a load goes to one peer (decode worker
  i pulls from prefill worker i); with another prefill TP it is split into one ``Part`` per
  prefill worker holding some of this worker's heads (``kvtransfer.heads``), pulled in parallel,
  and the load ends (ok only if every part is) when the last part does. A slow or dead peer
  stalls only its own loads. A control reply is awaited ``control_timeout_s``, the data
  ``timeout_s``; a peer that did not answer a HELLO fails its further loads at once for
  ``control_timeout_s``. A channel idle for ``idle_s`` closes its socket and link and ends
  (replicas come and go).
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
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from kvtransfer.blocks import KVLayout
from kvtransfer.consumer_peer import LoadContext, Part, PeerChannel
from kvtransfer.heads import heads_of, pull_plan, released_by
from kvtransfer.link import Link, TorchDistLink
from kvtransfer.metadata import ClaimSpec, LoadSpec
from kvtransfer.params import Address
from kvtransfer.protocol import MAX_TAG, Codec, MsgType
from kvtransfer.stats import SAMPLES

if TYPE_CHECKING:
    import torch

    from kvtransfer.reads import CacheRegions

logger = logging.getLogger(__name__)
MAX_NOTIFY_SOCKETS = 256  # notifier sockets kept open (least recently used closed first)
NOTIFY_LINGER_MS = 1000  # how long a closing notifier socket still tries to deliver


@dataclasses.dataclass(frozen=True)
class Place:
    """Where a decode worker sits in its engine, and the model's KV heads (all TP ranks
    together; None: only prefill engines of the same TP size can be pulled from)."""

    tp_rank: int
    tp_size: int
    pp_rank: int = 0
    num_kv_heads: int | None = None


@dataclasses.dataclass
class _Pending:
    """A load split into parts: what the parts that ended so far add up to."""

    parts_left: int
    started_s: float
    ok: bool = True
    num_bytes: int = 0


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
        place: Place | None = None,
        control_timeout_s: float = 5.0,
        idle_s: float = 600.0,
        codec: Codec | None = None,
        link_factory: Callable[..., Link] = TorchDistLink,
        regions: CacheRegions | None = None,
    ) -> None:
        """``regions``: this worker's cache, when it offers to read blocks directly
        (``kvtransfer.reads``)."""
        self.worker_index = worker_index
        self.num_workers = num_workers
        self.place = place or Place(tp_rank=worker_index, tp_size=num_workers)
        self.peer_id = f"{socket.gethostname()}-{os.getpid()}-{worker_index}-{uuid.uuid4().hex[:8]}"
        self._ctx = zmq.Context()
        tags = itertools.count(1)
        self.context = LoadContext(
            peer_id=self.peer_id, host=host, kv_caches=kv_caches, layout=layout,
            device=next(iter(kv_caches.values())).device, timeout_s=timeout_s,
            control_timeout_s=control_timeout_s, unknown_retry_s=unknown_retry_s, idle_s=idle_s,
            codec=codec if codec is not None else Codec.from_env(), zmq_ctx=self._ctx,
            link_factory=link_factory, next_tag=lambda: (next(tags) - 1) % MAX_TAG + 1,
            on_result=self._on_result, notify_failed=self._notify_failed, regions=regions,
            count=self._count,
        )
        self._lock = threading.Lock()
        self._results = LoadResults()
        self._samples: dict[str, list[float]] = {name: [] for name in SAMPLES}
        self.counts = {"num_bytes_received": 0, "num_loads": 0, "num_failed_loads": 0,
                       "num_claims_sent": 0, "num_read_fallbacks": 0}
        self._channels: dict[Address, PeerChannel] = {}
        self._pending: dict[int, _Pending] = {}  # id(spec) -> its parts' results so far
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
        parts = self._parts(spec)  # ValueError before anything is queued
        for address in self._unread(spec.remote_addresses, spec.remote_tp_size):
            self._notify(address, MsgType.DONE, spec.transfer_id)
        with self._lock:
            if len(parts) > 1:
                self._pending[id(spec)] = _Pending(len(parts), time.monotonic())
            for address, part in parts:
                channel = self._channels.get(address)
                if channel is None or not channel.accepts_jobs:
                    channel = self._channels[address] = PeerChannel(self.context, address,
                                                                     self._forget)
                channel.submit(part)

    def claim(self, spec: ClaimSpec) -> None:
        """Ask the prefill workers this worker will pull from (and those it releases) to keep
        the transfer for their claim lease."""
        try:
            addresses = [a for a, _ in self._parts(spec)]
            addresses += self._unread(spec.remote_addresses, spec.remote_tp_size)
        except ValueError as e:
            logger.warning("cannot claim transfer %.40r: %s", spec.transfer_id, e)
            return
        for address in addresses:
            self._notify(address, MsgType.CLAIM, spec.transfer_id)
        with self._lock:
            self.counts["num_claims_sent"] += len(addresses)

    def _parts(self, spec: LoadSpec | ClaimSpec) -> list[tuple[Address, Part]]:
        """Where this worker's share of ``spec`` comes from: (address, part) per prefill worker.
        ValueError when the layouts cannot be paired or an address is missing."""
        place = self.place
        remote_tp, base = self._remote_stage(spec.remote_tp_size)
        if remote_tp == place.tp_size:
            plan = [(place.tp_rank, Part(spec))]
        elif place.num_kv_heads is None:
            raise ValueError(f"prefill TP {remote_tp} differs from ours ({place.tp_size}) and "
                             "this worker does not know the model's KV heads")
        else:
            heads = place.num_kv_heads
            ours = len(heads_of(heads, place.tp_size, place.tp_rank))
            plan = []
            for seg in pull_plan(heads, remote_tp, place.tp_size, place.tp_rank):
                if seg.num_heads == ours == len(heads_of(heads, remote_tp, seg.source)):
                    part = Part(spec, pullers=seg.pullers)  # all its heads are all of ours
                else:
                    part = Part(spec, (seg.first_head, seg.num_heads),
                                (seg.local_first_head, seg.num_heads), seg.pullers)
                plan.append((seg.source, part))
        if base + remote_tp > len(spec.remote_addresses):
            raise ValueError(f"{len(spec.remote_addresses)} remote addresses, stage "
                             f"{place.pp_rank} of prefill TP {remote_tp} needs {base + remote_tp}")
        return [(spec.remote_addresses[base + source], part) for source, part in plan]

    def _unread(self, addresses: list[Address], remote_tp_size: int | None) -> list[Address]:
        """Prefill workers of this stage nobody pulls from, that this worker releases."""
        place = self.place
        remote_tp, base = self._remote_stage(remote_tp_size)
        if remote_tp == place.tp_size or place.num_kv_heads is None:
            return []
        return [addresses[base + r] for r in released_by(place.num_kv_heads, remote_tp,
                                                         place.tp_size, place.tp_rank)]

    def _remote_stage(self, remote_tp_size: int | None) -> tuple[int, int]:
        """The prefill side's TP size (ours when it did not say) and the index of its first
        worker of our pipeline stage in its address list (stage-major)."""
        remote_tp = remote_tp_size or self.place.tp_size
        return remote_tp, self.place.pp_rank * remote_tp

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

    def _on_result(self, part: Part, ok: bool, num_bytes: int, duration_s: float,
                   pull_wait_s: float) -> None:
        spec = part.spec
        with self._lock:
            if ok:
                self._samples["pull_wait_seconds"].append(pull_wait_s)
            pending = self._pending.get(id(spec))
            if pending is not None:  # one part of several
                pending.parts_left -= 1
                pending.ok = pending.ok and ok
                pending.num_bytes += num_bytes
                if pending.parts_left:
                    return
                del self._pending[id(spec)]
                ok, num_bytes = pending.ok, pending.num_bytes
                duration_s = time.monotonic() - pending.started_s
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

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _forget(self, address: Address, channel: PeerChannel) -> bool:
        """An idle channel asks to end: True (and forgotten) unless a job came meanwhile."""
        with self._lock:
            if channel.has_jobs:
                return False
            if self._channels.get(address) is channel:
                del self._channels[address]
            return True

    def _notify_failed(self, address: Address, transfer_id: str, pullers: int) -> None:
        """DONE for a load that failed: the prefill worker frees the blocks now."""
        self._notify(address, MsgType.DONE, transfer_id, peer_id=self.peer_id, pullers=pullers,
                     failed=True)

    def _notify(self, address: Address, kind: MsgType, transfer_id: str, **fields: Any) -> None:
        try:
            data = self.context.codec.encode(kind, transfer_id=transfer_id, **fields)
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
