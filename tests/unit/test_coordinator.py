"""The router's coordinator with fake replica reports (no Ray, no engine)."""

from __future__ import annotations

import time

import pytest

from router.coordinator import CoordinatorSettings, RoutingCoordinator
from router.kvindex import StoredBlocks, hash_token_blocks

BLOCK = 4
PROMPT = list(range(100, 140))  # 10 blocks


@pytest.fixture
def coordinator():
    c = RoutingCoordinator(CoordinatorSettings(
        block_size=BLOCK, pairing={"local_prefill_max_uncached_tokens": 4}))
    c.observe("prefill", {"p0": {"num_running": 0}, "p1": {"num_running": 0}})
    c.observe("decode", {"d0": {"num_running": 1}})
    yield c
    c.events.close()


def store(c: RoutingCoordinator, replica_id: str, tokens: list[int]) -> None:
    num_blocks = len(tokens) // BLOCK
    event = StoredBlocks([f"{replica_id}-{i}" for i in range(num_blocks)], None,
                         tokens[: num_blocks * BLOCK], BLOCK)
    with c.lock:
        c.index.apply(replica_id, event)


def record_retry_flags(c: RoutingCoordinator, monkeypatch) -> list[tuple[str, bool]]:
    """(pool, ``ctx.is_retry``) of every choice the pools' policies make from now on."""
    seen: list[tuple[str, bool]] = []
    for role in ("prefill", "decode"):
        policy = getattr(c.pairs, f"{role}_policy")

        def select(candidates, ctx, role=role, policy=policy):
            seen.append((role, ctx.is_retry))
            return type(policy).select(policy, candidates, ctx)

        monkeypatch.setattr(policy, "select", select)
    return seen


def test_context_counts_cached_tokens_per_replica(coordinator) -> None:
    store(coordinator, "p1", PROMPT[:24])
    ctx = coordinator.context("r", PROMPT)
    assert ctx.num_prompt_tokens == 40
    assert ctx.cached_tokens == {"p1": 24}
    assert list(ctx.block_hashes) == hash_token_blocks(PROMPT, BLOCK)
    assert ctx.uncached_tokens("p1") == 16 and ctx.uncached_tokens("p0") == 40


def test_pair_goes_to_the_prefill_replica_holding_the_prefix(coordinator) -> None:
    store(coordinator, "p1", PROMPT[:32])
    choice = coordinator.choose(coordinator.context("r", PROMPT))
    assert (choice.prefill.replica_id, choice.decode.replica_id) == ("p1", "d0")


def test_decode_holding_all_but_a_few_tokens_prefills_locally(coordinator) -> None:
    store(coordinator, "d0", PROMPT[:36])  # 4 uncached tokens: at the threshold
    choice = coordinator.choose(coordinator.context("r", PROMPT))
    assert choice.is_local_prefill and choice.decode.replica_id == "d0"
    assert coordinator.num_local_prefills == 1
    assert coordinator.fallbacks()["local_prefills"] == {"policy": 1}


def test_failed_prefill_replica_is_left_out(coordinator) -> None:
    store(coordinator, "p1", PROMPT[:32])
    ctx = coordinator.context("r", PROMPT)
    coordinator.mark_failed("prefill", "p1", "test")
    assert coordinator.choose_prefill(ctx).replica_id == "p0"
    coordinator.mark_failed("prefill", "p0", "test")
    assert coordinator.choose_prefill(ctx) is None
    assert coordinator.choose(ctx).is_local_prefill  # no prefill replica left
    assert coordinator.fallbacks()["local_prefills"] == {"no_prefill_replica": 1}
    assert coordinator.fallbacks()["replica_failures"] == {"prefill": 2}


def test_failed_decode_replica_is_left_out_and_taken_back(coordinator, monkeypatch) -> None:
    coordinator.observe("decode", {"d0": {}, "d1": {}})
    ctx = coordinator.context("r", PROMPT)
    coordinator.mark_failed("decode", "d0", "test")
    assert [coordinator.choose(ctx).decode.replica_id for _ in range(5)] == ["d1"] * 5
    assert coordinator.choose_decode(ctx, exclude=["d1"]) is None
    left = coordinator.fallbacks()["failed_replicas"]["decode"]
    assert set(left) == {"d0"} and 29 < left["d0"] <= 30
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 31)  # the failed period is over
    assert {c.replica_id for c in coordinator.candidates("decode")} == {"d0", "d1"}
    assert coordinator.fallbacks()["failed_replicas"]["decode"] == {}


def test_replaced_replica_is_forgotten(coordinator) -> None:
    coordinator.mark_failed("decode", "d0", "test")
    assert coordinator.choose(coordinator.context("r", PROMPT)) is None  # no healthy decode
    coordinator.observe("decode", {"d9": {}})  # Ray Serve replaced d0 by d9
    assert coordinator.fallbacks()["failed_replicas"]["decode"] == {}
    assert coordinator.choose(coordinator.context("r", PROMPT)).decode.replica_id == "d9"
    coordinator.observe("decode", {"d0": {}, "d9": {}})  # d0 listed again: not left out
    assert {c.replica_id for c in coordinator.candidates("decode")} == {"d0", "d9"}


