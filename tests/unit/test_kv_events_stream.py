"""Unit tests of ``ReplicaStream``: the ordering decisions for one replica's numbered batches."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.kvindex.stream import Action, ReplicaStream, Step, StreamCounters


def applied(actions: list[Action]) -> list[int]:
    return [a.seq for a in actions if a.step is Step.APPLY]


def steps(actions: list[Action]) -> list[tuple[str, int]]:
    return [(a.step.value, a.seq) for a in actions]


def batch(seq: int) -> tuple[int, bytes]:
    return seq, b"batch-%d" % seq


def started(counters: StreamCounters) -> ReplicaStream:
    """A stream with a replay socket whose initial replay found an empty buffer."""
    stream = ReplicaStream(has_replay=True, counters=counters)
    assert steps(stream.start()) == [("replay", 0)]
    assert stream.on_replay_done([]) == []
    return stream


def test_in_order_batches_are_applied_and_duplicates_skipped() -> None:
    counters = StreamCounters()
    stream = ReplicaStream(has_replay=False, counters=counters)
    assert stream.start() == []
    out = [a for seq in (7, 8, 9) for a in stream.on_live(*batch(seq))]
    assert steps(out) == [("apply", 7), ("apply", 8), ("apply", 9)]
    assert out[0].payload == b"batch-7"
    assert counters == StreamCounters()


def test_start_asks_for_the_whole_replay_buffer_and_holds_live_batches() -> None:
    counters = StreamCounters()
    stream = ReplicaStream(has_replay=True, counters=counters)
    assert steps(stream.start()) == [("replay", 0)]
    assert stream.on_live(*batch(5)) == [] and stream.on_live(*batch(6)) == []
    assert stream.num_held == 2
    # The buffer starts at 3 (older batches are gone): learnt from there, overlap skipped.
    out = stream.on_replay_done([batch(3), batch(4), batch(5)])
    assert steps(out) == [("apply", 3), ("apply", 4), ("apply", 5), ("apply", 6)]
    assert not stream.is_replaying and stream.num_held == 0
    assert counters == StreamCounters(num_replays=1)


def test_gap_is_replayed_then_filled_in_order() -> None:
    counters = StreamCounters()
    stream = started(counters)
    assert applied(stream.on_live(*batch(0))) == [0]
    assert steps(stream.on_live(*batch(4))) == [("replay", 1)]
    assert stream.on_live(*batch(5)) == []
    out = stream.on_replay_done([batch(1), batch(2), batch(3), batch(4)])
    assert applied(out) == [1, 2, 3, 4, 5]
    assert counters == StreamCounters(num_gaps=1, num_replays=2)


def test_replay_that_cannot_fill_the_gap_resets_and_rebuilds() -> None:
    counters = StreamCounters()
    stream = started(counters)
    stream.on_live(*batch(0))
    stream.on_live(*batch(9))  # 1..8 lost
    out = stream.on_replay_done([batch(7), batch(8), batch(9)])  # the buffer moved on
    assert steps(out) == [("reset", 0), ("apply", 7), ("apply", 8), ("apply", 9)]
    assert counters == StreamCounters(num_gaps=1, num_replays=2, num_resyncs=1)


def test_timed_out_replay_resets_and_applies_what_was_held() -> None:
    counters = StreamCounters()
    stream = started(counters)
    stream.on_live(*batch(0))
    stream.on_live(*batch(3))
    stream.on_live(*batch(4))
    out = stream.on_replay_done([])  # no answer
    assert steps(out) == [("reset", 0), ("apply", 3), ("apply", 4)]
    assert counters.num_resyncs == 1 and counters.num_gaps == 1


def test_partial_replay_that_made_progress_asks_again() -> None:
    counters = StreamCounters()
    stream = started(counters)
    stream.on_live(*batch(0))
    stream.on_live(*batch(9))
    # The replay lost 4..6 on the way (a full pipe): apply 1..3, then ask from 4.
    out = stream.on_replay_done([batch(1), batch(2), batch(3), batch(7), batch(8)])
    assert steps(out) == [("apply", 1), ("apply", 2), ("apply", 3), ("replay", 4)]
    out = stream.on_replay_done([batch(4), batch(5), batch(6), batch(7), batch(8), batch(9)])
    assert applied(out) == [4, 5, 6, 7, 8, 9]
    assert counters == StreamCounters(num_gaps=2, num_replays=3)


def test_gap_without_replay_resets_at_once() -> None:
    counters = StreamCounters()
    stream = ReplicaStream(has_replay=False, counters=counters)
    stream.on_live(*batch(0))
    assert steps(stream.on_live(*batch(2))) == [("reset", 0), ("apply", 2)]
    assert applied(stream.on_live(*batch(3))) == [3]
    assert counters == StreamCounters(num_gaps=1, num_resyncs=1)


@pytest.mark.parametrize("has_replay", [False, True])
def test_publisher_restart_resets(has_replay: bool) -> None:
    counters = StreamCounters()
    stream = started(counters) if has_replay else ReplicaStream(False, counters)
    stream.on_live(*batch(0))
    stream.on_live(*batch(1))
    out = stream.on_live(*batch(0))  # counting again from 0
    if has_replay:
        assert steps(out) == [("reset", 0), ("replay", 0)]
        out = stream.on_replay_done([batch(0)])
    else:
        assert steps(out)[0] == ("reset", 0)
    assert applied(out) == [0]
    assert counters.num_restarts == 1 and counters.num_resyncs == 1


def test_random_loss_with_a_full_buffer_applies_every_batch_once_in_order() -> None:
    """Whatever the live stream loses, replays from a buffer holding everything fill it."""
    rng = random.Random(5)
    counters = StreamCounters()
    stream = ReplicaStream(has_replay=True, counters=counters)
    out = stream.start()
    published = 0
    for _ in range(300):
        if stream.is_replaying and rng.random() < 0.3:
            start = stream.replaying_from
            out += stream.on_replay_done([batch(s) for s in range(start, published)])
            continue
        seq = published
        published += 1
        if rng.random() < 0.7:
            out += stream.on_live(*batch(seq))
    if stream.is_replaying:
        out += stream.on_replay_done([batch(s) for s in range(stream.replaying_from, published)])
    out += stream.on_live(*batch(published))
    assert applied(out) == list(range(published + 1))
    assert counters.num_resyncs == 0 and counters.num_gaps > 0


@given(
    lost=st.lists(st.booleans(), min_size=1, max_size=60),
    buffer_steps=st.integers(1, 8),
    replay_fails=st.lists(st.booleans(), max_size=20),
    has_replay=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_what_the_index_sees_since_its_last_reset_is_one_unbroken_run(
        lost: list[bool], buffer_steps: int, replay_fails: list[bool], has_replay: bool) -> None:
    """Whatever is lost and however replays fail, the batches applied since the last reset are
    consecutive: the index never misses a removal, so it never credits a block wrongly."""
    counters = StreamCounters()
    stream = ReplicaStream(has_replay=has_replay, counters=counters)
    fails = iter(replay_fails)
    since_reset: list[int] = []

    def run(actions: list[Action]) -> None:
        for action in actions:
            if action.step is Step.RESET:
                since_reset.clear()
            elif action.step is Step.APPLY:
                since_reset.append(action.seq)
                assert since_reset == list(range(since_reset[0], action.seq + 1))

    def serve_replay(published: int) -> None:
        while stream.is_replaying:  # the publisher answers from its bounded buffer
            oldest = max(0, published - buffer_steps)
            start = max(stream.replaying_from, oldest)
            answer = [] if next(fails, False) else [batch(s) for s in range(start, published)]
            run(stream.on_replay_done(answer))

    run(stream.start())
    for seq, is_lost in enumerate(lost):
        if not is_lost:
            run(stream.on_live(*batch(seq)))
        serve_replay(seq + 1)
    if since_reset and not lost[-1]:
        assert since_reset[-1] == len(lost) - 1  # caught up with the last batch delivered
