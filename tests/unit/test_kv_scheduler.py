"""The scheduler-side connector (PDScheduler) with fake requests, blocks and vLLM config."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from kvtransfer.metadata import HoldSpec, LoadSpec
from kvtransfer.protocol import PROTOCOL_VERSION
from kvtransfer.scheduler import PDScheduler, prompt_hash
from kvtransfer.settings import ConnectorSettings

BLOCK_SIZE = 16
PREFILL_HOST = "10.1.2.3"
PREFILL_PORT = 41000
LEASE_S = 12.5


def make_vllm_config(tp: int = 1, pp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=BLOCK_SIZE),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
    )


def make_scheduler(tp: int = 1, pp: int = 1) -> PDScheduler:
    settings = ConnectorSettings(host=PREFILL_HOST, port=PREFILL_PORT, lease_s=LEASE_S)
    return PDScheduler(make_vllm_config(tp, pp), settings)


def make_request(
    request_id: str = "req-1",
    num_prompt_tokens: int = 64,
    params: dict[str, Any] | None = None,
    status: RequestStatus = RequestStatus.WAITING,
) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=request_id,
        prompt_token_ids=list(range(100, 100 + num_prompt_tokens)),
        num_prompt_tokens=num_prompt_tokens,
        kv_transfer_params=params,
        status=status,
    )


def remote_params(**overrides: Any) -> dict[str, Any]:
    """What a prefill engine returns for a 64-token prompt (4 blocks of 16), decode side."""
    params: dict[str, Any] = {
        "do_remote_prefill": True,
        "transfer_id": "xfer-1",
        "remote_host": PREFILL_HOST,
        "remote_port": PREFILL_PORT,
        "remote_block_ids": [30, 31, 32, 33],
        "num_prompt_tokens": 64,
        "prompt_hash": prompt_hash(list(range(100, 164))),  # make_request's 64 tokens
        "tp_size": 1,
        "pp_size": 1,
        "protocol": 1,
    }
    params.update(overrides)
    return params


def make_blocks(block_ids: list[int], num_hashed: int) -> SimpleNamespace:
    """KVCacheBlocks of one KV cache group; the first ``num_hashed`` are prefix-cache hits."""
    group = [
        SimpleNamespace(block_id=b, block_hash=f"hash-{b}" if i < num_hashed else None)
        for i, b in enumerate(block_ids)
    ]
    return SimpleNamespace(blocks=(group,))


def release_spec(transfer_id: str = "xfer-1") -> LoadSpec:
    return LoadSpec(transfer_id, None, PREFILL_HOST, PREFILL_PORT, 0, [])


# -- prefill side ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status", [RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED]
)
def test_producer_holds_a_finished_request(status: RequestStatus) -> None:
    sched = make_scheduler(tp=2, pp=1)
    request = make_request(
        "engine-7", num_prompt_tokens=40, status=status,
        params={"do_remote_decode": True, "transfer_id": "xfer-7"},
    )
    delay_free, params = sched.request_finished(request, [5, 9, 2])
    assert delay_free is True
    assert params == {
        "do_remote_prefill": True,
        "transfer_id": "xfer-7",
        "remote_host": PREFILL_HOST,
        "remote_port": PREFILL_PORT,
        "remote_block_ids": [5, 9, 2],
        "num_prompt_tokens": 40,
        "prompt_hash": prompt_hash(list(range(100, 140))),
        "tp_size": 2,
        "pp_size": 1,
        "protocol": PROTOCOL_VERSION,
    }
    meta = sched.build_connector_meta()
    assert meta.holds == [HoldSpec("xfer-7", "engine-7", [5, 9, 2])]
    assert meta.loads == []
    assert meta.lease_s == LEASE_S
    again = sched.build_connector_meta()  # handed over once
    assert again.holds == [] and again.loads == []


def test_producer_params_feed_the_consumer() -> None:
    producer, consumer = make_scheduler(), make_scheduler()
    finished = make_request(status=RequestStatus.FINISHED_LENGTH_CAPPED,
                            params={"do_remote_decode": True, "transfer_id": "xfer-9"})
    _, params = producer.request_finished(finished, [1, 2, 3, 4])
    assert params is not None
    waiting = make_request("dec-9", params=params)
    assert consumer.get_num_new_matched_tokens(waiting, 0) == (64, True)


@pytest.mark.parametrize(
    "status",
    [RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR,
     RequestStatus.FINISHED_IGNORED, RequestStatus.RUNNING],
)
def test_producer_frees_aborted_requests_at_once(status: RequestStatus) -> None:
    sched = make_scheduler()
    request = make_request(status=status,
                           params={"do_remote_decode": True, "transfer_id": "xfer-1"})
    assert sched.request_finished(request, [1, 2]) == (False, None)
    assert sched.build_connector_meta().holds == []


@pytest.mark.parametrize(
    ("params", "block_ids"),
    [
        (None, [1]),
        ({}, [1]),
        ({"do_remote_decode": False, "transfer_id": "x"}, [1]),
        ({"do_remote_decode": True}, [1]),  # no transfer id
        ({"do_remote_decode": True, "transfer_id": ""}, [1]),
        ({"do_remote_decode": True, "transfer_id": "x"}, []),  # nothing to hold
    ],
    ids=["none", "empty", "not-remote-decode", "no-transfer-id", "empty-id", "no-blocks"],
)
def test_producer_does_not_hold_without_a_transfer(
    params: dict[str, Any] | None, block_ids: list[int]
) -> None:
    sched = make_scheduler()
    request = make_request(status=RequestStatus.FINISHED_STOPPED, params=params)
    assert sched.request_finished(request, block_ids) == (False, None)
    meta = sched.build_connector_meta()
    assert meta.holds == [] and meta.loads == []


# -- decode side: matching ---------------------------------------------------------------------


@pytest.mark.parametrize(("num_computed", "expected"), [(0, 64), (16, 48), (48, 16), (63, 1)])
def test_consumer_claims_the_rest_of_the_prompt(num_computed: int, expected: int) -> None:
    sched = make_scheduler()
    request = make_request(params=remote_params())
    assert sched.get_num_new_matched_tokens(request, num_computed) == (expected, True)
    assert request.kv_transfer_params["do_remote_prefill"] is True  # not consumed yet


def test_consumer_with_everything_cached_claims_nothing() -> None:
    sched = make_scheduler()
    request = make_request(params=remote_params())
    assert sched.get_num_new_matched_tokens(request, 64) == (0, False)


@pytest.mark.parametrize("params", [None, {}, {"do_remote_prefill": False}], ids=repr)
def test_consumer_without_remote_prefill_claims_nothing(params: dict[str, Any] | None) -> None:
    sched = make_scheduler()
    assert sched.get_num_new_matched_tokens(make_request(params=params), 0) == (0, False)
    assert sched.build_connector_meta().loads == []


@pytest.mark.parametrize(
    "key",
    ["transfer_id", "remote_host", "remote_port", "remote_block_ids", "prompt_hash", "protocol"],
)
def test_consumer_refuses_params_missing_a_key(key: str) -> None:
    sched = make_scheduler()
    params = remote_params()
    del params[key]
    request = make_request(params=params)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert params["do_remote_prefill"] is False  # computed locally from now on
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert sched.build_connector_meta().loads == []


@pytest.mark.parametrize("protocol", [0, 2, "1", None])
def test_consumer_refuses_another_protocol(protocol: Any) -> None:
    sched = make_scheduler()
    request = make_request(params=remote_params(protocol=protocol))
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert sched.build_connector_meta().loads == []


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (4, 2)])
def test_parallel_mismatch_computes_locally_and_releases(tp: int, pp: int) -> None:
    sched = make_scheduler(tp=1, pp=1)
    request = make_request(params=remote_params(tp_size=tp, pp_size=pp))
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert request.kv_transfer_params["do_remote_prefill"] is False
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)  # asked again next step
    meta = sched.build_connector_meta()
    assert meta.loads == [release_spec()]  # exactly one release
    assert meta.holds == []


def test_parallel_match_with_tp2() -> None:
    sched = make_scheduler(tp=2, pp=1)
    request = make_request(params=remote_params(tp_size=2, pp_size=1))
    assert sched.get_num_new_matched_tokens(request, 32) == (32, True)


# -- decode side: after allocation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("local_ids", "num_hashed", "first_block", "expected_local"),
    [
        ([7, 8, 9, 10], 0, 0, [7, 8, 9, 10]),
        ([7, 8, 9, 10], 2, 2, [9, 10]),
        ([7, 8, 9, 10], 3, 3, [10]),
        ([7, 8, 9, 10, 11], 1, 1, [8, 9, 10]),  # an extra local block beyond the prompt
    ],
)
def test_alloc_builds_a_load_spec(
    local_ids: list[int], num_hashed: int, first_block: int, expected_local: list[int]
) -> None:
    sched = make_scheduler()
    request = make_request("dec-1", params=remote_params())
    num_external = 64 - num_hashed * BLOCK_SIZE
    assert sched.get_num_new_matched_tokens(request, num_hashed * BLOCK_SIZE) == (
        num_external, True
    )
    sched.update_state_after_alloc(request, make_blocks(local_ids, num_hashed), num_external)
    assert request.kv_transfer_params["do_remote_prefill"] is False
    meta = sched.build_connector_meta()
    assert meta.loads == [
        LoadSpec("xfer-1", "dec-1", PREFILL_HOST, PREFILL_PORT, first_block, expected_local)
    ]
    assert sched.build_connector_meta().loads == []
    # One transfer per request: a second allocation (e.g. after preemption) loads nothing.
    sched.update_state_after_alloc(request, make_blocks(local_ids, num_hashed), num_external)
    assert sched.build_connector_meta().loads == []


def test_alloc_with_nothing_external_releases() -> None:
    sched = make_scheduler()
    request = make_request("dec-2", params=remote_params())
    sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 4), 0)
    assert sched.build_connector_meta().loads == [release_spec()]
    assert request.kv_transfer_params["do_remote_prefill"] is False


def test_alloc_of_a_local_request_does_nothing() -> None:
    sched = make_scheduler()
    request = make_request(params=None)
    sched.update_state_after_alloc(request, make_blocks([1, 2], 0), 0)
    assert sched.build_connector_meta().loads == []


def test_finished_before_its_blocks_came_releases() -> None:
    sched = make_scheduler()
    request = make_request("dec-3", params=remote_params(transfer_id="xfer-3"),
                           status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(request, []) == (False, None)
    assert sched.build_connector_meta().loads == [release_spec("xfer-3")]
    assert request.kv_transfer_params["do_remote_prefill"] is False


def test_finished_after_loading_releases_nothing_more() -> None:
    sched = make_scheduler()
    request = make_request("dec-4", params=remote_params())
    sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 0), 64)
    sched.build_connector_meta()
    request.status = RequestStatus.FINISHED_STOPPED
    assert sched.request_finished(request, [1, 2, 3, 4]) == (False, None)
    meta = sched.build_connector_meta()
    assert meta.loads == [] and meta.holds == []


def test_finished_with_bad_params_releases_nothing() -> None:
    sched = make_scheduler()
    params = remote_params()
    del params["remote_host"]  # cannot reach the prefill engine anyway
    request = make_request(params=params, status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(request, []) == (False, None)
    assert sched.build_connector_meta().loads == []


def test_prompt_hash_tells_token_sequences_apart() -> None:
    assert prompt_hash([1, 2, 3]) == prompt_hash([1, 2, 3])
    assert len({prompt_hash(ids) for ids in ([1, 2, 3], [1, 2, 4], [3, 2, 1], [1, 2], [])}) == 5


def test_consumer_with_other_prompt_tokens_computes_locally_and_releases() -> None:
    """The decode request's tokens are not the ones the prefill computed: loading those blocks
    would silently corrupt the output, so the prompt is computed here and the hold released."""
    scheduler = make_scheduler()
    request = make_request(params=remote_params(prompt_hash=prompt_hash([7] * 64)))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    assert scheduler.build_connector_meta().loads == [release_spec()]
