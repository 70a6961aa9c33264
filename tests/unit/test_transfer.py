"""KV transfer end to end in one process: the Gloo link, then producer and consumer endpoints
over real ZMQ sockets and a real TCPStore on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.distributed as dist

from kvtransfer.blocks import KVLayout
from kvtransfer.consumer import ConsumerEndpoint, LoadResults, Place
from kvtransfer.holds import HoldError, HoldTable
from kvtransfer.link import DECODE_RANK, PREFILL_RANK, TorchDistLink, backend_for
from kvtransfer.metadata import LoadSpec
from kvtransfer.producer import ProducerEndpoint
from tests.helpers import BLOCK_SIZE, block_of, make_kv_caches, wait_until

HOST = "127.0.0.1"
NUM_BLOCKS = 10
TIMEOUT_S = 10.0
LEASE_S = 60.0


def run_pair(target_a: Callable[[], object], target_b: Callable[[], object]) -> list[object]:
    """Run two callables in two threads; return their results, re-raising the first error."""
    results: list[object] = [None, None]
    errors: list[BaseException] = []

    def wrap(i: int, fn: Callable[[], object]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i, fn), daemon=True)
               for i, fn in enumerate((target_a, target_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a link end hung"
    if errors:
        raise errors[0]
    return results


# -- the link --------------------------------------------------------------------------------


def test_backend_follows_the_cache_device() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"


@pytest.mark.parametrize("num_bytes", [1, 4093, 1 << 20])
def test_gloo_link_delivers_identical_bytes(num_bytes: int) -> None:
    master = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore(HOST, master.port, is_master=False,
                           timeout=datetime.timedelta(seconds=TIMEOUT_S))
    group = f"test/{uuid.uuid4().hex}"
    payload = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(num_bytes))
    expected = payload.clone()
    received = torch.zeros(num_bytes, dtype=torch.uint8)
    cpu = torch.device("cpu")

    def sender() -> None:
        link = TorchDistLink(master, group, PREFILL_RANK, cpu, HOST, TIMEOUT_S)
        link.send(payload, 7)
        link.close()

    def receiver() -> None:
        link = TorchDistLink(client, group, DECODE_RANK, cpu, HOST, TIMEOUT_S)
        link.recv(received, 7)
        link.close()

    run_pair(sender, receiver)
    assert torch.equal(received, expected)
    assert torch.equal(payload, expected)  # the sender's buffer is untouched


# -- the endpoints ---------------------------------------------------------------------------


class CountingHoldTable(HoldTable):
    """A HoldTable that counts the pulls it refused."""

    def __init__(self) -> None:
        super().__init__()
        self.num_refused = 0

    def start_send(self, transfer_id: str, first_block: int, num_blocks: int,
                   puller: str = "") -> list[int]:
        try:
            return super().start_send(transfer_id, first_block, num_blocks, puller)
        except HoldError:
            self.num_refused += 1
            raise


@dataclasses.dataclass
class ProducerSide:
    endpoint: ProducerEndpoint
    caches: dict[str, torch.Tensor]
    layout: KVLayout
    holds: CountingHoldTable
    port: int


@pytest.fixture
def producer() -> Iterator[ProducerSide]:
    caches = make_kv_caches("cpu", NUM_BLOCKS, seed=11)
    layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
    holds = CountingHoldTable()
    endpoint = ProducerEndpoint(HOST, 0, caches, layout, holds, TIMEOUT_S)  # binds a free port
    yield ProducerSide(endpoint, caches, layout, holds, endpoint.address[1])
    endpoint.close()


@dataclasses.dataclass
class ConsumerSide:
    endpoint: ConsumerEndpoint
    caches: dict[str, torch.Tensor]
    layout: KVLayout


@pytest.fixture
def make_consumer(producer: ProducerSide) -> Iterator[Callable[..., ConsumerSide]]:
    made: list[ConsumerEndpoint] = []

    def make(block_size: int = BLOCK_SIZE, unknown_retry_s: float = 2.0) -> ConsumerSide:
        caches = make_kv_caches("cpu", NUM_BLOCKS, block_size=block_size, fill="zeros")
        layout = KVLayout.from_caches(caches, NUM_BLOCKS, block_size)
        endpoint = ConsumerEndpoint(HOST, 0, caches, layout, TIMEOUT_S, unknown_retry_s)
        made.append(endpoint)
        return ConsumerSide(endpoint, caches, layout)

    yield make
    for endpoint in made:
        endpoint.close()


def load_spec(
    producer: ProducerSide, transfer_id: str, request_id: str | None, first_block: int,
    local_block_ids: list[int],
) -> LoadSpec:
    return LoadSpec(transfer_id, request_id, [(HOST, producer.port)], first_block,
                    local_block_ids)


def wait_for_result(consumer: ConsumerEndpoint, *request_ids: str) -> LoadResults:
    """Collect results until all of ``request_ids`` have finished; merge what came meanwhile."""
    merged = LoadResults()

    def finished() -> bool:
        got = consumer.take_results()
        merged.finished |= got.finished
        merged.failed |= got.failed
        merged.failed_block_ids |= got.failed_block_ids
        return merged.finished >= set(request_ids)

    wait_until(finished, TIMEOUT_S, what=f"load of {request_ids}")
    return merged


def wait_for_release(holds: HoldTable, *request_ids: str) -> set[str]:
    """Collect released engine request ids until all of ``request_ids`` are among them."""
    released: set[str] = set()

    def done() -> bool:
        released.update(holds.take_released())
        return released >= set(request_ids)

    wait_until(done, TIMEOUT_S, what=f"release of {request_ids}")
    return released


def assert_blocks_copied(
    producer: ProducerSide, consumer: ConsumerSide, pairs: list[tuple[int, int]]
) -> None:
    """Each (source, target) block is equal on both sides; every other target block is zero."""
    targets = {t for _, t in pairs}
    for name, src in producer.caches.items():
        dst = consumer.caches[name]
        for s, t in pairs:
            assert torch.equal(block_of(dst, "cpu", t), block_of(src, "cpu", s)), (name, s, t)
        for b in set(range(NUM_BLOCKS)) - targets:
            assert not torch.any(block_of(dst, "cpu", b)), (name, b)


def test_load_copies_held_blocks(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer()
    remote, local = [7, 2, 9, 4], [0, 5, 8, 3]
    producer.holds.add("t-1", "engine-req-1", remote, LEASE_S)
    consumer.endpoint.submit(load_spec(producer, "t-1", "req-1", 0, local))

    results = wait_for_result(consumer.endpoint, "req-1")
    assert results.failed == set()
    assert results.failed_block_ids == set()
    assert_blocks_copied(producer, consumer, list(zip(remote, local, strict=True)))
    assert wait_for_release(producer.holds, "engine-req-1") == {"engine-req-1"}
    assert len(producer.holds) == 0

    num_bytes = 4 * producer.layout.bytes_per_block
    assert num_bytes == 4 * 2 * (2 * 2 * BLOCK_SIZE * 8 * 4)  # 4 blocks x 2 layers x float32
    assert producer.endpoint.counts["num_bytes_sent"] == num_bytes
    assert consumer.endpoint.counts["num_bytes_received"] == num_bytes
    assert consumer.endpoint.counts["num_loads"] == 1
    assert consumer.endpoint.counts["num_failed_loads"] == 0


def test_load_of_a_subset_from_first_block(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer()
    remote = [6, 1, 3, 8, 5]
    producer.holds.add("t-2", "engine-req-2", remote, LEASE_S)
    # The first two blocks are cached on the decode side: pull remote[2:4] into local [9, 4].
    consumer.endpoint.submit(load_spec(producer, "t-2", "req-2", 2, [9, 4]))

    results = wait_for_result(consumer.endpoint, "req-2")
    assert results.failed == set()
    assert_blocks_copied(producer, consumer, [(3, 9), (8, 4)])
    wait_for_release(producer.holds, "engine-req-2")
    num_bytes = 2 * producer.layout.bytes_per_block
    assert producer.endpoint.counts["num_bytes_sent"] == num_bytes
    assert consumer.endpoint.counts["num_bytes_received"] == num_bytes


def test_two_loads_over_one_pair(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer()
    producer.holds.add("t-a", "engine-a", [1, 2], LEASE_S)
    producer.holds.add("t-b", "engine-b", [8], LEASE_S)
    consumer.endpoint.submit(load_spec(producer, "t-a", "req-a", 0, [4, 5]))
    consumer.endpoint.submit(load_spec(producer, "t-b", "req-b", 0, [0]))

    results = wait_for_result(consumer.endpoint, "req-a", "req-b")
    assert results.finished == {"req-a", "req-b"}
    assert results.failed == set()
    assert_blocks_copied(producer, consumer, [(1, 4), (2, 5), (8, 0)])
    assert wait_for_release(producer.holds, "engine-a", "engine-b") == {"engine-a", "engine-b"}
    assert consumer.endpoint.counts["num_bytes_received"] == 3 * producer.layout.bytes_per_block
    samples = consumer.endpoint.take_samples()
    assert sorted(samples["num_blocks_per_transfer"]) == [1, 2]
    assert len(samples["xfer_time_seconds"]) == 2
    assert all(0 < s < 10 for s in samples["xfer_time_seconds"])
    assert len(samples["pull_wait_seconds"]) == 2
    assert all(0 < w <= s for w, s in zip(sorted(samples["pull_wait_seconds"]),
                                          sorted(samples["xfer_time_seconds"]), strict=True))
    assert consumer.endpoint.take_samples() == {"xfer_time_seconds": [], "pull_wait_seconds": [],
                                                "num_blocks_per_transfer": []}


def test_unknown_transfer_fails_after_retrying(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer(unknown_retry_s=0.3)
    consumer.endpoint.submit(load_spec(producer, "never-held", "req-x", 0, [2, 6]))

    results = wait_for_result(consumer.endpoint, "req-x")
    assert results.failed == {"req-x"}
    assert results.failed_block_ids == {2, 6}
    assert consumer.endpoint.counts["num_failed_loads"] == 1
    assert consumer.endpoint.counts["num_bytes_received"] == 0
    assert consumer.endpoint.take_samples()["xfer_time_seconds"] == []  # failures: no sample
    for tensor in consumer.caches.values():
        assert not torch.any(tensor)


def test_hold_registered_late_is_still_pulled(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer(unknown_retry_s=5.0)
    consumer.endpoint.submit(load_spec(producer, "t-late", "req-late", 0, [3]))
    # The decode side asks before the prefill side registers the hold (one engine step later).
    wait_until(lambda: producer.holds.num_refused >= 2, TIMEOUT_S, what="refused pulls")
    producer.holds.add("t-late", "engine-late", [7], LEASE_S)

    results = wait_for_result(consumer.endpoint, "req-late")
    assert results.failed == set()
    assert_blocks_copied(producer, consumer, [(7, 3)])


def test_release_only_spec_frees_the_hold_without_data(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer()
    producer.holds.add("t-r", "engine-req-r", [1, 2, 3], LEASE_S)
    consumer.endpoint.submit(load_spec(producer, "t-r", None, 0, []))

    assert wait_for_release(producer.holds, "engine-req-r") == {"engine-req-r"}
    assert len(producer.holds) == 0
    assert producer.endpoint.counts["num_bytes_sent"] == 0
    assert consumer.endpoint.counts["num_bytes_received"] == 0
    results = consumer.endpoint.take_results()
    assert results.finished == set() and results.failed == set()
    for tensor in consumer.caches.values():
        assert not torch.any(tensor)


def test_consumer_with_another_layout_is_refused(
    producer: ProducerSide, make_consumer: Callable[..., ConsumerSide]
) -> None:
    consumer = make_consumer(block_size=2 * BLOCK_SIZE)
    producer.holds.add("t-m", "engine-req-m", [1, 2], LEASE_S)
    consumer.endpoint.submit(load_spec(producer, "t-m", "req-m", 0, [4, 5]))

    results = wait_for_result(consumer.endpoint, "req-m")
    assert results.failed == {"req-m"}
    assert results.failed_block_ids == {4, 5}
    for tensor in consumer.caches.values():
        assert not torch.any(tensor)
    assert producer.endpoint.counts["num_bytes_sent"] == 0
    # The request recomputes its prompt, so the failed load frees the hold at once (DONE).
    assert wait_for_release(producer.holds, "engine-req-m") == {"engine-req-m"}


# -- workers of one engine on several nodes ------------------------------------------------------


def test_each_decode_worker_pulls_from_its_counterpart_at_its_own_address() -> None:
    """A PP=2 prefill engine with one stage per node: its two workers bind two hosts (two
    loopback addresses here) and hold different layers' data under the same block ids. Decode
    worker i, bound on its own host, pulls exactly prefill worker i's blocks."""
    prefill_hosts, decode_hosts = ["127.0.0.1", "127.0.0.2"], ["127.0.0.3", "127.0.0.4"]
    remote, local = [7, 2, 9], [0, 5, 8]
    producers, consumers = [], []
    try:
        for i, host in enumerate(prefill_hosts):
            caches = make_kv_caches("cpu", NUM_BLOCKS, seed=20 + i)  # each stage's own data
            layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
            holds = CountingHoldTable()
            holds.add("t-pp", f"engine-req-{i}", remote, LEASE_S)
            endpoint = ProducerEndpoint(host, 0, caches, layout, holds, TIMEOUT_S)
            producers.append(ProducerSide(endpoint, caches, layout, holds, endpoint.address[1]))
        addresses = [p.endpoint.address for p in producers]
        assert [host for host, _ in addresses] == prefill_hosts
        for i, host in enumerate(decode_hosts):
            caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
            layout = KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE)
            endpoint = ConsumerEndpoint(host, i, caches, layout, TIMEOUT_S, 2.0, num_workers=2)
            consumers.append(ConsumerSide(endpoint, caches, layout))
            endpoint.submit(LoadSpec("t-pp", "req-pp", addresses, 0, local))

        for i, (producer, consumer) in enumerate(zip(producers, consumers, strict=True)):
            assert wait_for_result(consumer.endpoint, "req-pp").failed == set()
            assert_blocks_copied(producer, consumer, list(zip(remote, local, strict=True)))
            assert wait_for_release(producer.holds, f"engine-req-{i}") == {f"engine-req-{i}"}
            num_bytes = len(remote) * producer.layout.bytes_per_block
            assert producer.endpoint.counts["num_bytes_sent"] == num_bytes
    finally:
        for side in consumers + producers:
            side.endpoint.close()


