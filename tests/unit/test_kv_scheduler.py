"""The scheduler-side connector (PDScheduler) with fake requests, blocks and vLLM config."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from vllm.v1.request import RequestStatus

from kvtransfer.metadata import ClaimSpec, HoldSpec, LoadSpec, PDHandshake
from kvtransfer.params import batch_params
from kvtransfer.protocol import PROTOCOL_VERSION
from kvtransfer.scheduler import PDScheduler, prompt_hash
from kvtransfer.settings import ConnectorSettings

BLOCK_SIZE = 16
PREFILL_HOST = "10.1.2.3"
PREFILL_PORT = 41000
LEASE_S = 12.5


def make_vllm_config(tp: int = 1, pp: int = 1, kv_heads: int | None = None) -> SimpleNamespace:
    """``kv_heads``: the model's KV heads (None: a config without a model, as in most tests)."""
    model = None if kv_heads is None else SimpleNamespace(
        use_mla=False, get_total_num_kv_heads=lambda: kv_heads,
        get_num_kv_heads=lambda parallel: max(1, kv_heads // parallel.tensor_parallel_size))
    return SimpleNamespace(
        model_config=model,
        cache_config=SimpleNamespace(block_size=BLOCK_SIZE),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
        # One scheduler plays both roles in these tests (vLLM's kv_both).
        kv_transfer_config=SimpleNamespace(is_kv_producer=True, is_kv_consumer=True),
    )


def make_scheduler(tp: int = 1, pp: int = 1, kv_heads: int | None = None,
                   **settings: Any) -> PDScheduler:
    settings = {"host": PREFILL_HOST, "port": PREFILL_PORT, "lease_s": LEASE_S, **settings}
    return PDScheduler(make_vllm_config(tp, pp, kv_heads), ConnectorSettings(**settings))


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
        "remote_addresses": [[PREFILL_HOST, PREFILL_PORT]],
        "remote_block_ids": [30, 31, 32, 33],
        "num_prompt_tokens": 64,
        "prompt_hash": prompt_hash(list(range(100, 164))),  # make_request's 64 tokens
        "tp_size": 1,
        "pp_size": 1,
        "protocol": PROTOCOL_VERSION,
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


def release_spec(transfer_id: str = "xfer-1", addresses: list[tuple[str, int]] | None = None,
                 remote_tp: int = 1) -> LoadSpec:
    return LoadSpec(transfer_id, None, addresses or [(PREFILL_HOST, PREFILL_PORT)], 0, [],
                    remote_tp)


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
        # fixed base port: worker i at +i
        "remote_addresses": [[PREFILL_HOST, PREFILL_PORT], [PREFILL_HOST, PREFILL_PORT + 1]],
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


def addresses_for(num_workers: int) -> list[list[Any]]:
    """One address per prefill worker, each on its own host (as when PP stages span nodes)."""
    return [[f"10.1.2.{3 + i}", PREFILL_PORT + i] for i in range(num_workers)]


@pytest.mark.parametrize(("num_computed", "expected"), [(0, 64), (16, 48), (48, 16), (63, 1)])
def test_consumer_claims_the_rest_of_the_prompt(num_computed: int, expected: int) -> None:
    sched = make_scheduler()
    params = remote_params()
    request = make_request(params=params)
    assert sched.get_num_new_matched_tokens(request, num_computed) == (expected, True)
    assert sched.get_num_new_matched_tokens(request, num_computed) == (expected, True)  # again
    assert params == remote_params()  # the request's parameters are never changed


def test_consumer_with_everything_cached_claims_nothing() -> None:
    sched = make_scheduler()
    request = make_request(params=remote_params())
    assert sched.get_num_new_matched_tokens(request, 64) == (0, False)


@pytest.mark.parametrize("params", [None, {}, {"do_remote_prefill": False}], ids=repr)
def test_consumer_without_remote_prefill_claims_nothing(params: dict[str, Any] | None) -> None:
    sched = make_scheduler()
    request = make_request(params=params)
    sched.on_new_request(request)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    meta = sched.build_connector_meta()
    assert meta.loads == [] and meta.claims == []


@pytest.mark.parametrize(
    "key",
    ["transfer_id", "remote_addresses", "remote_block_ids", "prompt_hash", "protocol"],
)
def test_consumer_refuses_params_missing_a_key(key: str) -> None:
    sched = make_scheduler()
    params = remote_params()
    del params[key]
    request = make_request(params=params)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)  # computed locally
    meta = sched.build_connector_meta()
    assert meta.loads == [] and meta.claims == []
    assert sched.counts["num_bad_specs"] == 1  # judged once


@pytest.mark.parametrize(
    "overrides",
    [{"protocol": PROTOCOL_VERSION - 1}, {"protocol": PROTOCOL_VERSION + 1},
     {"protocol": str(PROTOCOL_VERSION)}, {"protocol": None}, {"protocol": True},
     # version 2's form: one host and a list of ports
     {"remote_addresses": None, "remote_host": PREFILL_HOST, "remote_ports": [PREFILL_PORT]},
     {"remote_addresses": []}, {"remote_addresses": [PREFILL_HOST, PREFILL_PORT]},
     {"remote_addresses": [[PREFILL_HOST, 0]]}, {"remote_addresses": [[PREFILL_HOST, True]]},
     {"remote_addresses": [[PREFILL_HOST, "41000"]]}, {"remote_addresses": [["", PREFILL_PORT]]},
     {"remote_addresses": [[None, PREFILL_PORT]]},
     {"remote_addresses": [[PREFILL_HOST, PREFILL_PORT, 1]]},
     {"remote_addresses": addresses_for(2)},  # two workers' addresses for TP x PP = 1
     {"transfer_id": 7}, {"transfer_id": ""}, {"transfer_id": "x" * 257},
     {"remote_block_ids": [1, -2]}, {"remote_block_ids": "1,2"},
     {"tp_size": 0}, {"tp_size": "1"}],
    ids=repr,
)
def test_consumer_refuses_malformed_params_without_raising(overrides: dict[str, Any]) -> None:
    sched = make_scheduler()
    request = make_request(params=remote_params(**overrides))
    sched.on_new_request(request)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 0), 0)
    request.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(request, []) == (False, None)
    meta = sched.build_connector_meta()
    assert meta.loads == [] and meta.claims == [] and meta.holds == []
    assert sched.counts["num_bad_specs"] == 1


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (4, 2)])
def test_parallel_mismatch_computes_locally_and_releases(tp: int, pp: int) -> None:
    sched = make_scheduler(tp=1, pp=1)
    addresses = addresses_for(tp * pp)
    request = make_request(params=remote_params(tp_size=tp, pp_size=pp,
                                                remote_addresses=addresses))
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)  # asked again next step
    request.status = RequestStatus.FINISHED_STOPPED
    assert sched.request_finished(request, [1]) == (False, None)
    meta = sched.build_connector_meta()
    # exactly one release, to every worker at its own address
    assert meta.loads == [release_spec(addresses=[tuple(a) for a in addresses], remote_tp=tp)]
    assert meta.holds == [] and meta.claims == []


