"""One decode peer of a prefill worker: its link and the thread that serves its pulls.

Used by ``kvtransfer.producer.ProducerEndpoint`` (see its docstring for the threads). A
``PeerLink`` thread builds the link (rendezvous through the endpoint's TCPStore, bounded by the
data timeout), then takes ``Pull`` jobs from its queue in order. Each pull marks the hold
SENDING and always finishes it (try/finally), so no hold stays SENDING past the link's deadline.
After a failed link or send the peer answers ``link`` to its remaining pulls until the ROUTER
thread retires it. On exit the link is closed and its TCPStore keys are deleted.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from kvtransfer.blocks import gather_blocks
from kvtransfer.holds import HoldError
from kvtransfer.link import PREFILL_RANK, Link
from kvtransfer.protocol import ErrorCode, MsgType

if TYPE_CHECKING:
    from kvtransfer.producer import ProducerEndpoint

logger = logging.getLogger(__name__)

COUNTERS = ("num_bytes_sent", "num_pulls", "num_failed_sends", "num_protocol_errors",
            "num_auth_failures", "num_busy", "num_layout_mismatches", "num_links_opened",
            "num_link_failures", "num_links_closed", "num_internal_errors", "num_read_pairs")


class Counters(dict):
    """The endpoint's counters (a plain dict of ints to readers); thread-safe increments.

    ``problem`` also logs: the first time for each kind, then at 10, 100, 1000... occurrences.
    """

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(COUNTERS, 0))
        self._lock = threading.Lock()
        self._kinds: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self[name] += n

    def problem(self, name: str, kind: str, fmt: str, *args: Any) -> None:
        with self._lock:
            self[name] += 1
            seen = self._kinds[kind] = self._kinds.get(kind, 0) + 1
        if seen == 1 or str(seen).strip("0") == "1":
            logger.warning(fmt + " [%s: %d so far; logged at powers of ten]", *args, kind, seen)


@dataclasses.dataclass(frozen=True)
class Pull:
    identity: bytes
    transfer_id: str
    first_block: int
    num_blocks: int
    tag: int
    heads: tuple[int, int] | None = None  # (first, count) of this worker's heads; None: all
    received_s: float = dataclasses.field(default_factory=time.monotonic)


class ReadPeer:
    """A decode peer that reads the blocks itself (``kvtransfer.reads``): no link, no thread;
    the endpoint's ROUTER thread answers its pulls. Quacks like a ``PeerLink`` for the
    endpoint's bookkeeping."""

    has_failed = False

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.last_active_s = time.monotonic()
        self.has_read = False  # its probe worked: it pulled

    def start(self) -> None:
        return

    def stop(self) -> None:
        return

    def join(self, timeout_s: float) -> bool:
        return True