# -- different TP sizes: heads from several prefill workers, or for several decode workers -------


def heads_caches(caches: dict[str, torch.Tensor], first: int,
                 count: int) -> dict[str, torch.Tensor]:
    """What a TP rank holding heads [first, first + count) of ``caches`` (CPU layout) holds."""
    return {name: t[:, first:first + count].clone() for name, t in caches.items()}


def head_layout(caches: dict[str, torch.Tensor]) -> KVLayout:
    num_heads = next(iter(caches.values())).shape[1]
    return KVLayout.from_caches(caches, NUM_BLOCKS, BLOCK_SIZE, num_heads=num_heads)


def test_a_decode_worker_pulls_its_heads_from_two_prefill_workers() -> None:
    """Prefill TP 2, decode TP 1: each prefill worker holds one of the two heads; the decode
    worker's blocks end up equal to the whole model's, head for head, and each prefill worker
    sent exactly its head's bytes."""
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=31)  # 2 heads
    remote, local = [7, 2, 9], [0, 5, 8]
    producers = []
    consumer = None
    try:
        for rank in range(2):
            caches = heads_caches(whole, rank, 1)
            holds = CountingHoldTable()
            holds.add("t-in", f"engine-req-{rank}", remote, LEASE_S)
            endpoint = ProducerEndpoint(HOST, 0, caches, head_layout(caches), holds, TIMEOUT_S)
            producers.append(ProducerSide(endpoint, caches, head_layout(caches), holds,
                                          endpoint.address[1]))
        caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
        consumer = ConsumerEndpoint(HOST, 0, caches, head_layout(caches), TIMEOUT_S, 2.0,
                                    place=Place(0, 1, 0, num_kv_heads=2))
        addresses = [p.endpoint.address for p in producers]
        consumer.submit(LoadSpec("t-in", "req-in", addresses, 0, local, remote_tp_size=2))
        assert wait_for_result(consumer, "req-in").failed == set()
        for name, tensor in whole.items():
            for s, t in zip(remote, local, strict=True):
                assert torch.equal(caches[name][t], tensor[s]), (name, s, t)
        for rank, producer in enumerate(producers):
            assert wait_for_release(producer.holds, f"engine-req-{rank}")
            assert producer.endpoint.counts["num_bytes_sent"] == \
                len(remote) * producer.layout.bytes_per_block  # one head of each block
        assert consumer.counts["num_bytes_received"] == len(remote) * head_layout(
            caches).bytes_per_block
        assert consumer.counts["num_loads"] == 1
    finally:
        for endpoint in [p.endpoint for p in producers] + [consumer]:
            if endpoint is not None:
                endpoint.close()