@pytest.mark.parametrize(("ours", "theirs"), [(1, 2), (2, 1), (2, 8), (8, 2), (4, 16)])
def test_another_tp_size_loads_when_the_heads_split(ours: int, theirs: int) -> None:
    sched = make_scheduler(tp=ours, kv_heads=8)
    addresses = addresses_for(theirs)
    request = make_request("dec-1", params=remote_params(tp_size=theirs,
                                                         remote_addresses=addresses))
    assert sched.get_num_new_matched_tokens(request, 0) == (64, True)
    sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 0), 64)
    meta = sched.build_connector_meta()
    remote = [tuple(a) for a in addresses]
    assert meta.claims == [ClaimSpec("xfer-1", remote, theirs)]
    assert meta.loads == [LoadSpec("xfer-1", "dec-1", remote, 0, [1, 2, 3, 4], theirs)]


@pytest.mark.parametrize(("kv_heads", "tp", "pp", "why"), [
    (6, 4, 1, "6 KV heads do not split over TP 4"),  # decode TP 2 splits 6 heads; prefill's 4 not
    (8, 2, 2, "prefill PP 2 differs from ours"),
])
def test_a_layout_that_cannot_pair_computes_locally(
        kv_heads: int, tp: int, pp: int, why: str, caplog: pytest.LogCaptureFixture) -> None:
    sched = make_scheduler(tp=2, kv_heads=kv_heads)
    request = make_request(params=remote_params(tp_size=tp, pp_size=pp,
                                                remote_addresses=addresses_for(tp * pp)))
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    assert why in caplog.text
    assert [spec.local_block_ids for spec in sched.build_connector_meta().loads] == [[]]


