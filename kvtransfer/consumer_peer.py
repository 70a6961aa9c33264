"""One prefill peer of a decode worker: the thread that runs that peer's loads in order.

Used by ``kvtransfer.consumer.ConsumerEndpoint`` (see its docstring for the threads). A
``PeerChannel`` thread owns the peer's DEALER socket and link. One ``Part`` (a load, or the
share of it this peer holds when the TP sizes differ):

    HELLO -> WELCOME (first load, or after a drop): join the peer's TCPStore, build the link
    PULL {transfer_id, first_block, num_blocks, tag [, heads]}   (tag: fresh per pull)
      <- ERROR unknown: retried for ``unknown_retry_s``; link: HELLO again, once
      <- SENDING {transfer_id, num_bytes, tag}: must echo ours, and num_bytes must match
    link.recv(buffer, tag); scatter into the local blocks (heads); wait for the device
    DONE {transfer_id, peer_id, pullers} (no reply)

A pair whose prefill worker offers direct reads (``kvtransfer.reads``; HELLO with our pid,
WELCOME with ``reads``) builds no link once the probe succeeds: SENDING names the blocks, in
ranges of at most ``MAX_READ_BLOCKS``, and the channel copies them out of the prefill worker's
cache into ours itself; a read that ended later than ``timeout_s`` after its PULL went out is
refused. A failed probe says HELLO again without the offer and pairs over a link.

Every exception ends in a failed load, never in a dead thread. A failed load sends DONE through
the endpoint's notifier (the prefill side frees the blocks now rather than at the lease's end).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from kvtransfer.blocks import KVLayout, empty_buffer, scatter_blocks
from kvtransfer.link import DECODE_RANK, Link, LinkError, wait_for_device
from kvtransfer.metadata import LoadSpec
from kvtransfer.params import Address
from kvtransfer.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_READ_BLOCKS,
    Codec,
    ErrorCode,
    MsgType,
    ProtocolError,
    unpack_block_ids,
)
from kvtransfer.reads import NONCE_BYTES, CacheRegions, ReadError, probe, read_blocks

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
UNKNOWN_RETRY_PAUSE_S = 0.02


class TransferError(Exception):
    """A load failed; ``drop`` says whether the socket and link are unusable now."""

    def __init__(self, message: str, drop: bool = True) -> None:
        super().__init__(message)
        self.drop = drop


@dataclasses.dataclass
class LoadContext:
    """What every channel of one endpoint shares (read-only, but for the locked counters)."""

    peer_id: str
    host: str
    kv_caches: dict[str, torch.Tensor]
    layout: KVLayout
    device: torch.device
    timeout_s: float
    control_timeout_s: float
    unknown_retry_s: float
    idle_s: float
    codec: Codec
    zmq_ctx: zmq.Context
    link_factory: Callable[..., Link]
    next_tag: Callable[[], int]
    # part, ok, bytes, seconds in all, seconds waiting for the peer's SENDING (0 if none)
    on_result: Callable[[Part, bool, int, float, float], None]
    # DONE of a failed load: address, transfer id, pullers
    notify_failed: Callable[[Address, str, int], None]
    regions: CacheRegions | None = None  # our cache, when this worker offers direct reads
    count: Callable[[str], None] = lambda name: None  # add one to the endpoint's counter


@dataclasses.dataclass(frozen=True)
class Part:
    """What one peer sends of a load: heads ``remote_heads`` of its blocks (None: all) into
    ``local_heads`` here; ``pullers`` decode workers pull this transfer from that peer."""

    spec: LoadSpec
    remote_heads: tuple[int, int] | None = None
    local_heads: tuple[int, int] | None = None
    pullers: int = 1


class PeerChannel:
    def __init__(self, ctx: LoadContext, address: Address,
                 forget: Callable[[Address, PeerChannel], bool]) -> None:
        self._ctx = ctx
        self.address = address
        self._forget = forget
        self._jobs: queue.SimpleQueue[Part | None] = queue.SimpleQueue()
        self._sock: zmq.Socket | None = None
        self._link: Link | None = None
        self._remote: CacheRegions | None = None  # the peer's cache, when this pair reads
        self._reads_refused = False  # a probe failed: this channel pairs over links
        self._read_timeout_s = ctx.timeout_s  # how long after its PULL a read may end
        self._dead_until = 0.0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"pdserve-kv-pull-{address[1]}")
        self._thread.start()

    @property
    def accepts_jobs(self) -> bool:
        return not self._stopping

    @property
    def has_jobs(self) -> bool:
        return not self._jobs.empty()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, part: Part) -> None:
        self._jobs.put(part)

    def stop(self) -> None:
        """Run what is queued, then close the socket and link and end the thread."""
        self._stopping = True
        self._jobs.put(None)

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the channel's thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                try:
                    part = self._jobs.get(timeout=self._ctx.idle_s)
                except queue.Empty:
                    if self._forget(self.address, self):
                        self._stopping = True
                        return
                    continue
                if part is None:
                    return
                self._run_load(part)
        finally:
            self._drop()

    def _run_load(self, part: Part) -> None:
        num_bytes, pull_wait_s, ok = 0, 0.0, False
        started_s = time.monotonic()
        spec = part.spec
        try:
            num_bytes, pull_wait_s = self._load(part)
            ok = True
        except Exception as e:  # a failed load must never end the thread or hang the request
            drop = not isinstance(e, TransferError) or e.drop
            logger.warning("KV load of transfer %s from %s:%d failed: %s", spec.transfer_id,
                           *self.address, e)
            if drop:
                self._drop()
            self._ctx.notify_failed(self.address, spec.transfer_id, part.pullers)
        self._ctx.on_result(part, ok, num_bytes, time.monotonic() - started_s, pull_wait_s)

    def _load(self, part: Part) -> tuple[int, float]:
        """Pull and scatter one part: (bytes received, seconds waited for SENDING)."""
        ctx = self._ctx
        spec = part.spec
        if time.monotonic() < self._dead_until:
            raise TransferError("the peer did not answer recently", drop=False)
        self._connect()  # first: a pair that reads pulls in ranges
        tag = ctx.next_tag()
        pulled_s = time.monotonic()
        num_blocks = len(spec.local_block_ids)
        reply = self._pull(part, tag, 0, num_blocks if self._remote is None else
                           min(num_blocks, MAX_READ_BLOCKS))
        pull_wait_s = time.monotonic() - pulled_s
        num_heads = None if part.local_heads is None else part.local_heads[1]
        if self._remote is not None:  # the pair reads (known once _pull has paired)
            num_bytes = self._read(part, reply, pulled_s)
        else:
            num_bytes = self._receive(part, reply, tag, num_heads)
        self._send(MsgType.DONE, transfer_id=spec.transfer_id, peer_id=ctx.peer_id,
                   pullers=part.pullers)
        return num_bytes, pull_wait_s

    def _read(self, part: Part, reply: dict[str, Any], pulled_s: float) -> int:
        """Copy the blocks named by SENDING (then by further pulls, in ranges) out of the
        prefill worker's cache into ours; refuse the bytes of a read that ended too late."""
        ctx, spec = self._ctx, part.spec
        num_heads = None if part.local_heads is None else part.local_heads[1]
        total = 0
        first = 0
        while True:
            if "block_ids" not in reply:
                raise TransferError("the prefill worker sent no block ids to a pair that reads")
            remote_ids = unpack_block_ids(reply["block_ids"])
            local_ids = spec.local_block_ids[first : first + len(remote_ids)]
            num_bytes = ctx.layout.nbytes(len(local_ids), num_heads)
            if not remote_ids or len(local_ids) != len(remote_ids) or \
                    reply["num_bytes"] != num_bytes:
                raise TransferError(f"peer names {len(remote_ids)} blocks of "
                                    f"{reply['num_bytes']} bytes for {len(local_ids)} here")
            assert self._remote is not None and ctx.regions is not None
            try:
                total += read_blocks(self._remote, ctx.regions, ctx.layout, remote_ids,
                                     local_ids, part.remote_heads, part.local_heads)
            except ReadError as e:
                raise TransferError(f"direct read failed: {e}") from e
            if time.monotonic() > pulled_s + self._read_timeout_s:  # the blocks may be gone
                raise TransferError(f"a direct read ended over {self._read_timeout_s} s after "
                                    "its pull", drop=False)
            first += len(remote_ids)
            if first == len(spec.local_block_ids):
                return total
            tag = ctx.next_tag()
            pulled_s = time.monotonic()
            reply = self._pull(part, tag, first, min(len(spec.local_block_ids) - first,
                                                     MAX_READ_BLOCKS))

    def _receive(self, part: Part, reply: dict[str, Any], tag: int,
                 num_heads: int | None) -> int:
        """The blocks over the link, into their local blocks."""
        ctx, spec = self._ctx, part.spec
        num_bytes = ctx.layout.nbytes(len(spec.local_block_ids), num_heads)
        if reply["num_bytes"] != num_bytes or "block_ids" in reply:
            raise TransferError(f"peer sends {reply['num_bytes']} bytes, expected {num_bytes}")
        assert self._link is not None
        recv_view = getattr(self._link, "recv_view", None)
        if recv_view is not None:  # scatter straight from the link's shared memory
            with recv_view(num_bytes, tag) as view:
                scatter_blocks(ctx.kv_caches, ctx.layout, spec.local_block_ids, view,
                               part.local_heads)
        else:
            buffer = empty_buffer(ctx.kv_caches, ctx.layout, len(spec.local_block_ids),
                                  num_heads)
            self._link.recv(buffer, tag)
            scatter_blocks(ctx.kv_caches, ctx.layout, spec.local_block_ids, buffer,
                           part.local_heads)
        wait_for_device(ctx.device, time.monotonic() + ctx.timeout_s)
        return num_bytes

    def _pull(self, part: Part, tag: int, first: int, num_blocks: int) -> dict[str, Any]:
        """PULL blocks ``[first, first + num_blocks)`` of the load until SENDING; retry while
        the hold is not registered yet, re-pair once."""
        ctx = self._ctx
        spec = part.spec
        heads = {} if part.remote_heads is None else {
            "first_head": part.remote_heads[0], "num_heads": part.remote_heads[1]}
        give_up_at = time.monotonic() + ctx.unknown_retry_s
        paired_again = False
        while True:
            self._connect()
            self._send(MsgType.PULL, peer_id=ctx.peer_id, transfer_id=spec.transfer_id,
                       first_block=spec.first_block + first, num_blocks=num_blocks,
                       tag=tag, **heads)
            kind, msg = self._recv()
            if msg.get("transfer_id", spec.transfer_id) != spec.transfer_id or (
                    kind is MsgType.SENDING and msg["tag"] != tag):
                raise TransferError(f"a {kind.value} reply for transfer {msg.get('transfer_id')}"
                                    f" tag {msg.get('tag')} answered our pull of "
                                    f"{spec.transfer_id} tag {tag}: refused")
            if kind is MsgType.SENDING:
                return msg
            if kind is not MsgType.ERROR:
                raise TransferError(f"unexpected {kind.value} reply to a pull")
            code = msg["code"]
            if code is ErrorCode.UNKNOWN and time.monotonic() < give_up_at:
                time.sleep(UNKNOWN_RETRY_PAUSE_S)
                continue
            if code is ErrorCode.LINK and not paired_again:
                paired_again = True
                self._drop()
                continue
            raise TransferError(f"prefill worker refused the pull ({code.value}): "
                                f"{msg['message']}", drop=code is ErrorCode.LINK)

    def _connect(self) -> None:
        if self._sock is not None and (self._link is not None or self._remote is not None):
            return
        import torch.distributed as dist

        ctx = self._ctx
        self._drop()
        self._sock = sock = ctx.zmq_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.connect(f"tcp://{self.address[0]}:{self.address[1]}")
        offer = ctx.regions is not None and not self._reads_refused
        msg = self._hello(offer)
        if offer and "reads" in msg:
            problem = self._take_reads(msg["reads"])
            if problem is None:
                return
            self._reads_refused = True
            ctx.count("num_read_fallbacks")
            logger.warning("KV pair with %s:%d cannot read directly (%s): pairing over a link",
                           *self.address, problem)
            msg = self._hello(offer=False)
        store = dist.TCPStore(self.address[0], msg["store_port"], is_master=False,
                              timeout=datetime.timedelta(seconds=ctx.timeout_s),
                              wait_for_workers=False)
        self._link = ctx.link_factory(store, msg["group"], DECODE_RANK, ctx.device, ctx.host,
                                      ctx.timeout_s)

    def _hello(self, offer: bool) -> dict[str, Any]:
        """HELLO (offering to read when ``offer``); the WELCOME's fields."""
        ctx = self._ctx
        pid = {"pid": ctx.regions.pid} if offer and ctx.regions is not None else {}
        self._send(MsgType.HELLO, peer_id=ctx.peer_id, layout=ctx.layout.to_wire(), **pid)
        try:
            kind, msg = self._recv()
        except TransferError:
            self._dead_until = time.monotonic() + ctx.control_timeout_s
            raise
        if kind is not MsgType.WELCOME:
            raise TransferError(f"prefill worker refused the pairing: {msg.get('message')}")
        return msg

    def _take_reads(self, offer: dict[str, Any]) -> str | None:
        """Check the peer's read offer and probe it: None (and reads on) when it works."""
        try:
            pid, (address, nonce) = offer["pid"], offer["probe"]
            layers = tuple((a, s) for a, s in offer["layers"])
            timeout_ms, num_blocks = offer["timeout_ms"], offer["num_blocks"]
            counts = [pid, address, timeout_ms, num_blocks, *(v for layer in layers
                                                              for v in layer)]
            if any(type(v) is not int or v < 0 for v in counts) or type(nonce) is not bytes:
                raise TypeError("fields must be non-negative ints, the nonce bytes")
            if len(nonce) != NONCE_BYTES or timeout_ms < 1 or num_blocks < 1:
                raise ValueError("a short nonce, or no time or blocks to read")
        except (KeyError, TypeError, ValueError) as e:
            return f"malformed offer: {e!r}"
        if len(layers) != len(self._ctx.layout.layers):
            return f"{len(layers)} layers offered for {len(self._ctx.layout.layers)}"
        problem = probe(pid, address, nonce)
        if problem is None:
            self._remote = CacheRegions(pid, layers, num_blocks)
            # A read must end before the prefill worker may free the blocks: within its
            # timeout of the PULL reaching it, and so within it of the PULL leaving here.
            self._read_timeout_s = min(self._ctx.timeout_s, timeout_ms / 1000)
        return problem

    def _send(self, kind: MsgType, **fields: Any) -> None:
        assert self._sock is not None
        try:
            self._sock.send(self._ctx.codec.encode(kind, **fields), zmq.NOBLOCK)
        except zmq.Again as e:
            raise TransferError(f"cannot send {kind.value}: the peer's queue is full") from e

    def _recv(self) -> tuple[MsgType, dict[str, Any]]:
        assert self._sock is not None
        timeout_s = self._ctx.control_timeout_s
        if not self._sock.poll(int(timeout_s * 1000)):
            raise TransferError(f"no reply within {timeout_s} s")
        try:
            return self._ctx.codec.decode(self._sock.recv(zmq.NOBLOCK))
        except (ProtocolError, zmq.ZMQError) as e:
            raise TransferError(f"bad reply: {e}") from e

    def _drop(self) -> None:
        """Close the link and the socket (after a failure, or on exit)."""
        link, self._link = self._link, None
        sock, self._sock = self._sock, None
        self._remote = None
        if link is not None:
            try:
                link.close()
            except (LinkError, RuntimeError) as e:
                logger.debug("closing a KV link failed: %s", e)
        if sock is not None:
            sock.close(linger=0)