@pytest.mark.parametrize("reads", [False, True], ids=["link", "direct-reads"])
def test_two_decode_workers_pull_one_head_each_and_the_hold_waits_for_both(reads: bool) -> None:
    """Prefill TP 1, decode TP 2: the prefill worker's hold is released only when both decode
    workers said DONE, and each got its own head (not the other's), over a link or read."""
    from kvtransfer.reads import CacheRegions

    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=41)
    remote, local = [3, 6], [1, 4]
    holds = CountingHoldTable()
    holds.add("t-out", "engine-req", remote, LEASE_S)
    producer = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, TIMEOUT_S,
                                direct_reads=reads)
    consumers: list[ConsumerEndpoint] = []
    try:
        for rank in range(2):
            caches = make_kv_caches("cpu", NUM_BLOCKS, num_heads=1, fill="zeros")
            layout = head_layout(caches)
            endpoint = ConsumerEndpoint(HOST, rank, caches, layout, TIMEOUT_S, 2.0,
                                        place=Place(rank, 2, 0, num_kv_heads=2),
                                        regions=CacheRegions.of(caches, layout) if reads
                                        else None)
            consumers.append(endpoint)
            endpoint.submit(LoadSpec("t-out", "req-out", [producer.address], 0, local,
                                     remote_tp_size=1))
            assert wait_for_result(endpoint, "req-out").failed == set()
            for name, tensor in whole.items():
                for s, t in zip(remote, local, strict=True):
                    assert torch.equal(caches[name][t, 0], tensor[s, rank]), (name, rank, s)
            if rank == 0:  # one of two pullers is done: still held
                time.sleep(0.2)
                assert holds.take_released() == set() and len(holds) == 1
        assert wait_for_release(holds, "engine-req") == {"engine-req"}
        assert producer.counts["num_bytes_sent"] == \
            len(remote) * head_layout(whole).bytes_per_block  # two halves, once each
        assert producer.counts["num_read_pairs"] == (2 if reads else 0)
    finally:
        for endpoint in [*consumers, producer]:
            endpoint.close()


