"""The prefill worker's endpoint: answers decode workers' pulls of held blocks.

One thread owns a ZMQ ROUTER socket (control messages, see ``kvtransfer.protocol``), the
TCPStore the pairs rendezvous through, and one ``Link`` per decode worker that said HELLO.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from kvtransfer import protocol
from kvtransfer.blocks import KVLayout, gather_blocks
from kvtransfer.holds import HoldError, HoldTable
from kvtransfer.link import PREFILL_RANK, Link, TorchDistLink
from kvtransfer.protocol import MsgType

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
POLL_MS = 200


class ProducerEndpoint:
    def __init__(
        self,
        host: str,
        port: int,
        kv_caches: dict[str, torch.Tensor],
        layout: KVLayout,
        holds: HoldTable,
        timeout_s: float,
        link_factory: Callable[..., Link] = TorchDistLink,
    ) -> None:
        import torch.distributed as dist

        self._host = host
        self._kv_caches = kv_caches
        self._layout = layout
        self._holds = holds
        self._timeout_s = timeout_s
        self._link_factory = link_factory
        self._device = next(iter(kv_caches.values())).device
        self._links: dict[str, Link] = {}
        self.counts = {"num_bytes_sent": 0}
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(f"tcp://{host}:{port}")
        except zmq.ZMQError as e:
            raise RuntimeError(f"KV transfer port {host}:{port} is not free: {e}") from e
        self.address = (host, port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pdserve-kv-producer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for link in self._links.values():
            link.close()
        self._sock.close()
        self._ctx.term()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(POLL_MS):
                continue
            identity, data = self._sock.recv_multipart()
            try:
                kind, msg = protocol.decode(data)
                self._dispatch(identity, kind, msg)
            except (protocol.ProtocolError, KeyError, TypeError, ValueError) as e:
                logger.warning("rejected a control message: %s", e)
                self._reply(identity, MsgType.ERROR, message=f"bad message: {e}",
                            code="protocol")
            except Exception:
                logger.exception("KV producer failed on a %s message", data[:64])

    def _reply(self, identity: bytes, kind: MsgType, **fields: Any) -> None:
        self._sock.send_multipart([identity, protocol.encode(kind, **fields)])

    def _dispatch(self, identity: bytes, kind: MsgType, msg: dict[str, Any]) -> None:
        if kind is MsgType.HELLO:
            self._on_hello(identity, msg)
        elif kind is MsgType.PULL:
            self._on_pull(identity, msg)
        elif kind is MsgType.DONE:
            self._holds.confirm(msg["transfer_id"])
        else:
            raise protocol.ProtocolError(f"unexpected {kind.value} message")

    def _on_hello(self, identity: bytes, msg: dict[str, Any]) -> None:
        problem = self._layout.mismatch(msg["layout"])
        if problem:
            logger.error("refusing decode peer %s: %s", msg["peer_id"], problem)
            self._reply(identity, MsgType.ERROR, message=problem, code="layout")
            return
        group = f"{msg['peer_id']}/{uuid.uuid4().hex}"
        self._reply(identity, MsgType.WELCOME, store_port=self._store.port, group=group)
        old = self._links.pop(msg["peer_id"], None)
        if old is not None:
            old.close()
        self._links[msg["peer_id"]] = self._link_factory(
            self._store, group, PREFILL_RANK, self._device, self._host, self._timeout_s
        )

    def _on_pull(self, identity: bytes, msg: dict[str, Any]) -> None:
        transfer_id = msg["transfer_id"]
        link = self._links.get(msg.get("peer_id", ""))
        if link is None:
            self._reply(identity, MsgType.ERROR, message="no link: say HELLO first", code="link")
            return
        try:
            block_ids = self._holds.start_send(transfer_id, msg["first_block"], msg["num_blocks"])
        except HoldError as e:
            self._reply(identity, MsgType.ERROR, message=str(e), code="hold",
                        transfer_id=transfer_id)
            return
        ok = False
        try:
            buffer = gather_blocks(self._kv_caches, self._layout, block_ids)
            self._reply(identity, MsgType.SENDING, num_bytes=buffer.numel(),
                        transfer_id=transfer_id)
            link.send(buffer)
            self.counts["num_bytes_sent"] += buffer.numel()
            ok = True
        finally:
            self._holds.finish_send(transfer_id, ok)
            if not ok:  # the link may be half-way through a send: the peer must pair again
                self._links.pop(msg.get("peer_id", ""), link).close()