def test_busy_replica_is_left_out_briefly_and_not_counted_failed(coordinator) -> None:
    coordinator.mark_failed("prefill", "p0", "503", is_busy=True)
    left = coordinator.fallbacks()["failed_replicas"]["prefill"]["p0"]
    assert 0 < left <= coordinator.settings.busy_replica_s
    assert coordinator.fallbacks()["replica_failures"] == {}


def test_each_degradation_is_logged_once(coordinator, caplog) -> None:
    for _ in range(3):
        coordinator.count_local_prefill("busy")
        coordinator.count_local_prefill("policy")
        coordinator.count_decode_retry()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("reason busy" in m for m in warnings) == 1
    assert sum("retried" in m for m in warnings) == 1
    assert not any("policy" in m for m in warnings)
    assert coordinator.fallbacks()["local_prefills"] == {"busy": 3, "policy": 3}
    assert coordinator.fallbacks()["decode_retries"] == 3
    with pytest.raises(ValueError):
        coordinator.count_local_prefill("tired")


def test_no_decode_replica_means_no_choice_yet() -> None:
    c = RoutingCoordinator(CoordinatorSettings(block_size=BLOCK))
    try:
        assert c.choose(c.context("r", PROMPT)) is None
    finally:
        c.events.close()


def test_replica_that_left_is_dropped_from_the_index(coordinator) -> None:
    store(coordinator, "p1", PROMPT)
    coordinator.observe("prefill", {"p0": {}})
    assert coordinator.context("r", PROMPT).cached_tokens == {}
    assert [c.replica_id for c in coordinator.candidates("prefill")] == ["p0"]


def test_replicas_without_events_are_guessed_from_routing(coordinator) -> None:
    ctx = coordinator.context("r", PROMPT)
    coordinator.done(ctx, ["p0", "d0"])
    cached = coordinator.context("r2", PROMPT).cached_tokens
    assert cached == {"p0": 40, "d0": 40}  # every full block of the prompt


def test_a_prefill_replica_gone_mid_request_is_reported_to_the_prefill_policy(
        coordinator, monkeypatch) -> None:
    """The request's end reaches each pool's policy for the replica it went to, even when
    the prefill replica has left the pool since (it is no longer listed as prefill)."""
    ended: list[tuple[str, str]] = []
    for role in ("prefill", "decode"):
        monkeypatch.setattr(getattr(coordinator.pairs, f"{role}_policy"), "on_request_done",
                            lambda rid, ctx, role=role: ended.append((role, rid)))
    ctx = coordinator.context("r", PROMPT)
    choice = coordinator.choose(ctx)
    prefill_id = choice.prefill.replica_id
    coordinator.observe("prefill", {rid: {} for rid in ("p0", "p1") if rid != prefill_id})
    coordinator.done(ctx, [prefill_id, "d0"])
    assert ended == [("prefill", prefill_id), ("decode", "d0")]


@pytest.mark.parametrize("policy", ["sglang_cache_aware", "ray_prefix_affinity"])
def test_baseline_policies_see_the_prompt_blocks(policy: str) -> None:
    """The baselines keep their own trees over ``ctx.block_hashes``: six unrelated cold prompts
    spread over six replicas (without the prompt's blocks they would all pile on one), and each
    goes back to its replica when it comes again."""
    c = RoutingCoordinator(CoordinatorSettings(
        block_size=BLOCK, prefill_policy=policy,
        pairing={"local_prefill_max_uncached_tokens": 0, "local_prefill_cost_factor": 0}))
    try:
        c.observe("prefill", {f"p{i}": {} for i in range(8)})
        c.observe("decode", {"d0": {}})
        prompts = [[t + 1000 * k for t in PROMPT] for k in range(6)]
        first = [c.choose(c.context(f"a{k}", p)).prefill.replica_id
                 for k, p in enumerate(prompts)]
        again = [c.choose(c.context(f"b{k}", p)).prefill.replica_id
                 for k, p in enumerate(prompts)]
        assert len(set(first)) == len(prompts)
        assert again == first
    finally:
        c.events.close()


