"""The decode worker's endpoint: pulls blocks from prefill workers on a thread of its own.

The worker's main thread ``submit``s load specs and ``take_results`` each engine step; the
transfer thread owns every ZMQ socket and link, so none is shared between threads.
"""

from __future__ import annotations

import dataclasses
import datetime
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

from kvtransfer import protocol
from kvtransfer.blocks import KVLayout, empty_buffer, scatter_blocks
from kvtransfer.link import DECODE_RANK, Link, TorchDistLink
from kvtransfer.metadata import LoadSpec
from kvtransfer.protocol import MsgType

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class TransferError(Exception):
    pass


@dataclasses.dataclass
class Peer:
    sock: zmq.Socket
    link: Link


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
        link_factory: Callable[..., Link] = TorchDistLink,
    ) -> None:
        self._host = host
        self._worker_index = worker_index
        self._kv_caches = kv_caches
        self._layout = layout
        self._timeout_s = timeout_s
        self._unknown_retry_s = unknown_retry_s
        self._link_factory = link_factory
        self._device = next(iter(kv_caches.values())).device
        self.peer_id = f"{socket.gethostname()}-{os.getpid()}-{worker_index}-{uuid.uuid4().hex[:8]}"
        self._ctx = zmq.Context()
        self._peers: dict[tuple[str, int], Peer] = {}
        self._jobs: queue.Queue[LoadSpec | None] = queue.Queue()
        self._lock = threading.Lock()
        self._results = LoadResults()
        self.counts = {"num_bytes_received": 0, "num_loads": 0, "num_failed_loads": 0}
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-consumer", daemon=True)
        self._thread.start()

    def submit(self, spec: LoadSpec) -> None:
        self._jobs.put(spec)

    def take_results(self) -> LoadResults:
        with self._lock:
            results, self._results = self._results, LoadResults()
        return results

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        for peer in self._peers.values():
            peer.link.close()
            peer.sock.close(linger=0)
        self._ctx.term()

    def _run(self) -> None:
        while (spec := self._jobs.get()) is not None:
            address = (spec.remote_host, spec.remote_base_port + self._worker_index)
            try:
                self._load(address, spec)
                ok = True
            except Exception as e:  # a failed load must never hang the request
                logger.warning("KV load of transfer %s from %s failed: %s",
                               spec.transfer_id, address, e)
                self._drop_peer(address)
                ok = False
            self._report(spec, ok)

    def _report(self, spec: LoadSpec, ok: bool) -> None:
        if spec.request_id is None:
            return
        with self._lock:
            self.counts["num_loads"] += 1
            self.counts["num_failed_loads"] += 0 if ok else 1
            self._results.finished.add(spec.request_id)
            if not ok:
                self._results.failed.add(spec.request_id)
                self._results.failed_block_ids.update(spec.local_block_ids)

    def _load(self, address: tuple[str, int], spec: LoadSpec) -> None:
        peer = self._peer(address)
        if spec.is_release_only:
            peer.sock.send(protocol.encode(MsgType.DONE, transfer_id=spec.transfer_id))
            return
        reply = self._pull(peer, spec)
        buffer = empty_buffer(self._kv_caches, self._layout, len(spec.local_block_ids))
        if reply["num_bytes"] != buffer.numel():
            raise TransferError(f"peer sends {reply['num_bytes']} bytes, expected {buffer.numel()}")
        peer.link.recv(buffer)
        scatter_blocks(self._kv_caches, self._layout, spec.local_block_ids, buffer)
        self.counts["num_bytes_received"] += buffer.numel()
        peer.sock.send(protocol.encode(MsgType.DONE, transfer_id=spec.transfer_id))

    def _pull(self, peer: Peer, spec: LoadSpec) -> dict[str, Any]:
        """Ask for the blocks; retry while the prefill side has not registered the hold yet."""
        give_up_at = time.monotonic() + self._unknown_retry_s
        while True:
            peer.sock.send(protocol.encode(
                MsgType.PULL, peer_id=self.peer_id, transfer_id=spec.transfer_id,
                first_block=spec.first_block, num_blocks=len(spec.local_block_ids)))
            kind, msg = self._recv(peer.sock)
            if kind is MsgType.SENDING:
                return msg
            not_held_yet = kind is MsgType.ERROR and msg.get("code") == "hold"
            if not_held_yet and time.monotonic() < give_up_at:
                time.sleep(0.02)
                continue
            raise TransferError(f"prefill worker refused the pull: {msg.get('message')}")

    def _recv(self, sock: zmq.Socket) -> tuple[MsgType, dict[str, Any]]:
        if not sock.poll(int(self._timeout_s * 1000)):
            raise TransferError(f"no reply within {self._timeout_s} s")
        return protocol.decode(sock.recv())

    def _peer(self, address: tuple[str, int]) -> Peer:
        peer = self._peers.get(address)
        if peer is not None:
            return peer
        import torch.distributed as dist

        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{address[0]}:{address[1]}")
        try:
            sock.send(protocol.encode(MsgType.HELLO, peer_id=self.peer_id,
                                      layout=self._layout.to_wire()))
            kind, msg = self._recv(sock)
            if kind is not MsgType.WELCOME:
                raise TransferError(f"prefill worker refused the pairing: {msg.get('message')}")
            store = dist.TCPStore(address[0], msg["store_port"], is_master=False,
                                  timeout=datetime.timedelta(seconds=self._timeout_s),
                                  wait_for_workers=False)
            link = self._link_factory(store, msg["group"], DECODE_RANK, self._device,
                                      self._host, self._timeout_s)
        except Exception:
            sock.close(linger=0)
            raise
        self._peers[address] = peer = Peer(sock, link)
        return peer

    def _drop_peer(self, address: tuple[str, int]) -> None:
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.link.close()
            peer.sock.close(linger=0)
