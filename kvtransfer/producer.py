"""The prefill worker's endpoint: answers decode workers' pulls of held blocks.

Threads (ZMQ sockets are not thread-safe, so each socket has exactly one owner):

- The ROUTER thread owns the ZMQ ROUTER socket (control messages, ``kvtransfer.protocol``). It
  only receives, checks, dispatches and replies: it never waits on a peer. Anything that can be
  refused (malformed frames, bad MAC, unknown message) is refused here, counted, answered with
  an ERROR and logged once per kind. CLAIM and DONE are applied to the hold table here.
- One ``PeerLink`` thread per decode worker that said HELLO builds the pair's link (the
  rendezvous waits up to ``timeout_s`` for the peer to join) and then serves that peer's pulls
  in order. A slow or dead peer therefore only stalls itself. Its replies (SENDING, ERROR) go
  through its own inproc PUSH socket to the ROUTER thread, which forwards them. A pull that
  waited in that queue longer than ``control_timeout_s`` (its sender has stopped waiting for
  SENDING) is answered ``busy`` and not sent.

A decode worker on the same host may read the held blocks itself (``kvtransfer.reads``,
``direct_reads``): its HELLO offers it, the WELCOME answers with where this worker's cache
is, and that pair gets a ``ReadPeer`` instead of a link. Its pulls are answered by the ROUTER
thread: SENDING names the blocks, which stay marked in flight until the peer's DONE, or until
``timeout_s`` after the PULL (the peer refuses a read that ended later).

Links expire: after a failed send, after ``link_idle_s`` without a pull, or when the peer says
HELLO again. Their rendezvous keys are deleted from the TCPStore. The TCPStore and the ROUTER
listen on ``host`` only; port 0 binds a free port and ``address`` reports the bound one.
"""

from __future__ import annotations

import itertools
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from kvtransfer.blocks import KVLayout
from kvtransfer.holds import HoldError, HoldTable
from kvtransfer.link import Link, TorchDistLink
from kvtransfer.producer_peer import COUNTERS, Counters, PeerLink, Pull, ReadPeer
from kvtransfer.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_READ_BLOCKS,
    Codec,
    ErrorCode,
    MsgType,
    ProtocolError,
    pack_block_ids,
)

if TYPE_CHECKING:
    import torch

__all__ = ["COUNTERS", "ProducerEndpoint"]

logger = logging.getLogger(__name__)
POLL_MS = 100
REAP_EVERY_S = 0.5
MAX_PEERS = 64  # links (live or still closing) per worker; more HELLOs are answered busy
MAX_KEPT_FRAMES = 3  # frames kept from one message; the rest are read and dropped
MAX_BATCH = 64  # messages handled per poll before replies are forwarded again
_endpoint_ids = itertools.count()


