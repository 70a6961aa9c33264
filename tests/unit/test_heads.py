"""The head plan between two TP sizes (kvtransfer.heads), checked against vLLM's own split of
KV heads over TP ranks written out independently here."""

from __future__ import annotations

import itertools

import pytest

from kvtransfer.heads import Segment, pair_problem, pull_plan, released_by

HEADS = (1, 2, 3, 4, 6, 8, 16, 32)
TPS = (1, 2, 3, 4, 8, 16)


def vllm_heads(num_kv_heads: int, tp: int, rank: int) -> list[int]:
    """Global heads a TP rank holds, as vLLM splits them: an even share, or one replicated head
    (``tp // num_kv_heads`` consecutive ranks hold each head)."""
    if num_kv_heads >= tp:
        share = num_kv_heads // tp
        return list(range(rank * share, (rank + 1) * share))
    return [rank // (tp // num_kv_heads)]


def valid_triples() -> list[tuple[int, int, int]]:
    return [(h, p, d) for h, p, d in itertools.product(HEADS, TPS, TPS)
            if pair_problem(h, p, d) is None]


@pytest.mark.parametrize(("heads", "prefill_tp", "decode_tp"), valid_triples())
def test_every_decode_rank_gets_exactly_its_heads_from_ranks_holding_them(
        heads: int, prefill_tp: int, decode_tp: int) -> None:
    readers: dict[int, set[int]] = {}
    for rank in range(decode_tp):
        got: list[int] = []
        for seg in pull_plan(heads, prefill_tp, decode_tp, rank):
            assert seg.local_first_head == len(got)  # local heads filled in order, no gap
            source_heads = vllm_heads(heads, prefill_tp, seg.source)
            got += source_heads[seg.first_head:seg.first_head + seg.num_heads]
            assert seg.first_head + seg.num_heads <= len(source_heads)
            readers.setdefault(seg.source, set()).add(rank)
        assert got == vllm_heads(heads, decode_tp, rank)
    for rank in range(decode_tp):
        for seg in pull_plan(heads, prefill_tp, decode_tp, rank):
            assert seg.pullers == len(readers[seg.source])
    # Every prefill rank is read, or released by exactly one decode rank.
    released = [r for rank in range(decode_tp)
                for r in released_by(heads, prefill_tp, decode_tp, rank)]
    assert sorted(released) == sorted(set(range(prefill_tp)) - set(readers))


@pytest.mark.parametrize(("heads", "tp"), [(h, t) for h in HEADS for t in TPS
                                           if pair_problem(h, t, t) is None])
def test_equal_tp_sizes_pair_rank_to_rank_whole(heads: int, tp: int) -> None:
    for rank in range(tp):
        [seg] = pull_plan(heads, tp, tp, rank)
        assert (seg.source, seg.first_head, seg.local_first_head, seg.pullers) == (rank, 0, 0, 1)
        assert seg.num_heads == len(vllm_heads(heads, tp, rank))
        assert released_by(heads, tp, tp, rank) == ()


def test_examples() -> None:
    # Fan-out: one prefill rank with both heads, each of two decode ranks pulls one.
    assert pull_plan(2, 1, 2, 0) == (Segment(0, 0, 0, 1, 2),)
    assert pull_plan(2, 1, 2, 1) == (Segment(0, 1, 0, 1, 2),)
    # Fan-in: a decode rank with 4 of 8 heads pulls two from each of two prefill ranks.
    assert pull_plan(8, 4, 2, 1) == (Segment(2, 0, 0, 2, 1), Segment(3, 0, 2, 2, 1))
    # Replicated heads (2 heads over TP 4): decode TP 1 reads ranks 0 and 2, releases 1 and 3.
    assert [s.source for s in pull_plan(2, 4, 1, 0)] == [0, 2]
    assert released_by(2, 4, 1, 0) == (1, 3)
    # Replicas are spread: decode ranks 0 and 1 (head 0 each) read different prefill ranks.
    assert [pull_plan(1, 2, 2, r)[0].source for r in (0, 1)] == [0, 1]


@pytest.mark.parametrize(("heads", "prefill_tp", "decode_tp", "message"), [
    (6, 4, 2, "prefill: 6 KV heads do not split over TP 4"),
    (8, 2, 3, "decode: 8 KV heads do not split over TP 3"),
    (0, 1, 1, "0 KV heads"),
])
def test_heads_that_do_not_split_are_refused(heads: int, prefill_tp: int, decode_tp: int,
                                             message: str) -> None:
    assert message in pair_problem(heads, prefill_tp, decode_tp)
    with pytest.raises(ValueError, match="split|KV heads"):
        pull_plan(heads, prefill_tp, decode_tp, 0)