def test_a_pull_of_heads_the_worker_lacks_fails_the_load_and_counts_as_done() -> None:
    """Decode workers that think the model has 4 KV heads (TP 2: heads 0-1 and 2-3) pull from a
    2-head prefill worker. Rank 1's pull of heads 2-3 is refused as out of range: its load fails
    (vLLM recomputes) and writes nothing, but its DONE counts, so once rank 0 has its heads the
    blocks are freed rather than held to the lease's end."""
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=43)
    holds = CountingHoldTable()
    holds.add("t-bad", "engine-req", [2], LEASE_S)
    producer = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, TIMEOUT_S)
    consumers = []
    try:
        for rank in (1, 0):
            caches = make_kv_caches("cpu", NUM_BLOCKS, num_heads=2, fill="zeros")
            consumer = ConsumerEndpoint(HOST, rank, caches, head_layout(caches), TIMEOUT_S, 2.0,
                                        place=Place(rank, 2, 0, num_kv_heads=4))
            consumers.append(consumer)
            consumer.submit(LoadSpec("t-bad", "req-bad", [producer.address], 0, [5],
                                     remote_tp_size=1))
            failed = wait_for_result(consumer, "req-bad").failed
            if rank == 1:
                assert failed == {"req-bad"}
                assert not any(torch.any(t) for t in caches.values())
                time.sleep(0.2)
                assert len(holds) == 1  # one of two pullers done
            else:
                assert failed == set()
                for name, tensor in whole.items():
                    assert torch.equal(caches[name][5], tensor[2])
        assert wait_for_release(holds, "engine-req") == {"engine-req"}
    finally:
        for endpoint in [*consumers, producer]:
            endpoint.close()