def bound_store(host: str) -> Any:
    """A master TCPStore listening on ``host`` only (torch's own binds every interface)."""
    import torch.distributed as dist

    family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(128)
        store = dist.TCPStore(host, listener.getsockname()[1], is_master=True,
                              wait_for_workers=False, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store owns the descriptor now and closes it itself
    return store


class ProducerEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        kv_caches: dict[str, torch.Tensor],
        layout: KVLayout,
        holds: HoldTable,
        timeout_s: float,
        *,
        control_timeout_s: float = 5.0,
        claim_lease_s: float = 300.0,
        link_idle_s: float = 600.0,
        codec: Codec | None = None,
        link_factory: Callable[..., Link] = TorchDistLink,
        direct_reads: bool = False,
    ) -> None:
        self.host = host
        self.kv_caches = kv_caches
        self.layout = layout
        self.holds = holds
        self.timeout_s = timeout_s
        self.control_timeout_s = control_timeout_s
        self._claim_lease_s = claim_lease_s
        self._link_idle_s = link_idle_s
        self.codec = codec if codec is not None else Codec.from_env()
        if not self.codec.is_authenticated:
            from kvtransfer.env import warn_unauthenticated

            warn_unauthenticated()
        self.link_factory = link_factory
        self.device = next(iter(kv_caches.values())).device
        self.counts = Counters()
        self.store = bound_store(host)
        self.store_port: int = self.store.port
        self.ctx = zmq.Context()
        self.outbox_address = f"inproc://pdserve-kv-producer-{next(_endpoint_ids)}"
        try:
            self._sock, self.address = self._bind_router(host, port)
            self._outbox = self.ctx.socket(zmq.PULL)
            self._outbox.setsockopt(zmq.LINGER, 0)
            self._outbox.bind(self.outbox_address)
        except BaseException:
            self.ctx.destroy(linger=0)
            raise
        self._peers: dict[str, PeerLink | ReadPeer] = {}
        self._retiring: list[PeerLink | ReadPeer] = []
        # (transfer id, peer id) of each read in flight -> (its deadline, its bytes)
        self._reads: dict[tuple[str, str], tuple[float, int]] = {}
        self._allows_readers = False
        self._read_offer = self._offer_reads(kv_caches) if direct_reads else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pdserve-kv-producer", daemon=True)
        self._thread.start()

    def _bind_router(self, host: str, port: int) -> tuple[zmq.Socket, tuple[str, int]]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            sock.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError as e:
            sock.close()
            raise RuntimeError(f"KV transfer port {host}:{port} is not free: {e}") from e
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        return sock, (host, int(bound))

    def _offer_reads(self, kv_caches: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """What a decode worker needs to read this worker's blocks, or None if it cannot."""
        from kvtransfer import reads

        regions = reads.own_regions(kv_caches, self.layout, "producer")
        if regions is None:
            return None
        self._probe = reads.Probe()
        return {"pid": regions.pid, "probe": [self._probe.address, self._probe.nonce],
                "layers": regions.to_wire(), "num_blocks": regions.num_blocks,
                "timeout_ms": math.floor(self.timeout_s * 1000)}

    def is_alive(self) -> bool:
        """True while the ROUTER thread serves (it survives any message; only close ends it)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def close(self) -> None:
        """Stop the ROUTER thread and every peer thread, join them, then close the sockets."""
        self._stop.set()
        self._thread.join(timeout=5)
        peers = [*self._peers.values(), *self._retiring]
        for peer in peers:
            peer.stop()
        deadline = time.monotonic() + self.timeout_s + 1
        stuck = [p for p in peers if not p.join(max(0.0, deadline - time.monotonic()))]
        if self._thread.is_alive() or stuck:
            logger.error("KV producer: %d thread(s) did not stop; leaving their sockets open",
                         len(stuck) + self._thread.is_alive())
            return
        self._sock.close()
        self._outbox.close()
        self.ctx.term()
        self.store = None  # stops the TCPStore server once no client holds it

    # -- the ROUTER thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._outbox, zmq.POLLIN)
        next_reap = 0.0
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(POLL_MS))
                if self._outbox in ready:
                    self._forward_replies()
                if self._sock in ready:
                    for _ in range(MAX_BATCH):
                        if not self._receive():
                            break
                if time.monotonic() >= next_reap:
                    self._reap_peers()
                    self._expire_reads()
                    next_reap = time.monotonic() + REAP_EVERY_S
            except Exception as e:  # nothing a peer sends may end this thread
                self.counts.problem("num_internal_errors", "internal",
                                    "KV producer: unexpected error: %r", e)

    def _forward_replies(self) -> None:
        while True:
            try:
                frames = self._outbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._sock.send_multipart(frames, zmq.NOBLOCK)

    def _receive(self) -> bool:
        """Read and handle one message; False when none is waiting."""
        try:
            frames = [self._sock.recv(zmq.NOBLOCK)]
        except zmq.Again:
            return False
        num_frames = 1
        while self._sock.getsockopt(zmq.RCVMORE):
            frame = self._sock.recv()
            num_frames += 1
            if len(frames) < MAX_KEPT_FRAMES:
                frames.append(frame)
        identity = frames[0]
        if num_frames != 2:
            # A REQ client puts an empty delimiter first; echo it so the refusal reaches it.
            envelope = [identity, b""] if num_frames > 2 and frames[1] == b"" else [identity]
            self._refuse(envelope, ErrorCode.PROTOCOL, "frames",
                         f"expected one frame after the identity, got {num_frames - 1} "
                         "(use a DEALER socket)")
            return True
        try:
            kind, msg = self.codec.decode(frames[1])
        except ProtocolError as e:
            self._refuse([identity], e.code, e.code.value, str(e))
            return True
        self._dispatch(identity, kind, msg)
        return True

    def _refuse(self, envelope: list[bytes], code: ErrorCode, kind: str, message: str,
                transfer_id: str | None = None) -> None:
        counter = "num_auth_failures" if code is ErrorCode.AUTH else "num_protocol_errors"
        self.counts.problem(counter, kind, "KV producer refused a control message: %s", message)
        self._reply(envelope, MsgType.ERROR, message=message, code=code.value,
                    **({} if transfer_id is None else {"transfer_id": transfer_id}))

    def _reply(self, envelope: list[bytes], kind: MsgType, **fields: Any) -> None:
        if kind is MsgType.ERROR:
            fields["message"] = fields["message"][:1000]
        self._sock.send_multipart([*envelope, self.codec.encode(kind, **fields)], zmq.NOBLOCK)

    def _dispatch(self, identity: bytes, kind: MsgType, msg: dict[str, Any]) -> None:
        if kind is MsgType.HELLO:
            self._on_hello(identity, msg)
        elif kind is MsgType.PULL:
            self._on_pull(identity, msg)
        elif kind is MsgType.CLAIM:
            if not self.holds.claim(msg["transfer_id"], self._claim_lease_s):
                logger.debug("CLAIM of transfer %s, which is not held", msg["transfer_id"])
        elif kind is MsgType.DONE:
            self._end_read(msg["transfer_id"], msg.get("peer_id", ""),
                           ok=not msg.get("failed", False))
            self.holds.confirm(msg["transfer_id"], msg.get("peer_id", ""), msg.get("pullers"))
        else:
            self._refuse([identity], ErrorCode.PROTOCOL, "unexpected",
                         f"a prefill worker does not take {kind.value} messages")

    def _on_hello(self, identity: bytes, msg: dict[str, Any]) -> None:
        problem = self.layout.mismatch(msg["layout"])
        if problem:
            self.counts.problem("num_layout_mismatches", "layout",
                                "KV producer refusing decode peer %s: %s", msg["peer_id"], problem)
            self._reply([identity], MsgType.ERROR, message=problem, code=ErrorCode.LAYOUT.value)
            return
        old = self._peers.pop(msg["peer_id"], None)
        if old is not None:  # the peer dropped its end: pair again
            self._retire(old)
        self._reap_peers()
        if len(self._peers) + len(self._retiring) >= MAX_PEERS:
            self.counts.problem("num_busy", "busy", "KV producer: %d links; refusing peer %s",
                                MAX_PEERS, msg["peer_id"])
            self._reply([identity], MsgType.ERROR, message=f"too many peers ({MAX_PEERS})",
                        code=ErrorCode.BUSY.value)
            return
        group = uuid.uuid4().hex
        if "pid" in msg and self._read_offer is not None:  # no link: the peer reads
            if not self._allows_readers:
                from kvtransfer.reads import allow_readers

                allow_readers()  # once, and only where a peer offers to read
                self._allows_readers = True
            self._reply([identity], MsgType.WELCOME, store_port=self.store_port, group=group,
                        reads=self._read_offer)
            self._peers[msg["peer_id"]] = ReadPeer(msg["peer_id"])
            return
        self._reply([identity], MsgType.WELCOME, store_port=self.store_port, group=group)
        peer = PeerLink(self, msg["peer_id"], group)
        self._peers[msg["peer_id"]] = peer
        peer.start()

    def _on_pull(self, identity: bytes, msg: dict[str, Any]) -> None:
        peer = self._peers.get(msg["peer_id"])
        if peer is None or peer.has_failed:
            self._reply([identity], MsgType.ERROR, message="no link with this peer: say HELLO",
                        code=ErrorCode.LINK.value, transfer_id=msg["transfer_id"])
            return
        heads = None
        if "first_head" in msg or "num_heads" in msg:
            heads = (msg.get("first_head", 0), msg.get("num_heads", 0))
            problem = self.layout.check_heads(*heads)
            if problem:
                self._reply([identity], MsgType.ERROR, message=problem,
                            code=ErrorCode.RANGE.value, transfer_id=msg["transfer_id"])
                return
        if isinstance(peer, ReadPeer):
            self._serve_read(identity, peer, msg, heads)
            return
        peer.submit(Pull(identity, msg["transfer_id"], msg["first_block"], msg["num_blocks"],
                         msg["tag"], heads))

    # -- direct reads ----------------------------------------------------------------------------

    def _serve_read(self, identity: bytes, peer: ReadPeer, msg: dict[str, Any],
                    heads: tuple[int, int] | None) -> None:
        """Name the blocks of a pull to a peer that reads them itself; they stay in flight
        until its DONE or the deadline (``_expire_reads``)."""
        transfer_id = msg["transfer_id"]
        peer.last_active_s = time.monotonic()
        if msg["num_blocks"] > MAX_READ_BLOCKS:
            self._reply([identity], MsgType.ERROR, code=ErrorCode.RANGE.value,
                        transfer_id=transfer_id,
                        message=f"a read names at most {MAX_READ_BLOCKS} blocks")
            return
        key = (transfer_id, peer.peer_id)
        try:
            if key in self._reads:  # a further range of a long transfer
                block_ids = self.holds.blocks_in_flight(transfer_id, msg["first_block"],
                                                        msg["num_blocks"], peer.peer_id)
            else:
                block_ids = self.holds.start_send(transfer_id, msg["first_block"],
                                                  msg["num_blocks"], peer.peer_id)
        except HoldError as e:
            self._reply([identity], MsgType.ERROR, message=str(e), code=e.code.value,
                        transfer_id=transfer_id)
            return
        num_bytes = self.layout.nbytes(len(block_ids), None if heads is None else heads[1])
        # Each range's deadline runs from its own PULL, as the peer's check does.
        self._reads[key] = (time.monotonic() + self.timeout_s,
                            self._reads.get(key, (0.0, 0))[1] + num_bytes)
        if not peer.has_read:  # a pair that reads: counted once it does
            peer.has_read = True
            self.counts.add("num_read_pairs")
        self.counts.add("num_pulls")
        self._reply([identity], MsgType.SENDING, transfer_id=transfer_id, num_bytes=num_bytes,
                    tag=msg["tag"], block_ids=pack_block_ids(block_ids))

    def _end_read(self, transfer_id: str, peer_id: str, ok: bool) -> None:
        read = self._reads.pop((transfer_id, peer_id), None)
        if read is None:
            return
        self.holds.finish_send(transfer_id, ok, peer_id)
        if ok:
            self.counts.add("num_bytes_sent", read[1])

    def _expire_reads(self) -> None:
        """Reads whose peer said nothing by the deadline: the blocks are no longer theirs."""
        now = time.monotonic()
        for (transfer_id, peer_id), (deadline_s, _) in list(self._reads.items()):
            if now > deadline_s:
                self.counts.problem("num_failed_sends", "read", "KV read of transfer %s by %s: "
                                    "no DONE within %.0f s", transfer_id, peer_id,
                                    self.timeout_s)
                self._end_read(transfer_id, peer_id, ok=False)

    def _retire(self, peer: PeerLink) -> None:
        peer.stop()
        self._retiring.append(peer)

    def _reap_peers(self) -> None:
        """Drop failed and idle links; forget closed ones whose thread has ended."""
        now = time.monotonic()
        for peer_id, peer in list(self._peers.items()):
            if peer.has_failed or now - peer.last_active_s > self._link_idle_s:
                del self._peers[peer_id]
                self._retire(peer)
        self._retiring = [p for p in self._retiring if not p.join(0)]
