"""The router's coordinator with fake replica reports (no Ray, no engine)."""

from __future__ import annotations

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


def test_failed_prefill_replica_is_left_out(coordinator) -> None:
    store(coordinator, "p1", PROMPT[:32])
    ctx = coordinator.context("r", PROMPT)
    coordinator.mark_failed("p1")
    assert coordinator.choose_prefill(ctx).replica_id == "p0"
    coordinator.mark_failed("p0")
    assert coordinator.choose_prefill(ctx) is None
    assert coordinator.choose(ctx).is_local_prefill  # no prefill replica left


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