def test_parallel_match_with_tp2() -> None:
    sched = make_scheduler(tp=2, pp=1)
    request = make_request(params=remote_params(tp_size=2, pp_size=1,
                                                remote_addresses=addresses_for(2)))
    assert sched.get_num_new_matched_tokens(request, 32) == (32, True)


# -- decode side: claims -------------------------------------------------------------------------


def test_a_new_request_claims_its_transfer_once() -> None:
    sched = make_scheduler()
    request = make_request("dec-1", params=remote_params())
    sched.on_new_request(request)  # long before it reaches the head of the queue
    assert sched.build_connector_meta().claims == [
        ClaimSpec("xfer-1", [(PREFILL_HOST, PREFILL_PORT)], 1)]
    assert sched.get_num_new_matched_tokens(request, 0) == (64, True)
    sched.on_new_request(request)
    assert sched.build_connector_meta().claims == []


def test_a_request_first_seen_when_matched_is_claimed_then() -> None:
    sched = make_scheduler()
    request = make_request("dec-1", params=remote_params())
    assert sched.get_num_new_matched_tokens(request, 0) == (64, True)
    assert sched.build_connector_meta().claims == [
        ClaimSpec("xfer-1", [(PREFILL_HOST, PREFILL_PORT)], 1)]


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
    meta = sched.build_connector_meta()
    assert meta.loads == [
        LoadSpec("xfer-1", "dec-1", [(PREFILL_HOST, PREFILL_PORT)], first_block, expected_local,
                 1)
    ]
    assert sched.build_connector_meta().loads == []
    # One transfer per request: a second allocation (e.g. after preemption) loads nothing.
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    sched.update_state_after_alloc(request, make_blocks(local_ids, num_hashed), num_external)
    assert sched.build_connector_meta().loads == []


def test_alloc_with_nothing_external_releases() -> None:
    sched = make_scheduler()
    request = make_request("dec-2", params=remote_params())
    sched.on_new_request(request)
    sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 4), 0)
    assert sched.build_connector_meta().loads == [release_spec()]
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    request.status = RequestStatus.FINISHED_STOPPED
    sched.request_finished(request, [1, 2, 3, 4])
    assert sched.build_connector_meta().loads == []  # released once


def test_alloc_of_a_local_request_does_nothing() -> None:
    sched = make_scheduler()
    request = make_request(params=None)
    sched.update_state_after_alloc(request, make_blocks([1, 2], 0), 0)
    assert sched.build_connector_meta().loads == []


def test_alloc_that_cannot_be_planned_fails_the_load_instead_of_raising() -> None:
    sched = make_scheduler()
    request = make_request("dec-5", params=remote_params())
    assert sched.get_num_new_matched_tokens(request, 0) == (64, True)
    bad_blocks = SimpleNamespace(blocks=([SimpleNamespace(block_id=3)],))  # no block_hash
    sched.update_state_after_alloc(request, bad_blocks, 64)
    # vLLM waits for this request's load now: the workers must report it failed (recompute).
    assert sched.build_connector_meta().loads == [LoadSpec("", "dec-5", [], 0, [3])]
    assert sched.counts["num_bad_specs"] == 1


def test_finished_before_its_blocks_came_releases() -> None:
    sched = make_scheduler()
    request = make_request("dec-3", params=remote_params(transfer_id="xfer-3"),
                           status=RequestStatus.FINISHED_ABORTED)
    assert sched.request_finished(request, []) == (False, None)
    assert sched.build_connector_meta().loads == [release_spec("xfer-3")]


def test_claimed_then_finished_before_allocation_releases_once() -> None:
    sched = make_scheduler()
    request = make_request("dec-3", params=remote_params(transfer_id="xfer-3"))
    sched.on_new_request(request)
    sched.build_connector_meta()
    request.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(request, []) == (False, None)
    assert sched.build_connector_meta().loads == [release_spec("xfer-3")]


def test_finished_after_loading_releases_nothing_more() -> None:
    sched = make_scheduler()
    request = make_request("dec-4", params=remote_params())
    assert sched.get_num_new_matched_tokens(request, 0) == (64, True)
    sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 0), 64)
    sched.build_connector_meta()
    sched.update_connector_output(None, {"dec-4"})
    request.status = RequestStatus.FINISHED_STOPPED
    assert sched.request_finished(request, [1, 2, 3, 4]) == (False, None)
    meta = sched.build_connector_meta()
    assert meta.loads == [] and meta.holds == []
    assert sched.decode._transfers == {} and sched.decode._request_transfer == {}  # nothing leaks


