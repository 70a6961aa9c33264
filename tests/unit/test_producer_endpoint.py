"""The prefill worker's ProducerEndpoint over real ZMQ sockets, a real TCPStore and real Gloo
links on 127.0.0.1: ports, binds, error codes, leases, authentication, stalls, expiry."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
import zmq

from kvtransfer import producer as producer_module
from kvtransfer.holds import HoldTable
from kvtransfer.params import batch_params
from kvtransfer.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Codec, ErrorCode, MsgType
from kvtransfer.release import claim_transfer, release_transfer
from tests.helpers import wait_until
from tests.unit.test_holds import FakeClock
from tests.unit.test_producer_support import (
    CODEC,
    HOST,
    OTHER_HOST,
    RawPeer,
    expected_bytes,
    kv_threads,
    listening_addresses,
    peers,
    running_producer,
    signed_raw,
)

LEASE_S = 60.0


def round_trip(peer: RawPeer) -> None:
    """Wait until the producer has handled everything ``peer`` sent (messages on one connection
    are handled in order, and a PULL of an unknown transfer is always answered)."""
    result = peer.pull("no-such-transfer", 0, 1, tag=1)
    assert isinstance(result, dict), result


# -- ports and binds ---------------------------------------------------------------------------


def test_port_zero_binds_a_free_port_and_reports_it() -> None:
    with running_producer(timeout_s=1.0) as a, running_producer() as b:
        assert a.address[0] == HOST and a.address[1] > 0
        assert a.address[1] != b.address[1]
        with peers(a) as (peer,):
            assert peer.hello(join=False)["store_port"] == a.endpoint.store_port


def test_a_taken_port_is_a_clear_error() -> None:
    with running_producer() as a:
        with pytest.raises(RuntimeError, match="not free"):
            producer_module.ProducerEndpoint(HOST, a.address[1], a.caches, a.layout,
                                             HoldTable(), 5.0, codec=CODEC)


def test_listeners_bind_only_the_configured_host() -> None:
    with running_producer() as producer:
        assert listening_addresses(producer.address[1]) == {HOST}
        assert listening_addresses(producer.endpoint.store_port) == {HOST}


# -- pulls, tags and error codes ---------------------------------------------------------------


def test_pull_delivers_the_held_bytes_with_the_echoed_tag() -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        producer.holds.add("t-1", "req-1", [7, 2, 9, 4], LEASE_S)
        peer.hello()
        got = peer.pull("t-1", 1, 2, tag=123)  # RawPeer checks SENDING's transfer_id and tag
        assert torch.equal(got, expected_bytes(producer.caches, [2, 9]))
        peer.send(MsgType.DONE, transfer_id="t-1")
        wait_until(lambda: producer.holds.take_released() == {"req-1"}, what="release")
        assert producer.endpoint.counts["num_bytes_sent"] == got.numel()
        assert producer.endpoint.counts["num_pulls"] == 1


def test_unknown_expired_released_and_range_have_distinct_codes() -> None:
    clock = FakeClock()
    with running_producer(HoldTable(clock=clock)) as producer, peers(producer) as (peer,):
        peer.hello()
        producer.holds.add("t-exp", "req-exp", [1], 10.0)
        producer.holds.add("t-done", "req-done", [2], LEASE_S)
        producer.holds.add("t-range", "req-range", [3, 4], LEASE_S)
        clock.advance(11.0)
        assert producer.holds.take_released() == {"req-exp"}
        peer.send(MsgType.DONE, transfer_id="t-done")
        codes = {tid: peer.pull(tid, 0, 1, tag=2)
                 for tid in ("never", "t-exp", "t-done")}
        codes["t-range"] = peer.pull("t-range", 1, 2, tag=3)
        assert {tid: msg["code"] for tid, msg in codes.items()} == {
            "never": ErrorCode.UNKNOWN, "t-exp": ErrorCode.EXPIRED, "t-done": ErrorCode.STATE,
            "t-range": ErrorCode.RANGE}
        assert all(msg["transfer_id"] == tid for tid, msg in codes.items())
        assert isinstance(peer.pull("t-range", 0, 2, tag=4), torch.Tensor)  # still pullable


@pytest.mark.parametrize("field,value", [("first_block", 1.0), ("first_block", True),
                                         ("num_blocks", 2.5), ("tag", 0), ("first_block", -1)])
def test_a_signed_pull_with_a_bad_field_is_refused_and_the_hold_stays_held(
    field: str, value: object
) -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        producer.holds.add("t", "req", [5, 6], LEASE_S)
        peer.hello()
        fields = {"peer_id": peer.peer_id, "transfer_id": "t", "first_block": 0,
                  "num_blocks": 2, "tag": 9, field: value}
        peer.sock.send(signed_raw(v=PROTOCOL_VERSION, type="pull", **fields))
        kind, msg = peer.receive()
        assert (kind, msg["code"]) == (MsgType.ERROR, ErrorCode.PROTOCOL)
        assert field in msg["message"]
        assert producer.holds.num_sending == 0
        assert torch.equal(peer.pull("t", 0, 2, tag=10), expected_bytes(producer.caches, [5, 6]))
        assert producer.endpoint.counts["num_protocol_errors"] == 1


def test_pull_without_hello_is_a_link_error() -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        producer.holds.add("t", "req", [1], LEASE_S)
        assert peer.pull("t", 0, 1, tag=1)["code"] is ErrorCode.LINK
        assert producer.holds.num_sending == 0


def test_claim_extends_the_lease() -> None:
    clock = FakeClock()
    holds = HoldTable(clock=clock)
    with running_producer(holds, claim_lease_s=300.0) as producer, peers(producer) as (peer,):
        holds.add("t-claimed", "req-c", [1], 10.0)
        holds.add("t-not", "req-n", [2], 10.0)
        peer.hello()
        peer.send(MsgType.CLAIM, transfer_id="t-claimed")
        round_trip(peer)
        clock.advance(100.0)
        assert holds.take_released() == {"req-n"}
        assert isinstance(peer.pull("t-claimed", 0, 1, tag=7), torch.Tensor)
        wait_until(lambda: holds.num_sending == 0, what="the send's end")
        clock.advance(201.0)
        assert holds.take_released() == {"req-c"}


def test_done_arriving_while_sending_releases_after_the_send() -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        producer.holds.add("t", "req", list(range(10)), LEASE_S)
        peer.hello()
        for tag in range(1, 6):  # DONE races the producer thread's return from send
            got = peer.pull("t", 0, 10, tag=tag)
            assert isinstance(got, torch.Tensor)
            peer.send(MsgType.DONE, transfer_id="t")
            wait_until(lambda: producer.holds.take_released() == {"req"}, what="release")
            producer.holds.add("t", "req", list(range(10)), LEASE_S)


def test_a_pull_queued_past_the_control_timeout_is_answered_busy_not_sent() -> None:
    control_s = 0.5
    with running_producer(control_timeout_s=control_s) as producer, peers(producer) as (peer,):
        producer.holds.add("t1", "req1", [1], LEASE_S)
        producer.holds.add("t2", "req2", [2], LEASE_S)
        peer.hello()
        kind, _ = peer.request(MsgType.PULL, peer_id=peer.peer_id, transfer_id="t1",
                               first_block=0, num_blocks=1, tag=1)
        assert kind is MsgType.SENDING
        peer.send(MsgType.PULL, peer_id=peer.peer_id, transfer_id="t2", first_block=0,
                  num_blocks=1, tag=2)  # queued behind t1's send
        time.sleep(2 * control_s)  # the peer would have given up on t2 by now
        buffer = torch.empty(producer.layout.bytes_per_block, dtype=torch.uint8)
        peer.link.recv(buffer, 1)
        assert torch.equal(buffer, expected_bytes(producer.caches, [1]))
        kind, msg = peer.receive()
        assert (kind, msg["code"], msg["transfer_id"]) == (MsgType.ERROR, ErrorCode.BUSY, "t2")
        wait_until(lambda: producer.holds.num_sending == 0, what="t1's send to end")
        assert torch.equal(peer.pull("t2", 0, 1, tag=3), expected_bytes(producer.caches, [2]))


class BrokenHoldTable(HoldTable):
    def start_send(self, transfer_id: str, first_block: int, num_blocks: int) -> list[int]:
        raise RuntimeError("a bug")


def test_a_bug_while_serving_a_pull_is_answered_counted_and_survived() -> None:
    with running_producer(BrokenHoldTable()) as producer, peers(producer) as (peer,):
        peer.hello()
        assert peer.pull("t", 0, 1, tag=1)["code"] is ErrorCode.LINK
        assert producer.endpoint.counts["num_internal_errors"] == 1
        assert peer.pull("t", 0, 1, tag=2)["code"] is ErrorCode.LINK  # pair again
        peer.link.close()
        peer.hello()
        assert peer.pull("t", 0, 1, tag=3)["code"] is ErrorCode.LINK
        assert producer.endpoint.is_alive()


# -- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [Codec(None), Codec(b"a wrong secret of 32 bytes......")],
                         ids=["unsigned", "wrong-secret"])
def test_a_peer_without_the_secret_gets_nothing_and_frees_nothing(codec: Codec) -> None:
    clock = FakeClock()
    holds = HoldTable(clock=clock)
    with running_producer(holds) as producer, peers(producer) as (good,), \
            peers(producer) as (bad,):
        holds.add("t", "req", [3, 8], 10.0)
        good.hello()
        layout = producer.layout.to_wire()
        for kind, fields in [
            (MsgType.HELLO, {"peer_id": "intruder", "layout": layout}),
            (MsgType.HELLO, {"peer_id": good.peer_id, "layout": layout}),
            (MsgType.DONE, {"transfer_id": "t"}),
            (MsgType.CLAIM, {"transfer_id": "t"}),
            (MsgType.PULL, {"peer_id": good.peer_id, "transfer_id": "t", "first_block": 0,
                            "num_blocks": 2, "tag": 5}),
        ]:
            bad.sock.send(codec.encode(kind, **fields))
            assert bad.sock.poll(5000)
            reply_kind, reply = Codec(None).decode(bad.sock.recv())  # reads, does not verify
            assert (reply_kind, reply["code"]) == (MsgType.ERROR, ErrorCode.AUTH), kind
        round_trip(good)
        assert producer.endpoint.counts["num_auth_failures"] == 5
        assert producer.endpoint.counts["num_bytes_sent"] == 0
        assert producer.endpoint.counts["num_links_opened"] == 1  # the good peer's only
        assert holds.take_released() == set()  # DONE refused
        assert torch.equal(good.pull("t", 0, 2, tag=6), expected_bytes(producer.caches, [3, 8]))
        wait_until(lambda: holds.num_sending == 0, what="the send's end")
        clock.advance(11.0)
        assert holds.take_released() == {"req"}  # CLAIM refused: the 10 s lease ran out


# -- one peer does not stall another -----------------------------------------------------------


def test_a_hello_that_never_joins_does_not_stall_other_peers() -> None:
    control_s = 2.0
    with running_producer(timeout_s=6.0, control_timeout_s=control_s) as producer, \
            peers(producer, 2) as (silent, good):
        producer.holds.add("t", "req", [1, 2], LEASE_S)
        silent.hello(join=False)  # its link's rendezvous now waits up to timeout_s
        started = time.monotonic()
        good.hello()
        got = good.pull("t", 0, 2, tag=3)
        elapsed = time.monotonic() - started
        assert torch.equal(got, expected_bytes(producer.caches, [1, 2]))
        assert elapsed < control_s, f"the good peer waited {elapsed:.2f} s"
        # The silent peer's link fails after timeout_s; its pulls then get a link error.
        wait_until(lambda: producer.endpoint.counts["num_link_failures"] == 1, 12.0,
                   what="the silent peer's link failure")
        assert silent.pull("t", 0, 1, tag=4)["code"] is ErrorCode.LINK


def test_too_many_peers_are_answered_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer_module, "MAX_PEERS", 2)
    with running_producer(timeout_s=2.0) as producer, peers(producer, 3) as trio:
        trio[0].hello(join=False)
        trio[1].hello(join=False)
        kind, msg = trio[2].request(MsgType.HELLO, peer_id=trio[2].peer_id,
                                    layout=producer.layout.to_wire())
        assert (kind, msg["code"]) == (MsgType.ERROR, ErrorCode.BUSY)
        assert producer.endpoint.counts["num_busy"] == 1
        # Once the two rendezvous time out and are reaped, a HELLO is welcome again.
        wait_until(lambda: trio[2].request(MsgType.HELLO, peer_id=trio[2].peer_id,
                                           layout=producer.layout.to_wire())[0]
                   is MsgType.WELCOME, 10.0, interval_s=0.3, what="room for a peer")


def test_layout_mismatch_is_refused() -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        kind, msg = peer.request(MsgType.HELLO, peer_id=peer.peer_id,
                                 layout={"block_size": 999, "layers": []})
        assert (kind, msg["code"]) == (MsgType.ERROR, ErrorCode.LAYOUT)
        assert producer.endpoint.counts["num_layout_mismatches"] == 1


# -- links expire --------------------------------------------------------------------------------


def _group_keys(peer: RawPeer) -> list[str]:
    return [k for k in peer.store.list_keys() if peer.group in k]


def test_an_idle_link_expires_and_its_store_keys_are_deleted() -> None:
    with running_producer(link_idle_s=0.5) as producer, peers(producer) as (peer,):
        producer.holds.add("t", "req", [1], LEASE_S)
        peer.hello()
        assert _group_keys(peer)  # the rendezvous keys exist while the link does
        assert isinstance(peer.pull("t", 0, 1, tag=1), torch.Tensor)
        wait_until(lambda: producer.endpoint.counts["num_links_closed"] == 1, 5.0,
                   what="idle link closed")
        wait_until(lambda: not _group_keys(peer), 5.0, what="store keys deleted")
        assert peer.pull("t", 0, 1, tag=2)["code"] is ErrorCode.LINK
        peer.link.close()
        peer.hello()  # pairs again
        producer.holds.add("t2", "req2", [6], LEASE_S)
        assert torch.equal(peer.pull("t2", 0, 1, tag=3), expected_bytes(producer.caches, [6]))


def test_a_failed_send_drops_the_link_and_the_hold_goes_back_to_held() -> None:
    with running_producer(timeout_s=1.5) as producer, peers(producer) as (peer,):
        producer.holds.add("t", "req", [4, 5], LEASE_S)
        peer.hello()
        kind, msg = peer.request(MsgType.PULL, peer_id=peer.peer_id, transfer_id="t",
                                 first_block=0, num_blocks=2, tag=11)
        assert kind is MsgType.SENDING  # ... and the peer never receives
        assert producer.holds.num_sending == 1
        wait_until(lambda: producer.endpoint.counts["num_failed_sends"] == 1, 6.0,
                   what="the send's deadline")
        wait_until(lambda: producer.holds.num_sending == 0, 2.0, what="hold back to HELD")
        wait_until(lambda: not _group_keys(peer), 5.0, what="store keys deleted")
        assert peer.pull("t", 0, 2, tag=12)["code"] is ErrorCode.LINK
        peer.link.close()
        peer.hello()
        assert torch.equal(peer.pull("t", 0, 2, tag=13), expected_bytes(producer.caches, [4, 5]))


# -- malformed traffic ---------------------------------------------------------------------------


def test_bad_frames_are_counted_answered_and_survived() -> None:
    with running_producer() as producer, peers(producer) as (peer,):
        ctx = zmq.Context.instance()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://{HOST}:{producer.address[1]}")
        req.send(b"hello?")  # a plain REQ client: [identity, "", payload]
        assert req.poll(5000)
        assert Codec(None).decode(req.recv())[1]["code"] is ErrorCode.PROTOCOL
        req.close()
        bad = [[b"a", b"b"], [b"x"] * 50, [b"\xc1"], [msgpack.packb({"v": 1, "type": "done"})],
               [signed_raw(v=PROTOCOL_VERSION, type="pong")],
               [signed_raw(v=PROTOCOL_VERSION, type="sending", transfer_id="t", num_bytes=1,
                           tag=1)]]
        for frames in bad:
            peer.sock.send_multipart(frames)
            kind, msg = peer.receive()
            assert (kind, msg["code"]) == (MsgType.ERROR, ErrorCode.PROTOCOL), frames[:1]
        peer.sock.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))  # ZMQ drops this peer's connection
        assert not peer.sock.poll(300)
        assert producer.endpoint.counts["num_protocol_errors"] == len(bad) + 1
        assert producer.endpoint.is_alive()
        producer.holds.add("t", "req", [2], LEASE_S)
        peer.hello()  # the DEALER reconnected by itself
        assert isinstance(peer.pull("t", 0, 1, tag=1), torch.Tensor)


# -- release.py ------------------------------------------------------------------------------------


def test_release_transfer_signs_and_reaches_every_worker() -> None:
    # The two workers bind two loopback addresses, as two PP stages on two nodes would.
    with running_producer() as w0, running_producer(host=OTHER_HOST) as w1:
        for worker in (w0, w1):
            worker.holds.add("t", f"req-{worker.address[1]}", [1], LEASE_S)
        params = {"transfer_id": "t", "remote_addresses": [list(w0.address), list(w1.address)]}
        assert release_transfer(params, Codec(None)) is True  # unsigned: refused
        wait_until(lambda: w1.endpoint.counts["num_auth_failures"] == 1, what="refusal")
        assert w0.holds.take_released() == set() and w1.holds.take_released() == set()
        assert release_transfer(params, CODEC) is True
        for worker in (w0, w1):
            wait_until(lambda w=worker: w.holds.take_released() == {f"req-{w.address[1]}"},
                       what="release of every worker")


def test_release_transfer_of_a_batch_releases_every_prompts_transfer() -> None:
    with running_producer() as w0, running_producer(host=OTHER_HOST) as w1:
        w0.holds.add("t0", "req-0", [1], LEASE_S)
        w1.holds.add("t1", "req-1", [1], LEASE_S)
        params = batch_params([
            {"transfer_id": "t0", "remote_addresses": [list(w0.address)]},
            {"transfer_id": "t1", "remote_addresses": [list(w1.address)]}])
        assert release_transfer(params, CODEC) is True
        for worker, request in ((w0, "req-0"), (w1, "req-1")):
            wait_until(lambda w=worker, r=request: w.holds.take_released() == {r},
                       what="release of each prompt's transfer")


class ClaimRecordingHoldTable(HoldTable):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.claimed: list[str] = []

    def claim(self, transfer_id: str, lease_s: float) -> bool:
        held = super().claim(transfer_id, lease_s)
        self.claimed.append(transfer_id)
        return held


def test_claim_transfer_extends_every_workers_lease() -> None:
    clock = FakeClock()
    tables = [ClaimRecordingHoldTable(clock), ClaimRecordingHoldTable(clock)]
    with running_producer(tables[0], claim_lease_s=300.0) as w0, \
            running_producer(tables[1], host=OTHER_HOST, claim_lease_s=300.0) as w1:
        for table in tables:
            table.add("t", "req", [1], 10.0)
        params = {"transfer_id": "t", "remote_addresses": [list(w0.address), list(w1.address)]}
        assert claim_transfer(params, Codec(None)) is True  # unsigned: refused
        assert claim_transfer(params, CODEC) is True
        wait_until(lambda: all(t.claimed == ["t"] for t in tables), what="claims")
        clock.advance(100.0)
        assert [t.take_released() for t in tables] == [set(), set()]
        clock.advance(201.0)
        assert [t.take_released() for t in tables] == [{"req"}, {"req"}]
        for worker in (w0, w1):
            wait_until(lambda w=worker: w.endpoint.counts["num_auth_failures"] == 1,
                       what="the unsigned CLAIM refused")


@pytest.mark.parametrize("params", [
    {"transfer_id": "t", "remote_host": HOST, "remote_ports": [5000]},  # version 2's form
    {"transfer_id": "t", "remote_addresses": []},
    {"transfer_id": "t", "remote_addresses": [[HOST, True]]},
    {"transfer_id": "t", "remote_addresses": [["", 5000]]},
    {"transfer_id": "t", "remote_addresses": [HOST, 5000]},
    {"transfer_id": 3, "remote_addresses": [[HOST, 5000]]},
    {"transfer_id": "t"},
    {"do_remote_prefill": True, "batch": "t"},
    {"do_remote_prefill": True, "batch": [[HOST, 5000]]},
    {"do_remote_prefill": True, "batch": [{"transfer_id": "t"}]},
])
def test_release_transfer_refuses_bad_parameters(params: dict) -> None:
    assert release_transfer(params, CODEC) is False


# -- shutdown ------------------------------------------------------------------------------------


def test_close_joins_every_thread() -> None:
    before = set(kv_threads())
    with running_producer(timeout_s=2.0) as producer, peers(producer, 2) as (a, b):
        a.hello()
        b.hello(join=False)
        wait_until(lambda: len(kv_threads()) == len(before) + 3, what="a thread per peer")
    assert set(kv_threads()) <= before
    assert not producer.endpoint.is_alive()


# -- direct reads ------------------------------------------------------------------------------


def test_a_peer_that_reads_gets_block_ids_and_a_read_without_done_expires() -> None:
    """A HELLO with a pid is answered with where the cache is, and no link is built. A PULL is
    answered by SENDING with the block ids; the blocks stay in flight (the lease cannot free
    them) until the peer's DONE, or the deadline: then the read counts as a failed send and the
    hold can be pulled again. A HELLO without a pid still gets a link."""
    from kvtransfer.protocol import unpack_block_ids

    with running_producer(timeout_s=0.5, direct_reads=True) as producer, \
            peers(producer, 2) as (reader, linked):
        producer.holds.add("t", "req", [4, 1, 7], LEASE_S)
        kind, welcome = reader.request(MsgType.HELLO, peer_id=reader.peer_id,
                                       layout=reader.layout.to_wire(), pid=12345)
        assert kind is MsgType.WELCOME
        offer = welcome["reads"]
        assert offer["pid"] == producer.endpoint._read_offer["pid"]
        assert offer["timeout_ms"] == 500  # the producer's timeout_s: reads end before it
        assert [stride for _, stride in offer["layers"]] == \
            [ly.bytes_per_block for ly in producer.layout.layers]
        assert offer["layers"][0][0] == producer.caches[sorted(producer.caches)[0]].data_ptr()
        kind, sending = reader.request(MsgType.PULL, peer_id=reader.peer_id, transfer_id="t",
                                       first_block=1, num_blocks=2, tag=9)
        assert kind is MsgType.SENDING and sending["tag"] == 9
        assert unpack_block_ids(sending["block_ids"]) == [1, 7]
        assert sending["num_bytes"] == 2 * producer.layout.bytes_per_block
        assert producer.holds.num_sending == 1
        wait_until(lambda: producer.holds.num_sending == 0, 5.0, what="the read's deadline")
        assert producer.endpoint.counts["num_failed_sends"] == 1
        assert producer.endpoint.counts["num_bytes_sent"] == 0
        # The hold is pullable again; this time the DONE ends the read and releases it.
        kind, sending = reader.request(MsgType.PULL, peer_id=reader.peer_id, transfer_id="t",
                                       first_block=0, num_blocks=3, tag=10)
        assert kind is MsgType.SENDING
        reader.send(MsgType.DONE, transfer_id="t", peer_id=reader.peer_id, pullers=1)
        wait_until(lambda: producer.holds.take_released() == {"req"}, 5.0, what="release")
        assert producer.endpoint.counts["num_bytes_sent"] == 3 * producer.layout.bytes_per_block
        assert "reads" not in linked.hello()  # no pid: a link, as before
        producer.holds.add("t2", "req2", [2], LEASE_S)
        got = linked.pull("t2", 0, 1, tag=3)
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got, expected_bytes(producer.caches, [2]))


def test_a_failed_read_releases_the_hold_and_counts_no_bytes() -> None:
    """A peer whose read failed says so in its DONE: the blocks are freed, and the bytes it
    never got are not counted as sent (a DONE without ``failed`` counts them, above)."""
    with running_producer(timeout_s=5.0, direct_reads=True) as producer, \
            peers(producer) as (reader,):
        producer.holds.add("t", "req", [4, 1], LEASE_S)
        kind, _ = reader.request(MsgType.HELLO, peer_id=reader.peer_id,
                                 layout=reader.layout.to_wire(), pid=12345)
        assert kind is MsgType.WELCOME
        kind, _ = reader.request(MsgType.PULL, peer_id=reader.peer_id, transfer_id="t",
                                 first_block=0, num_blocks=2, tag=4)
        assert kind is MsgType.SENDING and producer.holds.num_sending == 1
        reader.send(MsgType.DONE, transfer_id="t", peer_id=reader.peer_id, pullers=1,
                    failed=True)
        wait_until(lambda: producer.holds.take_released() == {"req"}, 5.0, what="release")
        assert producer.holds.num_sending == 0
        assert producer.endpoint.counts["num_bytes_sent"] == 0


def test_a_producer_without_direct_reads_ignores_the_offer() -> None:
    with running_producer(timeout_s=1.0) as producer, peers(producer) as (peer,):
        kind, welcome = peer.request(MsgType.HELLO, peer_id=peer.peer_id,
                                     layout=peer.layout.to_wire(), pid=12345)
        assert kind is MsgType.WELCOME and "reads" not in welcome
