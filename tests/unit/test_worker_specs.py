"""PDWorker with real endpoints on 127.0.0.1: bad and duplicate specs fail only their request,
the bound port goes out as handshake metadata, health follows the threads."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from kvtransfer.connector import never_raises
from kvtransfer.metadata import HoldSpec, LoadSpec, PDConnectorMetadata, PDHandshake
from kvtransfer.scheduler import PDScheduler
from kvtransfer.settings import ConnectorSettings
from kvtransfer.worker import PDWorker
from tests.helpers import BLOCK_SIZE, make_kv_caches, wait_until

NUM_BLOCKS = 10


def make_worker(role: str, **settings: object) -> PDWorker:
    config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(is_kv_producer=role == "producer",
                                           is_kv_consumer=role == "consumer"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(block_size=BLOCK_SIZE),
    )
    return PDWorker(config, ConnectorSettings(host="127.0.0.1", **settings), NUM_BLOCKS)


@pytest.fixture
def producer_worker() -> Iterator[PDWorker]:
    worker = make_worker("producer")
    worker.register_kv_caches(make_kv_caches("cpu", NUM_BLOCKS), index=0)
    yield worker
    worker.shutdown()


@pytest.fixture
def consumer_worker() -> Iterator[PDWorker]:
    worker = make_worker("consumer")
    worker.register_kv_caches(make_kv_caches("cpu", NUM_BLOCKS, fill="zeros"), index=0)
    yield worker
    worker.shutdown()


def results(worker: PDWorker) -> KVConnectorTransferResults:
    return worker.transfer_results(KVConnectorTransferResults())


def test_duplicate_holds_never_raise_and_fail_only_the_second(producer_worker: PDWorker) -> None:
    meta = PDConnectorMetadata(holds=[HoldSpec("same", "req-1", [1, 2]),
                                      HoldSpec("same", "req-2", [3, 4])], lease_s=60)
    producer_worker.start(meta)  # used to raise "transfer ... is already held"
    assert results(producer_worker).finished_sending == {"req-2"}  # req-2's blocks freed
    assert len(producer_worker.holds) == 1
    assert producer_worker.take_stats().data["num_bad_specs"] == 1
    producer_worker.start(PDConnectorMetadata(holds=[HoldSpec("same", "req-3", [5])]))
    assert results(producer_worker).finished_sending == {"req-3"}
    assert producer_worker.health() is None


def test_a_load_on_a_producer_fails_that_request_only(producer_worker: PDWorker) -> None:
    load = LoadSpec("t", "dec-1", [("127.0.0.1", 1234)], 0, [7, 8])
    producer_worker.start(PDConnectorMetadata(loads=[load]))
    assert producer_worker.counts["num_bad_specs"] == 1


@pytest.mark.parametrize(
    "load",
    [LoadSpec("t", "dec-1", [], 0, [7, 8]),  # no address for worker 0
     LoadSpec("", "dec-1", [], 0, [7, 8]),  # the scheduler could not plan it
     LoadSpec("t", "dec-1", [("127.0.0.1", 1234)], 0, [])],  # a request with no blocks
    ids=["no-port", "unplanned", "no-blocks"],
)
def test_a_bad_load_is_reported_failed_with_its_blocks(consumer_worker: PDWorker,
                                                       load: LoadSpec) -> None:
    consumer_worker.start(PDConnectorMetadata(loads=[load]))
    got = results(consumer_worker)
    assert got.finished_recving == {"dec-1"} and got.failed_recving == {"dec-1"}
    assert consumer_worker.take_load_errors() == set(load.local_block_ids)
    assert consumer_worker.counts["num_bad_specs"] == 1
    assert consumer_worker.health() is None


def test_the_bound_address_reaches_the_scheduler_side(producer_worker: PDWorker) -> None:
    handshake = producer_worker.handshake()
    assert isinstance(handshake, PDHandshake)
    assert handshake.port == producer_worker.producer.address[1] > 0
    scheduler = PDScheduler(SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        kv_transfer_config=SimpleNamespace(is_kv_producer=True, is_kv_consumer=False)),
        ConnectorSettings(port=0))
    scheduler.set_handshake({(0, 0): handshake})
    assert scheduler.remote_addresses == [producer_worker.producer.address]


def test_a_consumer_reports_no_handshake_and_health_follows_close(
    consumer_worker: PDWorker,
) -> None:
    assert consumer_worker.handshake() is None
    assert consumer_worker.health() is None
    consumer_worker.consumer.close()
    assert "closed" in consumer_worker.health()


def test_producer_health_follows_its_thread(producer_worker: PDWorker) -> None:
    assert producer_worker.health() is None
    producer_worker.producer.close()
    wait_until(lambda: producer_worker.health() is not None, 5, what="unhealthy")


def test_never_raises_counts_logs_once_and_returns_the_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Hooks:
        num_hook_errors = 0
        _failed_hooks: set[str] = set()

        @never_raises(lambda: (0, False))
        def get_num_new_matched_tokens(self) -> tuple[int, bool]:
            raise KeyError("boom")

    hooks = Hooks()
    assert hooks.get_num_new_matched_tokens() == (0, False)
    assert hooks.get_num_new_matched_tokens() == (0, False)
    assert hooks.num_hook_errors == 2
    assert sum("get_num_new_matched_tokens failed" in r.message for r in caplog.records) == 1


def test_stats_sum_counters_but_keep_the_newest_gauge() -> None:
    from kvtransfer.stats import TransferStats, is_gauge

    step1 = TransferStats.from_counts({"num_loads": 2, "num_held_blocks": 7})
    step2 = TransferStats.from_counts({"num_loads": 1})  # the gauge did not change
    step3 = TransferStats.from_counts({"num_loads": 1, "num_held_blocks": 3})
    total = step1.aggregate(step2)
    assert total.data["num_loads"] == 3 and total.data["num_held_blocks"] == 7
    total = total.aggregate(step3)
    assert total.reduce()["num_loads"] == 4 and total.reduce()["num_held_blocks"] == 3
    assert is_gauge("num_held_blocks") and not is_gauge("num_loads")
    assert TransferStats.from_counts({}).is_empty()
    assert not TransferStats.from_counts({"num_held_blocks": 0}).is_empty()


def test_samples_concatenate_and_log_as_their_mean() -> None:
    from kvtransfer.stats import TransferStats

    step1 = TransferStats.from_counts({"num_loads": 1, "xfer_time_seconds": [0.25],
                                       "num_blocks_per_transfer": [4]})
    step2 = TransferStats.from_counts({"num_loads": 2, "xfer_time_seconds": [0.5, 0.75],
                                       "num_blocks_per_transfer": [1, 1]})
    total = step1.aggregate(step2)
    assert total.data["xfer_time_seconds"] == [0.25, 0.5, 0.75]
    assert total.data["num_blocks_per_transfer"] == [4, 1, 1]
    assert total.reduce()["xfer_time_seconds"] == 0.5 and total.reduce()["num_loads"] == 3
    assert not TransferStats.from_counts({"xfer_time_seconds": [0.1]}).is_empty()
    assert TransferStats.from_counts({"xfer_time_seconds": []}).is_empty()


def test_holds_register_when_the_metadata_is_bound_not_after_the_forward(
        producer_worker: PDWorker) -> None:
    """vLLM binds a step's metadata before its forward and calls start_load_kv after it (when
    no load is synchronous): a hold registered only then would answer decode's pull
    'unknown' for a whole prefill step."""
    from kvtransfer.connector import PDConnector

    connector = PDConnector.__new__(PDConnector)  # the worker side only, no vLLM config
    connector.worker_side = producer_worker
    connector.num_hook_errors = 0
    connector._failed_hooks = set()
    connector._connector_metadata = None
    connector.bind_connector_metadata(
        PDConnectorMetadata(holds=[HoldSpec("t-1", "req-1", [1, 2])], lease_s=60))
    assert len(producer_worker.holds) == 1  # before any forward
    connector.start_load_kv(SimpleNamespace())
    assert len(producer_worker.holds) == 1  # not registered twice
    connector.bind_connector_metadata(object())  # a foreign metadata: counted, not raised
    assert connector.num_hook_errors == 1
