"""A raw decode peer for the producer's tests (ZMQ DEALER + the real Gloo link), and its checks.

``RawPeer`` speaks the control protocol by hand so the producer's tests do not depend on the
consumer's code, and checks what a real consumer must check (SENDING echoes transfer id and tag).
The other ``test_producer_*`` files and ``test_protocol_fuzz`` import it from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import os
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import psutil
import pytest
import torch
import torch.distributed as dist
import zmq

from kvtransfer.blocks import KVLayout
from kvtransfer.holds import HoldTable
from kvtransfer.link import DECODE_RANK, Link, TorchDistLink
from kvtransfer.producer import ProducerEndpoint
from kvtransfer.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Codec, MsgType
from tests.helpers import BLOCK_SIZE, block_of, make_kv_caches

HOST = "127.0.0.1"
OTHER_HOST = "127.0.0.2"  # another loopback address: a second "node" on this machine
NUM_BLOCKS = 10
SECRET = b"producer-tests-secret-0123456789"
CODEC = Codec(SECRET)
REPLY_S = 5.0


class PeerError(AssertionError):
    pass


class RawPeer:
    """One decode worker, by hand: its own ZMQ context, a DEALER socket and a link."""

    def __init__(self, address: tuple[str, int], layout: KVLayout, codec: Codec = CODEC,
                 peer_id: str | None = None, link_timeout_s: float = 10.0) -> None:
        self.layout = layout
        self.codec = codec
        self.peer_id = peer_id or f"peer-{uuid.uuid4().hex[:8]}"
        self.link_timeout_s = link_timeout_s
        self.link: Link | None = None
        self.store: Any = None
        self.group: str | None = None
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address[0]}:{address[1]}")

    def send(self, kind: MsgType, **fields: Any) -> None:
        self.sock.send(self.codec.encode(kind, **fields))

    def receive(self, timeout_s: float = REPLY_S) -> tuple[MsgType, dict[str, Any]]:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise PeerError(f"no reply within {timeout_s} s")
        return self.codec.decode(self.sock.recv())

    def request(self, kind: MsgType, **fields: Any) -> tuple[MsgType, dict[str, Any]]:
        self.send(kind, **fields)
        return self.receive()

    def hello(self, join: bool = True) -> dict[str, Any]:
        """Say HELLO; on WELCOME join the link (unless ``join`` is False)."""
        kind, msg = self.request(MsgType.HELLO, peer_id=self.peer_id,
                                 layout=self.layout.to_wire())
        if kind is not MsgType.WELCOME:
            raise PeerError(f"HELLO answered {kind.value}: {msg}")
        self.group = msg["group"]
        if join:
            self.store = dist.TCPStore(HOST, msg["store_port"], is_master=False,
                                       timeout=datetime.timedelta(seconds=self.link_timeout_s),
                                       wait_for_workers=False)
            self.link = TorchDistLink(self.store, msg["group"], DECODE_RANK,
                                      torch.device("cpu"), HOST, self.link_timeout_s)
        return msg

    def pull(self, transfer_id: str, first_block: int, num_blocks: int,
             tag: int) -> torch.Tensor | dict[str, Any]:
        """The pulled bytes, or the ERROR message's fields."""
        kind, msg = self.request(MsgType.PULL, peer_id=self.peer_id, transfer_id=transfer_id,
                                 first_block=first_block, num_blocks=num_blocks, tag=tag)
        if kind is MsgType.ERROR:
            return msg
        if kind is not MsgType.SENDING or msg["transfer_id"] != transfer_id or msg["tag"] != tag:
            raise PeerError(f"PULL {transfer_id}/{tag} answered {kind.value} {msg}")
        buffer = torch.empty(msg["num_bytes"], dtype=torch.uint8)
        assert self.link is not None, "pull before the link was built"
        self.link.recv(buffer, tag)
        return buffer

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.sock.close()
        self._ctx.term()


def expected_bytes(caches: dict[str, torch.Tensor], block_ids: list[int]) -> torch.Tensor:
    """What a pull of ``block_ids`` must deliver, built by plain indexing: every layer in name
    order, each the listed blocks in order."""
    parts = [torch.stack([block_of(caches[name], "cpu", b) for b in block_ids])
             .contiguous().view(torch.uint8).reshape(-1) for name in sorted(caches)]
    return torch.cat(parts)


def signed_raw(**msg: Any) -> bytes:
    """A message signed with the test secret whatever its fields (the Codec would refuse)."""
    body = msgpack.packb({k: msg[k] for k in sorted(msg)})
    return msgpack.packb({**msg, "mac": hmac.new(SECRET, body, hashlib.sha256).digest()})


@dataclasses.dataclass
class Producer:
    endpoint: ProducerEndpoint
    caches: dict[str, torch.Tensor]
    layout: KVLayout
    holds: HoldTable

    @property
    def address(self) -> tuple[str, int]:
        return self.endpoint.address

    def peer(self, **kwargs: Any) -> RawPeer:
        return RawPeer(self.address, self.layout, **kwargs)


@contextlib.contextmanager
def running_producer(holds: HoldTable | None = None, host: str = HOST,
                     **kwargs: Any) -> Iterator[Producer]:
    """A live ProducerEndpoint on ``host`` (127.0.0.1), port 0, signing with the test secret."""
    caches = make_kv_caches("cpu", NUM_BLOCKS, seed=11)
    layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
    holds = holds if holds is not None else HoldTable()
    options = {"timeout_s": 10.0, "control_timeout_s": 1.0, "codec": CODEC, **kwargs}
    timeout_s = options.pop("timeout_s")
    endpoint = ProducerEndpoint(host, 0, caches, layout, holds, timeout_s, **options)
    try:
        yield Producer(endpoint, caches, layout, holds)
    finally:
        endpoint.close()


@contextlib.contextmanager
def peers(producer: Producer, count: int = 1, **kwargs: Any) -> Iterator[list[RawPeer]]:
    made = [producer.peer(**kwargs) for _ in range(count)]
    try:
        yield made
    finally:
        for peer in made:
            peer.close()


def listening_addresses(port: int) -> set[str]:
    """The local addresses this process listens on at ``port``."""
    return {c.laddr.ip for c in psutil.Process(os.getpid()).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def kv_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("pdserve-kv-p")]


# -- the helper's own checks -------------------------------------------------------------------


def test_raw_peer_pulls_the_held_bytes() -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        producer.holds.add("t", "req", [4, 1, 7], 60.0)
        peer.hello()
        got = peer.pull("t", 0, 3, tag=5)
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, expected_bytes(producer.caches, [4, 1, 7]))
        assert got.numel() == 3 * producer.layout.bytes_per_block


def test_signed_raw_matches_the_codec() -> None:
    data = signed_raw(v=PROTOCOL_VERSION, type="done", transfer_id="t")
    assert CODEC.decode(data) == (MsgType.DONE, {"transfer_id": "t"})
    assert len(data) < MAX_MESSAGE_BYTES


def test_listening_addresses_sees_all_interfaces() -> None:
    """The check the bind tests rely on can tell a wildcard bind from a host bind."""
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    addresses = listening_addresses(store.port)
    if addresses <= {HOST}:
        pytest.skip(f"this torch's TCPStore already binds {addresses} only")
    assert addresses & {"0.0.0.0", "::"}