# -- the same endpoints over shared memory (same host, CPU caches) -------------------------------


def assert_equal_blocks(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor],
                        src_ids: list[int], dst_ids: list[int]) -> None:
    for name, tensor in src.items():
        for s, t in zip(src_ids, dst_ids, strict=True):
            assert torch.equal(dst[name][t], tensor[s]), (name, s, t)


def whole_and_head_producers(seed: int, transfer: str, **options: object) -> tuple[
        dict[str, torch.Tensor], HoldTable, HoldTable, ProducerEndpoint, ProducerEndpoint]:
    """A prefill worker holding a whole 2-head cache (``transfer``: blocks 7, 2, 9 for engine
    request 1; ``transfer``-head: block 4 for request 2) and a TP-2 rank holding its head 1
    (``transfer``-head: block 4 for request 3), both serving with ``options``."""
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=seed)
    holds = CountingHoldTable()
    holds.add(transfer, "engine-1", [7, 2, 9], LEASE_S)
    holds.add(f"{transfer}-head", "engine-2", [4], LEASE_S)
    one_head = heads_caches(whole, 1, 1)
    head_holds = CountingHoldTable()
    head_holds.add(f"{transfer}-head", "engine-3", [4], LEASE_S)
    producer = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, TIMEOUT_S,
                                **options)
    head_producer = ProducerEndpoint(HOST, 0, one_head, head_layout(one_head), head_holds,
                                     TIMEOUT_S, **options)
    return whole, holds, head_holds, producer, head_producer


