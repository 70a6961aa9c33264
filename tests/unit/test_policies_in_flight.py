"""The prompts a policy sent and that have not finished: prefix matching, removal, expiry."""

from __future__ import annotations

from router.policies.in_flight import InFlightPrompts


def test_matches_the_longest_prefix_each_replica_will_hold() -> None:
    in_flight = InFlightPrompts(ttl_s=60.0, sample_tokens=1)
    in_flight.add("a", "r0", [1, 2, 3], 1, now_s=0.0)
    in_flight.add("b", "r1", [1, 2, 7, 8], 1, now_s=0.0)
    assert in_flight.matched_blocks([1, 2, 3, 4], 1) == {"r0": 3, "r1": 2}
    assert in_flight.matched_blocks([1, 2, 7, 8, 9], 1) == {"r0": 2, "r1": 4}
    assert in_flight.matched_blocks([5, 1], 1) == {}


def test_removal_counts_requests_that_share_blocks() -> None:
    in_flight = InFlightPrompts(ttl_s=60.0, sample_tokens=1)
    in_flight.add("a", "r0", [1, 2], 1, now_s=0.0)
    in_flight.add("b", "r0", [1, 2, 3], 1, now_s=0.0)
    in_flight.remove("b")
    assert in_flight.matched_blocks([1, 2, 3], 1) == {"r0": 2}
    in_flight.remove("a")
    in_flight.remove("a")  # twice, or never added: nothing happens
    assert in_flight.matched_blocks([1, 2, 3], 1) == {} and len(in_flight) == 0


def test_a_request_routed_again_replaces_its_entry() -> None:
    in_flight = InFlightPrompts(ttl_s=60.0, sample_tokens=1)
    in_flight.add("a", "r0", [1, 2], 1, now_s=0.0)
    in_flight.add("a", "r1", [1, 2], 1, now_s=1.0)  # a retry on another replica
    assert in_flight.matched_blocks([1, 2], 1) == {"r1": 2} and len(in_flight) == 1


def test_entries_expire_after_their_ttl() -> None:
    in_flight = InFlightPrompts(ttl_s=10.0, sample_tokens=1)
    in_flight.add("a", "r0", [1], 1, now_s=0.0)
    in_flight.add("b", "r1", [2], 1, now_s=5.0)
    in_flight.expire(now_s=12.0)
    assert in_flight.matched_blocks([1], 1) == {} and in_flight.matched_blocks([2], 1) == {"r1": 1}


def test_long_prompts_are_matched_at_sampled_positions() -> None:
    in_flight = InFlightPrompts(ttl_s=60.0, sample_tokens=64)  # every 4th block of 16 tokens
    prompt = list(range(100, 140))  # 40 blocks
    in_flight.add("a", "r0", prompt, 16, now_s=0.0)
    assert in_flight.matched_blocks(prompt, 16) == {"r0": 40}
    assert in_flight.matched_blocks(prompt[:23] + [7] * 17, 16) == {"r0": 20}  # rounded down
    assert in_flight.matched_blocks(prompt[:3], 16) == {}  # shorter than one sample