class PeerLink:
    def __init__(self, endpoint: ProducerEndpoint, peer_id: str, group: str) -> None:
        self.peer_id = peer_id
        self.group = group
        self.last_active_s = time.monotonic()
        self._endpoint = endpoint
        self._jobs: queue.SimpleQueue[Pull | None] = queue.SimpleQueue()
        self._link: Link | None = None
        self._store: Any = None
        self._failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pdserve-kv-peer-{group[:8]}",
                                        daemon=True)

    @property
    def has_failed(self) -> bool:
        return self._failed.is_set()

    def start(self) -> None:
        self._thread.start()

    def submit(self, pull: Pull) -> None:
        self._jobs.put(pull)

    def stop(self) -> None:
        """Serve what is queued, then close the link and end the thread."""
        self._jobs.put(None)

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread; True once it has ended (or never started)."""
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        ep = self._endpoint
        outbox = ep.ctx.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 1000)
        outbox.connect(ep.outbox_address)
        try:
            self._connect()
            while (pull := self._jobs.get()) is not None:
                self.last_active_s = time.monotonic()
                try:
                    self._serve(pull, outbox)
                except Exception as e:  # a bug: drop the link, answer later pulls "link"
                    ep.counts.problem("num_internal_errors", "internal",
                                      "KV peer %s: serving a pull failed: %r", self.peer_id, e)
                    self._failed.set()
                    self._close_link()
                    self._reply(outbox, pull, MsgType.ERROR, code=ErrorCode.LINK.value,
                                message="the prefill worker failed serving this pull")
                self.last_active_s = time.monotonic()
        finally:
            self._close_link()
            self._store = None  # ends this thread's store connection
            outbox.close()

    def _connect(self) -> None:
        import torch.distributed as dist

        ep = self._endpoint
        try:  # a store client of our own: the master store object is not shared across threads
            self._store = dist.TCPStore(ep.host, ep.store_port, is_master=False,
                                        timeout=datetime.timedelta(seconds=ep.timeout_s),
                                        wait_for_workers=False)
            self._link = ep.link_factory(self._store, self.group, PREFILL_RANK, ep.device,
                                         ep.host, ep.timeout_s)
        except Exception as e:
            ep.counts.problem("num_link_failures", "link", "KV link with decode peer %s not "
                              "built: %s", self.peer_id, e)
            self._failed.set()
            return
        ep.counts.add("num_links_opened")
        logger.info("KV link with decode peer %s is up", self.peer_id)

    def _serve(self, pull: Pull, outbox: zmq.Socket) -> None:
        if self._link is None:
            self._reply(outbox, pull, MsgType.ERROR, message="the link with this peer failed: "
                        "say HELLO again", code=ErrorCode.LINK.value)
            return
        ep = self._endpoint
        waited_s = time.monotonic() - pull.received_s
        if waited_s > ep.control_timeout_s:  # the peer stopped waiting for SENDING: skip it
            self._reply(outbox, pull, MsgType.ERROR, code=ErrorCode.BUSY.value,
                        message=f"the pull waited {waited_s:.1f} s behind this peer's link")
            return
        try:
            block_ids = ep.holds.start_send(pull.transfer_id, pull.first_block, pull.num_blocks,
                                            self.peer_id)
        except HoldError as e:
            self._reply(outbox, pull, MsgType.ERROR, message=str(e), code=e.code.value)
            return
        ok = announced = False
        num_bytes = ep.layout.nbytes(len(block_ids), None if pull.heads is None
                                     else pull.heads[1])
        try:
            send_view = getattr(self._link, "send_view", None)
            if send_view is None:
                buffer = gather_blocks(ep.kv_caches, ep.layout, block_ids, pull.heads)
            self._reply(outbox, pull, MsgType.SENDING, num_bytes=num_bytes, tag=pull.tag)
            announced = True
            if send_view is None:
                self._link.send(buffer, pull.tag)
            else:  # gather straight into the link's shared memory
                with send_view(num_bytes, pull.tag) as view:
                    gather_blocks(ep.kv_caches, ep.layout, block_ids, pull.heads, out=view)
            ok = True
        except Exception as e:
            ep.counts.problem("num_failed_sends", "send", "KV send of transfer %s to %s failed: %s",
                              pull.transfer_id, self.peer_id, e)
            if not announced:  # the peer still waits for our answer
                self._reply(outbox, pull, MsgType.ERROR, message=f"cannot send: {e}",
                            code=ErrorCode.STATE.value)
        finally:
            ep.holds.finish_send(pull.transfer_id, ok, self.peer_id)
        ep.counts.add("num_pulls")
        if ok:
            ep.counts.add("num_bytes_sent", num_bytes)
        elif announced:  # the link may be half-way through a send: the peer must pair again
            self._failed.set()
            self._close_link()

    def _reply(self, outbox: zmq.Socket, pull: Pull, kind: MsgType, **fields: Any) -> None:
        if kind is MsgType.ERROR:
            fields["message"] = fields["message"][:1000]
        data = self._endpoint.codec.encode(kind, transfer_id=pull.transfer_id, **fields)
        outbox.send_multipart([pull.identity, data])

    def _close_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            try:
                link.close()
            except Exception as e:
                logger.warning("closing the KV link with %s failed: %s", self.peer_id, e)
            self._endpoint.counts.add("num_links_closed")
        self._delete_store_keys()

    def _delete_store_keys(self) -> None:
        store = self._store
        if store is None:
            return
        try:
            for key in store.list_keys():
                if self.group in key:
                    store.delete_key(key)
        except Exception as e:  # the store may be shutting down
            logger.debug("deleting the TCPStore keys of group %s failed: %s", self.group, e)