def test_finished_with_bad_params_releases_nothing() -> None:
    sched = make_scheduler()
    params = remote_params()
    del params["remote_addresses"]  # cannot reach the prefill engine anyway
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


# -- prefill side: duplicates, the cap, the held-blocks gauge, the bound ports --------------------


def finished_prefill(request_id: str, transfer_id: str, num_tokens: int = 64) -> SimpleNamespace:
    return make_request(request_id, num_prompt_tokens=num_tokens,
                        status=RequestStatus.FINISHED_LENGTH_CAPPED,
                        params={"do_remote_decode": True, "transfer_id": transfer_id})


def test_a_second_hold_under_a_held_transfer_id_is_refused() -> None:
    """Two prompts (or n > 1 children) with one set of parameters: the first is held, the
    second's blocks are freed at once and it gets no parameters (this used to kill the engine
    in the worker: "transfer ... is already held")."""
    sched = make_scheduler()
    delay, params = sched.request_finished(finished_prefill("p-1", "shared"), [1, 2, 3, 4])
    assert delay is True and params["transfer_id"] == "shared"
    assert sched.request_finished(finished_prefill("p-2", "shared"), [5, 6, 7, 8]) == (
        False, None)
    assert sched.build_connector_meta().holds == [HoldSpec("shared", "p-1", [1, 2, 3, 4])]
    assert sched.counts["num_duplicate_holds"] == 1
    assert sched.num_held_blocks == 4
    # Once the first hold is released (sent or expired), the id may be held again.
    sched.update_connector_output({"p-1"}, None)
    assert sched.num_held_blocks == 0
    assert sched.request_finished(finished_prefill("p-3", "shared"), [9])[0] is True


@pytest.mark.parametrize("transfer_id", [7, None, "", "x" * 257, ["a"]], ids=repr)
def test_a_bad_transfer_id_is_not_held(transfer_id: Any) -> None:
    sched = make_scheduler()
    request = finished_prefill("p-1", "unused")
    request.kv_transfer_params["transfer_id"] = transfer_id
    assert sched.request_finished(request, [1, 2]) == (False, None)
    assert sched.build_connector_meta().holds == []
    assert sched.counts["num_bad_specs"] == 1


def test_holds_past_the_cap_are_answered_busy_and_counted() -> None:
    sched = make_scheduler(max_held_blocks=6)
    assert sched.request_finished(finished_prefill("p-1", "t-1"), [1, 2, 3, 4])[0] is True
    assert sched.request_finished(finished_prefill("p-2", "t-2"), [5, 6, 7]) == (
        False, {"busy": True})
    assert sched.request_finished(finished_prefill("p-3", "t-3"), [8, 9])[0] is True  # fits
    assert sched.num_held_blocks == 6
    assert sched.counts["num_busy_holds"] == 1
    assert [h.transfer_id for h in sched.build_connector_meta().holds] == ["t-1", "t-3"]
    sched.update_connector_output({"p-1"}, set())  # the workers released it
    assert sched.request_finished(finished_prefill("p-4", "t-4"), [5, 6, 7])[0] is True
    assert sched.num_held_blocks == 5


def test_held_blocks_are_a_gauge_reported_when_they_change() -> None:
    sched = make_scheduler()
    assert sched.take_stats() is None  # nothing held, nothing counted
    sched.request_finished(finished_prefill("p-1", "t-1"), [1, 2, 3])
    sched.request_finished(finished_prefill("p-2", "t-1"), [4])  # duplicate
    stats = sched.take_stats()
    assert stats.data["num_held_blocks"] == 3
    assert stats.data["num_duplicate_holds"] == 1
    assert sched.take_stats() is None  # unchanged: not reported again
    sched.update_connector_output({"p-1"}, None)
    assert sched.take_stats().data == {**stats.data, "num_held_blocks": 0,
                                       "num_duplicate_holds": 0}