def test_pulls_over_shared_memory_copy_blocks_and_heads_and_leave_no_files() -> None:
    """With ``same_host_link`` both ends pick the shared-memory link: whole blocks, then one
    head into a 2-head decode cache (gathered into and scattered from shared memory), exact
    bytes, and no /dev/shm file left once the endpoints close."""
    from kvtransfer.link_shm import ShmLink, same_host_link, shm_files

    files_before = shm_files()
    whole, _, _, producer, head_producer = whole_and_head_producers(
        51, "t-shm", link_factory=same_host_link)
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    consumer = ConsumerEndpoint(HOST, 0, caches, head_layout(caches), TIMEOUT_S, 2.0,
                                link_factory=same_host_link)
    try:
        consumer.submit(LoadSpec("t-shm", "req-1", [producer.address], 0, [0, 5, 8]))
        assert wait_for_result(consumer, "req-1").failed == set()
        assert_equal_blocks(whole, caches, [7, 2, 9], [0, 5, 8])
        channel = next(iter(consumer._channels.values()))
        assert isinstance(channel._link, ShmLink)
        # Decode TP 1 with 2 heads, prefill TP 2: this part is head 1, from prefill rank 1.
        head_consumer = ConsumerEndpoint(HOST, 0, caches, head_layout(caches), TIMEOUT_S, 2.0,
                                         place=Place(0, 1, 0, num_kv_heads=2),
                                         link_factory=same_host_link)
        try:
            # Prefill rank 0 is the whole-cache producer (head 0 of block 4), rank 1 the other.
            head_consumer.submit(LoadSpec("t-shm-head", "req-2",
                                          [producer.address, head_producer.address], 0, [3],
                                          remote_tp_size=2))
            assert wait_for_result(head_consumer, "req-2").failed == set()
        finally:
            head_consumer.close()
        for name, tensor in whole.items():
            assert torch.equal(caches[name][3], tensor[4])  # head 0 from one, head 1 the other
        assert producer.counts["num_bytes_sent"] == \
            3 * head_layout(whole).bytes_per_block + head_layout(whole).nbytes(1, 1)
    finally:
        for endpoint in (consumer, producer, head_producer):
            endpoint.close()
    wait_until(lambda: shm_files() == files_before, 5.0, what="shared memory files removed")


def test_a_replicated_kv_cache_moves_whole_from_one_rank_and_the_other_is_released() -> None:
    """One KV head (or an MLA latent) on prefill TP 2: both ranks hold the same cache, whose
    head axis need not be known. The decode worker (TP 1) pulls whole blocks from rank 0 and
    releases rank 1's hold at once."""
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=61, num_heads=1)
    producers = []
    caches = make_kv_caches("cpu", NUM_BLOCKS, num_heads=1, fill="zeros")
    consumer = ConsumerEndpoint(HOST, 0, caches, KVLayout.from_caches(caches, NUM_BLOCKS,
                                                                      BLOCK_SIZE),
                                TIMEOUT_S, 2.0, place=Place(0, 1, 0, num_kv_heads=1))
    try:
        for rank in range(2):
            holds = CountingHoldTable()
            holds.add("t-rep", f"engine-{rank}", [6, 1], LEASE_S)
            layout = KVLayout.from_caches(whole, NUM_BLOCKS, BLOCK_SIZE)  # head axis unknown
            endpoint = ProducerEndpoint(HOST, 0, whole, layout, holds, TIMEOUT_S)
            producers.append(ProducerSide(endpoint, whole, layout, holds, endpoint.address[1]))
        consumer.submit(LoadSpec("t-rep", "req-rep", [p.endpoint.address for p in producers],
                                 0, [2, 3], remote_tp_size=2))
        assert wait_for_result(consumer, "req-rep").failed == set()
        for name, tensor in whole.items():
            assert torch.equal(caches[name][2], tensor[6])
            assert torch.equal(caches[name][3], tensor[1])
        for rank, producer in enumerate(producers):
            assert wait_for_release(producer.holds, f"engine-{rank}")
        sent = [p.endpoint.counts["num_bytes_sent"] for p in producers]
        assert sent == [2 * producers[0].layout.bytes_per_block, 0]
    finally:
        for endpoint in [consumer, *(p.endpoint for p in producers)]:
            endpoint.close()


