"""Joint prefill/decode choice: when decode prefills locally, its stall budget, and that the pair
is well formed."""

from __future__ import annotations

import copy
import random

import pytest

from router.pairing import PairChoice, PairingSettings, PairSelector
from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext
from router.stall_budget import StallBudget

SPEED = 10_000.0  # prompt tokens per second every replica reports
STEP_S = 0.02


def cand(rid: str, queued: int = 0, running: int = 0) -> Candidate:
    load = ReplicaLoad(num_running=running, queued_prefill_tokens=queued,
                       prefill_tokens_per_s=SPEED, decode_step_s=STEP_S)
    return Candidate(rid, load)


PREFILL = (cand("p0"), cand("p1"))
DECODE = (cand("d0", running=4), cand("d1", running=4))


def ctx(prompt: int, cached: dict[str, int], now_s: float = 0.0) -> RoutingContext:
    return RoutingContext("r", num_prompt_tokens=prompt, block_size=16, cached_tokens=cached,
                          now_s=now_s)


def selector(**settings: object) -> PairSelector:
    return PairSelector(
        make_policy("cache_cost", seed=0),
        make_policy("cache_cost", running_seq_tokens=1024, seed=0),
        PairingSettings(**settings),
    )


def test_a_prompt_the_decode_replica_holds_is_prefilled_there() -> None:
    choice = selector().select(PREFILL, DECODE, ctx(10_000, {"d1": 9_990, "p0": 9_990}))
    assert choice == PairChoice(None, DECODE[1]) and choice.is_local_prefill


def test_cold_prompts_go_to_the_prefill_pool() -> None:
    s = selector()
    for prompt in (16, 400, 10_000):
        choice = s.select(PREFILL, (cand("d0"),), ctx(prompt, {}))
        assert not choice.is_local_prefill  # even on an idle decode replica
    # A small shared prefix (the same block everywhere) does not make a prompt warm.
    everywhere = {r: 512 for r in ("p0", "p1", "d0", "d1")}
    assert not s.select(PREFILL, DECODE, ctx(12_000, everywhere)).is_local_prefill


def test_a_remainder_the_prefill_replicas_also_lack_goes_through_them() -> None:
    # Both pools hold the history (the last turn went through p0 to d1): no reason to stall d1.
    choice = selector().select(PREFILL, DECODE, ctx(10_000, {"d1": 9_000, "p0": 9_000}))
    assert choice.prefill is PREFILL[0] and choice.decode is DECODE[1]


def test_decode_cache_advantage_prefills_locally_within_the_budget() -> None:
    s = selector(local_prefill_cost_factor=2.0, local_prefill_max_uncached_fraction=0.5)
    # The prefill pool evicted the history; decode misses 1000 tokens, every prefill replica
    # at least 2000: local.
    assert s.select(PREFILL, DECODE, ctx(10_000, {"d0": 9_000, "p1": 8_000})).is_local_prefill
    # The prefill replica misses less than twice as much: remote.
    assert not s.select(PREFILL, DECODE, ctx(10_000, {"d0": 9_000, "p1": 8_500})).is_local_prefill
    # The decode replica holds less than half the prompt: remote however little the pool holds.
    assert not s.select(PREFILL, DECODE, ctx(10_000, {"d0": 4_000})).is_local_prefill