def test_addresses_come_from_the_workers_handshake() -> None:
    sched = make_scheduler(tp=2, pp=2, port=0)
    request = finished_prefill("p-1", "t-1")
    assert sched.request_finished(request, [1]) == (False, None)  # no address known yet
    assert sched.counts["num_bad_specs"] == 1
    # Each PP stage on its own node: the workers report their own node's host.
    sched.set_handshake({(pp, tp): PDHandshake(f"10.0.{pp}.1", 50000 + 10 * pp + tp)
                         for pp in range(2) for tp in range(2)})
    expected = [("10.0.0.1", 50000), ("10.0.0.1", 50001), ("10.0.1.1", 50010),
                ("10.0.1.1", 50011)]  # index pp_rank * tp + tp_rank
    assert sched.remote_addresses == expected
    _, params = sched.request_finished(finished_prefill("p-2", "t-2"), [1])
    assert params["remote_addresses"] == [list(a) for a in expected]
    params = json.loads(json.dumps(params))  # as the router carries them
    # The decode side addresses worker i at remote_addresses[i]: claims, loads and releases.
    decode = make_scheduler(tp=2, pp=2, port=0)
    waiting = make_request("dec-2", params=params)
    assert decode.get_num_new_matched_tokens(waiting, 0) == (64, True)
    decode.update_state_after_alloc(waiting, make_blocks([4, 5, 6, 7], 0), 64)
    meta = decode.build_connector_meta()
    assert meta.claims == [ClaimSpec("t-2", expected, 2)]
    assert meta.loads[0].remote_addresses == expected


def test_an_incomplete_handshake_keeps_the_fixed_ports() -> None:
    sched = make_scheduler(tp=2)
    sched.set_handshake({(0, 0): PDHandshake(PREFILL_HOST, 50000)})  # worker 1 missing
    assert sched.remote_addresses == [(PREFILL_HOST, PREFILL_PORT),
                                      (PREFILL_HOST, PREFILL_PORT + 1)]


# -- decode side: requests that share a transfer (n > 1) ------------------------------------------


def test_siblings_of_one_transfer_load_it_once() -> None:
    """vLLM fans a request with n > 1 out into n requests with the same parameters: one loads,
    the others ask again later, then find the loaded blocks in the prefix cache."""
    sched = make_scheduler()
    a, b, c = (make_request(f"dec-{x}", params=remote_params()) for x in "abc")
    for request in (a, b, c):
        sched.on_new_request(request)
    assert sched.build_connector_meta().claims == [
        ClaimSpec("xfer-1", [(PREFILL_HOST, PREFILL_PORT)], 1)]  # one claim for the three
    assert sched.get_num_new_matched_tokens(a, 0) == (64, True)
    assert sched.get_num_new_matched_tokens(b, 0) == (64, True)  # nobody loads yet
    sched.update_state_after_alloc(a, make_blocks([1, 2, 3, 4], 0), 64)
    assert sched.get_num_new_matched_tokens(b, 0) == (None, False)  # a is loading
    assert sched.get_num_new_matched_tokens(c, 0) == (None, False)
    assert [ld.request_id for ld in sched.build_connector_meta().loads] == ["dec-a"]
    sched.update_connector_output(None, {"dec-a"})  # loaded (or failed: the same for b, c)
    # b and c now hit a's blocks in the prefix cache and compute only the rest.
    assert sched.get_num_new_matched_tokens(b, 48) == (0, False)
    assert sched.get_num_new_matched_tokens(c, 0) == (0, False)
    for request in (a, b, c):
        request.status = RequestStatus.FINISHED_STOPPED
        assert sched.request_finished(request, [1]) == (False, None)
    meta = sched.build_connector_meta()
    assert meta.loads == [] and meta.claims == []  # the load's own DONE released it
    assert sched.counts["num_duplicate_loads"] == 2
    decode = sched.decode
    assert decode._transfers == {} and decode._request_transfer == {} and decode._loading == {}


def test_siblings_wait_for_an_aborted_loader_then_compute() -> None:
    sched = make_scheduler()
    a, b = (make_request(f"dec-{x}", params=remote_params()) for x in "ab")
    assert sched.get_num_new_matched_tokens(a, 0) == (64, True)
    sched.update_state_after_alloc(a, make_blocks([1, 2, 3, 4], 0), 64)
    a.status = RequestStatus.FINISHED_ABORTED
    assert sched.request_finished(a, []) == (False, None)  # still loading: vLLM waits
    assert sched.get_num_new_matched_tokens(b, 0) == (None, False)
    sched.update_connector_output(None, {"dec-a"})
    assert sched.get_num_new_matched_tokens(b, 0) == (0, False)
    b.status = RequestStatus.FINISHED_STOPPED
    sched.request_finished(b, [1])
    assert sched.build_connector_meta().loads[1:] == []
    assert sched.decode._transfers == {}