def test_a_burst_between_two_reports_spreads_over_the_pool() -> None:
    """Ray Serve refreshes the replicas' reports once a second: twelve cold prompts routed
    between two refreshes all see the same figures: on those alone, every one would go to p0,
    which reports twice p1's speed. Counting what it sent, the router queues them on p0 until
    p1 is the better choice, and alternates the decode replicas. A prefill that is over, or a
    request that is done, no longer counts."""
    from cluster.service_config import RouterConfig

    shipped = RouterConfig()
    coordinator = RoutingCoordinator(CoordinatorSettings(
        block_size=BLOCK, prefill_policy_kwargs=shipped.policy_kwargs("prefill"),
        decode_policy_kwargs=shipped.policy_kwargs("decode"), pairing=shipped.pairing))
    coordinator.observe("prefill", {"p0": {"prefill_tokens_per_s": 2000.0},
                                    "p1": {"prefill_tokens_per_s": 1000.0}})
    coordinator.observe("decode", {"d0": {}, "d1": {}})
    ctxs = [coordinator.context(f"r{k}", [t + 1000 * k for t in PROMPT]) for k in range(12)]
    choices = [coordinator.choose(ctx) for ctx in ctxs]
    prefills = [c.prefill.replica_id for c in choices]
    decodes = [c.decode.replica_id for c in choices]
    assert 1 <= prefills.count("p1") < prefills.count("p0"), prefills
    assert decodes.count("d0") == 6, decodes
    assert {c.replica_id: c.load.queued_prefill_tokens
            for c in coordinator.candidates("prefill")} == {
        "p0": 40 * prefills.count("p0"), "p1": 40 * prefills.count("p1")}
    for ctx, choice in zip(ctxs, choices, strict=True):
        coordinator.prefill_done(ctx)
        coordinator.done(ctx, [choice.prefill.replica_id, choice.decode.replica_id])
    assert all(c.load.queued_prefill_tokens == 0 for c in coordinator.candidates("prefill"))
    assert all(c.load.num_running == 0 for c in coordinator.candidates("decode"))
    assert len(coordinator.routed) == 0
    coordinator.events.close()


def test_a_replica_report_above_what_was_sent_counts(coordinator) -> None:
    """Another ingress replica's requests show only in the report: the larger figure wins."""
    coordinator.observe("prefill", {"p0": {"queued_prefill_tokens": 500}, "p1": {}})
    ctx = coordinator.context("r", PROMPT)
    assert coordinator.choose(ctx).prefill.replica_id == "p1"
    loads = {c.replica_id: c.load for c in coordinator.candidates("prefill")}
    assert (loads["p0"].queued_prefill_tokens, loads["p1"].queued_prefill_tokens) == (500, 40)


def test_a_retry_moves_the_sent_work(coordinator, monkeypatch) -> None:
    ctx = coordinator.context("r", PROMPT)
    first = coordinator.choose(ctx).prefill.replica_id
    coordinator.mark_failed("prefill", first, "test")
    seen = record_retry_flags(coordinator, monkeypatch)
    retry = coordinator.choose_prefill(ctx, exclude=[first])
    assert retry.replica_id != first
    assert seen == [("prefill", True)]  # a retry, not a new use of the prompt
    assert coordinator.routed.load(first, coordinator.replicas("prefill")[first]) == \
        coordinator.replicas("prefill")[first]
    assert coordinator.routed.load(retry.replica_id, coordinator.replicas("prefill")[
        retry.replica_id]).queued_prefill_tokens == 40


def test_a_new_replica_gets_the_pools_measured_speed(coordinator) -> None:
    """A replacement replica has measured nothing yet: it is costed at its pool's mean speed,
    not at the nominal one, which may be far from this hardware's."""
    coordinator.observe("prefill", {"p0": {"prefill_tokens_per_s": 30000.0},
                                    "p1": {"prefill_tokens_per_s": 50000.0}, "p2": {}})
    speeds = {c.replica_id: c.load.prefill_tokens_per_s
              for c in coordinator.candidates("prefill")}
    assert speeds == {"p0": 30000.0, "p1": 50000.0, "p2": 40000.0}
    coordinator.observe("prefill", {"p2": {}})  # nothing measured anywhere: as reported
    assert coordinator.candidates("prefill")[0].load.prefill_tokens_per_s == 0.0


def test_a_request_whose_end_never_came_expires() -> None:
    from router.routed_work import RoutedWork

    work = RoutedWork(ttl_s=10.0)
    work.prefill("a", "p0", 100, now_s=0.0)
    work.decode("a", "d0", now_s=0.0)
    work.prefill("b", "p0", 50, now_s=5.0)
    from router.policy import ReplicaLoad

    assert work.load("p0", ReplicaLoad()).queued_prefill_tokens == 150
    work.expire(11.0)
    assert work.load("p0", ReplicaLoad()).queued_prefill_tokens == 50
    assert work.load("d0", ReplicaLoad()) == ReplicaLoad()
    assert len(work) == 1


def test_policies_are_told_which_choices_are_retries(coordinator, monkeypatch) -> None:
    """A retry is a replica chosen again for a request a policy has already placed; a first
    attempt that Ray Serve placed (None) was seen by no policy."""
    seen = record_retry_flags(coordinator, monkeypatch)
    coordinator.observe("decode", {"d0": {}, "d1": {}})
    ctx = coordinator.context("r", PROMPT)
    coordinator.choose_prefill(ctx, exclude=[None])
    coordinator.choose_prefill(ctx, exclude=["p0"])
    coordinator.choose_decode(ctx)
    coordinator.choose_decode(ctx, exclude=["d0"])
    assert seen == [("prefill", False), ("prefill", True), ("decode", False), ("decode", True)]
    assert not ctx.is_retry  # the caller's context is left as it was