def test_a_conversation_sent_away_from_its_busy_prefill_replica_is_prefilled_on_decode() -> None:
    """p0 holds the history (9,000 of 10,000 tokens) but has 100 s of prefill queued: the
    prefill policy sends the turn to the idle p1, which would compute all 10,000 tokens. Its
    decode replica holds the history too and computes the 1,000 new tokens itself; the prefill
    policy is told the request went elsewhere. With p0 idle, the turn goes back to p0."""
    s = selector()
    busy_home = (cand("p0", queued=1_000_000), cand("p1"))
    history = {"p0": 9_000, "d0": 9_000}
    assert selector().prefill_policy.select(busy_home, ctx(10_000, history)) is busy_home[1]
    turn = ctx(10_000, history)
    turn.block_hashes = list(range(10_000 // 16))  # so that the policy records it in flight
    choice = s.select(busy_home, DECODE[:1], turn)
    assert choice.is_local_prefill and choice.decode is DECODE[0]
    assert len(s.prefill_policy._in_flight) == 0  # recorded, then taken back
    assert s.select(PREFILL, DECODE[:1], ctx(10_000, history)).prefill is PREFILL[0]


def test_a_hot_prefix_copied_to_another_prefill_replica_is_not_pulled_to_decode() -> None:
    """p0 and d0 hold a 4,096-token system prompt; p0 has 0.8 s queued, p1 is idle. Once many
    requests reuse the prompt, the prefill policy copies it to p1 on purpose. p1 is charged
    512 tokens plus its share of the 4,096-token copy (which the requests that follow share,
    while the index does not list p1 yet), under twice decode's 512: decode's cache advantage
    pulls none of them to d0, as it would if the pairing counted p1's 4,608 uncached tokens."""

    def select(s: PairSelector, i: int) -> PairChoice:
        request = ctx(4_608, {"p0": 4_096, "d0": 4_096}, now_s=0.01 * i)
        request.request_id = f"q{i}"
        request.block_hashes = [hash(("system", b)) for b in range(256)] + [i, i + 1]
        return s.select((cand("p0", queued=8_000), cand("p1")), (cand("d0"),), request)

    s = PairSelector(make_policy("cache_cost", seed=0, reuse_horizon_s=10.0),
                     make_policy("cache_cost", seed=0), PairingSettings())
    choices = [select(s, i) for i in range(40)]
    where = ["local" if c.is_local_prefill else c.prefill.replica_id for c in choices]
    first_copy = where.index("p1")
    assert where[:first_copy] == ["p0"] * first_copy and first_copy >= 3
    assert where[first_copy:] == ["p1"] * (40 - first_copy)  # none pulled to d0
    # A request the policy did not just select is charged its uncached tokens.
    request = ctx(4_608, {"d0": 4_096, "p0": 4_096}, now_s=0.0)
    assert s.prefill_policy.charged_tokens(cand("p1"), request) == 4_608


def test_the_stall_budget_bounds_local_prefills_on_a_busy_decode_replica() -> None:
    # Factor 1.25: a fifth of the time may go to local prefill, at most a 1 s window's worth
    # (0.2 s: 2000 tokens at 10k tokens/s) at once.
    s = selector(itl_target_factor=1.25, itl_window_s=1.0)
    big = {"d0": 7_000}  # 3000 uncached on d0 (0.3 s), 10k on every prefill replica
    assert not s.select(PREFILL, DECODE[:1], ctx(10_000, big)).is_local_prefill
    fits = {"d0": 8_500}  # 0.15 s
    assert s.select(PREFILL, DECODE[:1], ctx(10_000, fits, now_s=0.0)).is_local_prefill
    # 0.05 s of credit left: the same stall again does not fit until the budget refills.
    assert not s.select(PREFILL, DECODE[:1], ctx(10_000, fits, now_s=0.1)).is_local_prefill
    assert s.select(PREFILL, DECODE[:1], ctx(10_000, fits, now_s=1.0)).is_local_prefill


def test_an_idle_decode_replica_takes_any_wanted_local_prefill() -> None:
    s = selector(itl_target_factor=1.25, itl_window_s=1.0)
    idle = (cand("d0", running=0),)
    assert s.select(PREFILL, idle, ctx(100_000, {"d0": 60_000})).is_local_prefill


def test_no_stall_is_allowed_at_factor_one_or_above_an_absolute_target() -> None:
    assert not selector(itl_target_factor=1.0).select(
        PREFILL, DECODE, ctx(10_000, {"d0": 9_990})).is_local_prefill
    # Step 20 ms: a 15 ms target leaves nothing; 40 ms leaves half the time.
    assert not selector(itl_target_ms=15).select(
        PREFILL, DECODE, ctx(10_000, {"d0": 9_990})).is_local_prefill
    assert selector(itl_target_ms=40).select(
        PREFILL, DECODE, ctx(10_000, {"d0": 9_990})).is_local_prefill


def test_saturated_prefill_pool_sends_cold_prompts_to_decode() -> None:
    busy = (cand("p0", queued=500_000), cand("p1", queued=600_000))  # 50 s and 60 s queued
    s = selector(prefill_saturation_s=30.0)
    assert s.select(busy, (cand("d0"),), ctx(10_000, {})).is_local_prefill
    one_free = (cand("p0", queued=500_000), cand("p1", queued=100))
    assert s.select(one_free, (cand("d0"),), ctx(10_000, {})).prefill is one_free[1]


def test_local_prefill_can_be_disabled() -> None:
    s = selector(enable_local_prefill=False)
    assert not s.select(PREFILL, DECODE, ctx(10_000, {"d0": 10_000})).is_local_prefill


def test_no_prefill_replica_means_local_and_no_decode_replica_is_an_error() -> None:
    s = selector(enable_local_prefill=False)
    assert s.select((), DECODE, ctx(100, {})).is_local_prefill
    with pytest.raises(ValueError):
        s.select(PREFILL, (), ctx(100, {}))


def test_choices_come_from_the_candidates_and_inputs_stay_untouched() -> None:
    rng = random.Random(0)
    s = selector()
    for i in range(300):
        prefill = tuple(cand(f"p{i}", rng.randrange(30_000)) for i in range(rng.randint(1, 4)))
        decode = tuple(
            cand(f"d{i}", rng.randrange(6_000), rng.randrange(60)) for i in range(rng.randint(1, 4))
        )
        prompt = rng.randrange(1, 20_000)
        cached = {c.replica_id: rng.randrange(prompt + 1) for c in prefill + decode}
        context = ctx(prompt, cached, now_s=float(i))
        before = copy.deepcopy((prefill, decode, context))
        choice = s.select(prefill, decode, context)
        assert any(choice.decode is c for c in decode)
        assert choice.prefill is None or any(choice.prefill is c for c in prefill)
        assert (prefill, decode, context) == before


def test_stall_budget_refills_at_its_fraction_up_to_one_window() -> None:
    budget = StallBudget(window_s=2.0)
    assert budget.credit_s("d", 0.25, now_s=0.0) == pytest.approx(0.5)  # a full window
    budget.take("d", 0.4, 0.25, now_s=0.0)
    assert budget.credit_s("d", 0.25, now_s=0.0) == pytest.approx(0.1)
    assert budget.credit_s("d", 0.25, now_s=1.0) == pytest.approx(0.35)
    assert budget.credit_s("d", 0.25, now_s=100.0) == pytest.approx(0.5)  # capped
    assert not budget.can_take("d", 0.2, 0.25, now_s=0.0)
    assert not budget.can_take("other", 0.0, 0.0, now_s=0.0)  # nothing allowed at fraction 0
    budget.take("d", 1.0, 0.25, now_s=0.0)  # a debt, waited out before the next one
    assert not budget.can_take("d", 0.01, 0.25, now_s=3.0)
    assert budget.can_take("d", 0.01, 0.25, now_s=4.0)


def test_settings_reject_unknown_fields() -> None:
    with pytest.raises(ValueError):
        PairingSettings(local_threshold=3)  # type: ignore[call-arg]