def test_a_sibling_with_everything_cached_does_not_release_the_others_transfer() -> None:
    sched = make_scheduler()
    a, b = (make_request(f"dec-{x}", params=remote_params()) for x in "ab")
    sched.on_new_request(a)
    sched.on_new_request(b)
    sched.update_state_after_alloc(a, make_blocks([1, 2, 3, 4], 4), 0)  # a: all cached
    assert sched.build_connector_meta().loads == []  # b may still load it
    assert sched.get_num_new_matched_tokens(b, 0) == (64, True)


def test_another_prompt_under_a_transfer_id_in_use_computes_locally_without_release() -> None:
    """Two prompts sent with one set of parameters: the second must not release the first's
    transfer (that would free the blocks before the first pulls them)."""
    sched = make_scheduler()
    first = make_request("dec-1", params=remote_params())
    sched.on_new_request(first)
    second = make_request("dec-2", num_prompt_tokens=64, params=remote_params())
    second.prompt_token_ids = list(range(500, 564))
    sched.on_new_request(second)
    assert sched.get_num_new_matched_tokens(second, 0) == (0, False)
    assert sched.build_connector_meta().loads == []
    assert sched.get_num_new_matched_tokens(first, 0) == (64, True)


# -- decode side: a request of several prompts --------------------------------------------------


def batch_request(request_id: str, first_token: int, params: dict[str, Any]) -> SimpleNamespace:
    request = make_request(request_id, params=params)
    request.prompt_token_ids = list(range(first_token, first_token + 64))
    return request


def test_each_prompt_of_a_batch_loads_its_own_transfer() -> None:
    """vLLM gives every prompt's engine request the same parameters: each finds its own set
    by its tokens' digest; a prompt without a set (its prefill failed) computes here."""
    entries = [remote_params(transfer_id=f"xfer-{first}", remote_block_ids=[first] * 4,
                             prompt_hash=prompt_hash(list(range(first, first + 64))))
               for first in (100, 300)]
    params = batch_params(entries)
    sched = make_scheduler()
    a, b, c = (batch_request(f"dec-{first}", first, params) for first in (300, 100, 500))
    for request in (a, b, c):
        sched.on_new_request(request)
    assert [claim.transfer_id for claim in sched.build_connector_meta().claims] == \
        ["xfer-300", "xfer-100"]
    assert sched.get_num_new_matched_tokens(c, 0) == (0, False)  # no set: computed here
    for request in (a, b):
        assert sched.get_num_new_matched_tokens(request, 0) == (64, True)
        sched.update_state_after_alloc(request, make_blocks([1, 2, 3, 4], 0), 64)
    loads = sched.build_connector_meta().loads
    assert [(ld.transfer_id, ld.request_id) for ld in loads] == \
        [("xfer-300", "dec-300"), ("xfer-100", "dec-100")]
    assert sched.counts["num_bad_specs"] == 0


def test_a_batch_ended_before_scheduling_releases_every_prompts_transfer() -> None:
    entries = [remote_params(transfer_id=f"xfer-{first}",
                             prompt_hash=prompt_hash(list(range(first, first + 64))))
               for first in (100, 300)]
    sched = make_scheduler()
    for first in (100, 300):
        request = batch_request(f"dec-{first}", first, batch_params(entries))
        request.status = RequestStatus.FINISHED_ABORTED
        assert sched.request_finished(request, []) == (False, None)
    assert sched.build_connector_meta().loads == [release_spec("xfer-100"),
                                                  release_spec("xfer-300")]


@pytest.mark.parametrize("batch", ["xfer-1", [["not", "a", "dict"]], [remote_params()] * 4097])
def test_a_malformed_batch_computes_locally_and_is_counted(batch: Any) -> None:
    sched = make_scheduler()
    request = make_request(params={"do_remote_prefill": True, "batch": batch})
    assert sched.get_num_new_matched_tokens(request, 0) == (0, False)
    meta = sched.build_connector_meta()
    assert meta.claims == [] and meta.loads == []
    assert sched.counts["num_bad_specs"] == 1