# -- the same endpoints with direct reads (same host, CPU caches) --------------------------------


def reads_consumer(caches: dict[str, torch.Tensor], timeout_s: float = TIMEOUT_S,
                   **kwargs: object) -> ConsumerEndpoint:
    from kvtransfer.reads import CacheRegions

    layout = head_layout(caches)
    return ConsumerEndpoint(HOST, 0, caches, layout, timeout_s, 2.0,
                            regions=CacheRegions.of(caches, layout), **kwargs)


def test_direct_reads_copy_blocks_and_heads_without_a_link() -> None:
    """The decode worker offers to read, the prefill worker takes the offer: whole blocks, then
    one head of a TP-2 prefill worker into head 1 of a 2-head decode cache, exact bytes, no
    link on either side, and each hold released once its DONE came."""
    whole, holds, head_holds, producer, head_producer = whole_and_head_producers(
        71, "t-read", direct_reads=True)
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    consumer = reads_consumer(caches)
    head_consumer = reads_consumer(caches, place=Place(0, 1, 0, num_kv_heads=2))
    try:
        consumer.submit(LoadSpec("t-read", "req-1", [producer.address], 0, [0, 5, 8]))
        assert wait_for_result(consumer, "req-1").failed == set()
        assert_equal_blocks(whole, caches, [7, 2, 9], [0, 5, 8])
        channel = next(iter(consumer._channels.values()))
        assert channel._remote is not None and channel._link is None
        assert producer.counts["num_read_pairs"] == 1 and producer.counts["num_links_opened"] == 0
        assert consumer.counts["num_read_fallbacks"] == 0
        assert wait_for_release(holds, "engine-1") == {"engine-1"}
        # Prefill rank 0 (the whole cache) gives head 0 of block 4, rank 1 head 1.
        head_consumer.submit(LoadSpec("t-read-head", "req-2",
                                      [producer.address, head_producer.address], 0, [3],
                                      remote_tp_size=2))
        assert wait_for_result(head_consumer, "req-2").failed == set()
        for name, tensor in whole.items():
            assert torch.equal(caches[name][3], tensor[4])
            untouched = [b for b in range(NUM_BLOCKS) if b not in (0, 3, 5, 8)]
            assert not torch.any(caches[name][untouched])
        layout = head_layout(whole)
        assert producer.counts["num_bytes_sent"] == 3 * layout.bytes_per_block + \
            layout.nbytes(1, 1)
        assert head_producer.counts["num_bytes_sent"] == layout.nbytes(1, 1)
        assert wait_for_release(head_holds, "engine-3") == {"engine-3"}
        assert producer._reads == {} and holds.num_sending == 0
    finally:
        for endpoint in (consumer, head_consumer, producer, head_producer):
            endpoint.close()


