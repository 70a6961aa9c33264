"""Joint prefill/decode choice: when decode prefills locally, and that the pair is well formed."""

from __future__ import annotations

import copy
import random

import pytest

from router.pairing import PairChoice, PairingSettings, PairSelector
from router.policies import make_policy
from router.policy import Candidate, ReplicaLoad, RoutingContext


def cand(rid: str, queued: int = 0, running: int = 0) -> Candidate:
    return Candidate(rid, ReplicaLoad(num_running=running, queued_prefill_tokens=queued))


PREFILL = (cand("p0"), cand("p1"))
DECODE = (cand("d0"), cand("d1"))


def ctx(prompt: int, cached: dict[str, int]) -> RoutingContext:
    return RoutingContext("r", num_prompt_tokens=prompt, block_size=16, cached_tokens=cached)


def selector(**settings: object) -> PairSelector:
    return PairSelector(
        make_policy("cache_cost", seed=0),
        make_policy("cache_cost", running_seq_tokens=256, seed=0),
        PairingSettings(**settings),
    )


def test_small_remainder_on_the_decode_replica_prefills_locally() -> None:
    choice = selector(local_prefill_max_uncached_tokens=512).select(
        PREFILL, DECODE, ctx(10_000, {"d1": 9_600, "p0": 9_600})
    )
    assert choice == PairChoice(None, DECODE[1]) and choice.is_local_prefill


def test_large_remainder_goes_through_a_prefill_replica() -> None:
    choice = selector(local_prefill_max_uncached_tokens=512).select(
        PREFILL, DECODE, ctx(10_000, {"d1": 8_000, "p0": 8_000})
    )  # the prefill replica caches as much: no advantage in prefilling on the decode replica
    assert choice.prefill is PREFILL[0] and choice.decode is DECODE[1]


def test_both_thresholds_must_hold() -> None:
    s = selector(
        local_prefill_max_uncached_tokens=3_000,
        local_prefill_max_uncached_fraction=0.25,
        local_prefill_cost_factor=0,
    )
    assert s.select(PREFILL, DECODE, ctx(10_000, {"d0": 7_600})).is_local_prefill
    assert not s.select(PREFILL, DECODE, ctx(10_000, {"d0": 7_400})).is_local_prefill  # 26%
    # A short cold prompt is under the token threshold but the decode replica holds none of it.
    assert not s.select(PREFILL, DECODE, ctx(1_000, {})).is_local_prefill


def test_decode_cache_advantage_prefills_locally_up_to_a_cap() -> None:
    s = selector(
        local_prefill_max_uncached_tokens=0,
        local_prefill_cost_factor=2.0,
        local_prefill_max_advantage_tokens=3_000,
    )
    # Decode misses 2000 tokens, the best prefill replica 4000: twice as much -> local.
    assert s.select(PREFILL, DECODE, ctx(10_000, {"d0": 8_000, "p1": 6_000})).is_local_prefill
    # 4001 missing on the decode replica is above the cap.
    assert not s.select(PREFILL, DECODE, ctx(20_000, {"d0": 15_999})).is_local_prefill
    # The prefill replica misses less than twice as much -> remote.
    assert not s.select(PREFILL, DECODE, ctx(10_000, {"d0": 8_000, "p1": 6_500})).is_local_prefill


def test_saturated_prefill_pool_prefills_locally() -> None:
    busy = (cand("p0", queued=50_000), cand("p1", queued=60_000))
    s = selector(local_prefill_max_uncached_tokens=0, prefill_saturation_tokens=40_000)
    assert s.select(busy, DECODE, ctx(10_000, {})).is_local_prefill
    one_free = (cand("p0", queued=50_000), cand("p1", queued=100))
    assert s.select(one_free, DECODE, ctx(10_000, {})).prefill is one_free[1]


def test_backed_up_decode_replica_takes_no_local_prefill() -> None:
    decode = (cand("d0", queued=9_000),)
    s = selector(local_prefill_max_queued_tokens=4_096)
    assert not s.select(PREFILL, decode, ctx(10_000, {"d0": 9_900})).is_local_prefill


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
    for _ in range(300):
        prefill = tuple(cand(f"p{i}", rng.randrange(30_000)) for i in range(rng.randint(1, 4)))
        decode = tuple(
            cand(f"d{i}", rng.randrange(6_000), rng.randrange(60)) for i in range(rng.randint(1, 4))
        )
        prompt = rng.randrange(1, 20_000)
        cached = {c.replica_id: rng.randrange(prompt + 1) for c in prefill + decode}
        context = ctx(prompt, cached)
        before = copy.deepcopy((prefill, decode, context))
        choice = s.select(prefill, decode, context)
        assert any(choice.decode is c for c in decode)
        assert choice.prefill is None or any(choice.prefill is c for c in prefill)
        assert (prefill, decode, context) == before


def test_settings_reject_unknown_fields() -> None:
    with pytest.raises(ValueError):
        PairingSettings(local_threshold=3)  # type: ignore[call-arg]
