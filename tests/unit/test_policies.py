"""The contract every registered routing policy keeps, run against each of them."""

from __future__ import annotations

import copy
import random

import pytest

from router.kvindex import hash_token_blocks
from router.policies import POLICIES, make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext

BLOCK = 16


def random_candidates(rng: random.Random, ids: list[str]) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(
            rid,
            ReplicaLoad(
                num_running=rng.randrange(50),
                num_waiting=rng.randrange(10),
                queued_prefill_tokens=rng.randrange(40_000),
                kv_usage=rng.random(),
            ),
        )
        for rid in ids
    )


def random_context(rng: random.Random, ids: list[str], step: int) -> RoutingContext:
    family = rng.randrange(4)  # a few shared prefixes, so tree-keeping policies see matches
    tokens = [family] * BLOCK * rng.randrange(1, 6) + [rng.randrange(1000) for _ in range(40)]
    cached = {rid: BLOCK * rng.randrange(0, len(tokens) // BLOCK + 1) for rid in ids[:3]}
    return RoutingContext(
        request_id=f"req-{step}",
        num_prompt_tokens=len(tokens),
        block_size=BLOCK,
        prompt_token_ids=tokens,
        cached_tokens=cached,
        block_hashes=hash_token_blocks(tokens, BLOCK),
        now_s=float(step),
    )


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_contract(name: str) -> None:
    rng = random.Random(0)
    policy = make_policy(name)
    assert policy.name == name
    pool = [f"replica-{i}" for i in range(6)]
    for step in range(300):
        if step % 50 == 49:  # replicas leave and join
            pool = [rid for rid in pool if rng.random() > 0.3] or ["replica-x"]
            pool.append(f"replica-new-{step}")
            policy.on_replicas_changed(frozenset(pool))
        ids = rng.sample(pool, rng.randint(1, len(pool)))
        candidates = random_candidates(rng, ids)
        ctx = random_context(rng, ids, step)
        before = (copy.deepcopy(candidates), copy.deepcopy(ctx))
        choice = policy.select(candidates, ctx)
        assert any(choice is c for c in candidates), "must return one of the candidates"
        assert (candidates, ctx) == before, "must not mutate its inputs"
        policy.on_request_done(choice.replica_id, ctx)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_with_one_candidate_and_an_empty_prompt(name: str) -> None:
    policy = make_policy(name)
    only = Candidate("solo", ReplicaLoad(num_running=3))
    assert policy.select([only], RoutingContext("r1", block_size=BLOCK, now_s=0.0)) is only
    ctx = RoutingContext("r2", num_prompt_tokens=5, block_size=BLOCK, now_s=1.0)
    assert policy.select([only], ctx) is only


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_never_picks_a_replica_that_left(name: str) -> None:
    policy = make_policy(name)
    tokens = list(range(64))
    ctx = RoutingContext(
        "r", len(tokens), BLOCK, tokens, {"a": 64}, hash_token_blocks(tokens, BLOCK), 0.0
    )
    first = policy.select([Candidate("a"), Candidate("b")], ctx)
    policy.on_replicas_changed(frozenset({"b", "c"}))
    ctx.now_s = 1.0
    for _ in range(5):
        assert policy.select([Candidate("b"), Candidate("c")], ctx).replica_id in {"b", "c"}
    assert first.replica_id in {"a", "b"}


def test_unknown_policy_is_reported() -> None:
    with pytest.raises(ValueError, match="known: .*cache_cost"):
        make_policy("no_such_policy")