def test_a_failed_probe_pairs_over_a_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode worker that cannot read the prefill worker (another host, a kernel that forbids
    it) says HELLO again without the offer and gets its blocks over a link."""
    from kvtransfer import consumer_peer

    monkeypatch.setattr(consumer_peer, "probe", lambda *args: "Operation not permitted")
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=72)
    holds = CountingHoldTable()
    holds.add("t-probe", "engine-1", [1, 6], LEASE_S)
    producer = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, TIMEOUT_S,
                                direct_reads=True)
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    consumer = reads_consumer(caches)
    try:
        consumer.submit(LoadSpec("t-probe", "req-1", [producer.address], 0, [2, 3]))
        assert wait_for_result(consumer, "req-1").failed == set()
        assert_equal_blocks(whole, caches, [1, 6], [2, 3])
        channel = next(iter(consumer._channels.values()))
        assert channel._remote is None and channel._link is not None
        assert consumer.counts["num_read_fallbacks"] == 1  # visible: exported as a metric
        assert producer.counts["num_links_opened"] == 1
    finally:
        consumer.close()
        producer.close()


def test_a_read_that_ends_after_its_deadline_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode worker keeps the bytes of a read only if it ended within the prefill worker's
    timeout of its PULL (after that the blocks may be freed; the prefill worker's timeout is
    the shorter here, 5 ms, and the read takes 50): the load fails, vLLM would recompute, and
    the hold is released all the same."""
    from kvtransfer import consumer_peer

    read_blocks = consumer_peer.read_blocks

    def slow_read(*args: object, **kwargs: object) -> int:
        time.sleep(0.05)
        return read_blocks(*args, **kwargs)

    monkeypatch.setattr(consumer_peer, "read_blocks", slow_read)
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=73)
    holds = CountingHoldTable()
    holds.add("t-late", "engine-1", [5], LEASE_S)
    producer = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, 0.005,
                                direct_reads=True)
    consumer = reads_consumer(make_kv_caches("cpu", NUM_BLOCKS, fill="zeros"))
    try:
        consumer.submit(LoadSpec("t-late", "req-1", [producer.address], 0, [0]))
        assert wait_for_result(consumer, "req-1").failed == {"req-1"}
        channel = next(iter(consumer._channels.values()))
        assert channel._read_timeout_s == 0.005
        assert wait_for_release(holds, "engine-1") == {"engine-1"}
        assert producer._reads == {} and holds.num_sending == 0
    finally:
        consumer.close()
        producer.close()


def test_a_long_transfer_is_read_in_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SENDING names at most MAX_READ_BLOCKS blocks (2 here): five blocks are read in three
    ranges of one send in flight, which the one DONE ends."""
    from kvtransfer import consumer_peer, producer

    monkeypatch.setattr(consumer_peer, "MAX_READ_BLOCKS", 2)
    monkeypatch.setattr(producer, "MAX_READ_BLOCKS", 2)
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=74)
    holds = CountingHoldTable()
    holds.add("t-long", "engine-1", [9, 3, 1, 6, 4], LEASE_S)
    endpoint = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, TIMEOUT_S,
                                direct_reads=True)
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    consumer = reads_consumer(caches)
    try:
        consumer.submit(LoadSpec("t-long", "req-1", [endpoint.address], 0, [0, 2, 5, 7, 8]))
        assert wait_for_result(consumer, "req-1").failed == set()
        assert_equal_blocks(whole, caches, [9, 3, 1, 6, 4], [0, 2, 5, 7, 8])
        assert wait_for_release(holds, "engine-1") == {"engine-1"}
        assert endpoint.counts["num_pulls"] == 3
        assert endpoint.counts["num_bytes_sent"] == 5 * head_layout(whole).bytes_per_block
        assert holds.num_refused == 0 and endpoint._reads == {}
    finally:
        consumer.close()
        endpoint.close()


@pytest.mark.parametrize("change", [
    {"nonce": b""},  # a read of 0 bytes succeeds whatever the pid: it would prove nothing
    {"timeout_ms": 0},  # every read would be refused
    {"num_blocks": 0},
    {"layers": "float"},
], ids=["empty-nonce", "no-time", "no-blocks", "float-address"])
def test_a_malformed_offer_is_refused_and_the_pair_takes_a_link(change: dict) -> None:
    whole = make_kv_caches("cpu", NUM_BLOCKS, seed=75)
    holds = CountingHoldTable()
    holds.add("t-offer", "engine-1", [8], LEASE_S)
    producer = ProducerEndpoint(HOST, 0, whole, head_layout(whole), holds, TIMEOUT_S,
                                direct_reads=True)
    offer = producer._read_offer
    assert offer is not None
    if "nonce" in change:
        offer["probe"] = [offer["probe"][0], change["nonce"]]
    elif change.get("layers") == "float":
        offer["layers"] = [[float(a), s] for a, s in offer["layers"]]
    else:
        offer.update(change)
    caches = make_kv_caches("cpu", NUM_BLOCKS, fill="zeros")
    consumer = reads_consumer(caches)
    try:
        consumer.submit(LoadSpec("t-offer", "req-1", [producer.address], 0, [1]))
        assert wait_for_result(consumer, "req-1").failed == set()
        assert_equal_blocks(whole, caches, [8], [1])
        assert consumer.counts["num_read_fallbacks"] == 1
        assert producer.counts["num_read_pairs"] == 0
    finally:
        consumer.close()
        producer.close()
