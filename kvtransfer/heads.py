"""Which prefill workers a decode worker pulls its KV heads from, when the TP sizes differ.

vLLM splits a layer's KV heads evenly over the TP ranks: with ``H`` KV heads and TP ``t``, rank
``r`` holds heads ``[r*H/t, (r+1)*H/t)`` when ``t`` divides ``H``, and the one head ``r*H//t``
(replicated on ``t/H`` ranks) when ``H`` divides ``t``. A decode rank needs its own heads; each
may sit on a different prefill rank (prefill TP > decode TP: fan-in) or several decode ranks
need heads of one prefill rank (decode TP > prefill TP: fan-out). ``pull_plan`` says, for one
decode rank, which heads to pull from which prefill rank, and how many decode ranks pull from
that prefill rank (the prefill worker releases its blocks only after that many said DONE).
A replicated head is read from one of its holders, spread over the decode ranks; prefill ranks
nobody reads from are released at once (``released_by``), so their blocks are not held until
the lease ends.

Pipeline stages must match (each decode stage pulls from the prefill stage holding the same
layers): this module is about the TP axis only. An MLA model's latent KV is the same on every
rank: it behaves as ``H = 1``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any


@dataclasses.dataclass(frozen=True)
class Segment:
    """Pull ``num_heads`` heads from prefill TP rank ``source``, starting at its local head
    ``first_head``, into this decode rank's local heads from ``local_first_head``."""

    source: int
    first_head: int
    local_first_head: int
    num_heads: int
    pullers: int  # decode ranks (of this stage) that pull from ``source``


def layout_problem(num_kv_heads: int, tp_size: int) -> str | None:
    """Why vLLM cannot split ``num_kv_heads`` over ``tp_size`` ranks, if it cannot."""
    if num_kv_heads < 1 or tp_size < 1:
        return f"{num_kv_heads} KV heads over TP {tp_size}"
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        return (f"{num_kv_heads} KV heads do not split over TP {tp_size} (one must divide "
                "the other)")
    return None


def pair_problem(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> str | None:
    """Why a prefill TP and a decode TP cannot exchange heads for this model, if they cannot."""
    for side, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        problem = layout_problem(num_kv_heads, tp)
        if problem:
            return f"{side}: {problem}"
    return None


def heads_of(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV heads TP rank ``rank`` holds."""
    if num_kv_heads >= tp_size:
        per_rank = num_kv_heads // tp_size
        return range(rank * per_rank, (rank + 1) * per_rank)
    head = rank * num_kv_heads // tp_size
    return range(head, head + 1)


def _holder(num_kv_heads: int, prefill_tp: int, head: int, decode_rank: int) -> tuple[int, int]:
    """(prefill rank, its local head index) to read global ``head`` from."""
    if num_kv_heads >= prefill_tp:
        per_rank = num_kv_heads // prefill_tp
        return head // per_rank, head % per_rank
    copies = prefill_tp // num_kv_heads  # ranks holding this head: spread the readers
    return head * copies + decode_rank % copies, 0


@functools.lru_cache(maxsize=256)
def _plans(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> tuple[tuple[Segment, ...], ...]:
    problem = pair_problem(num_kv_heads, prefill_tp, decode_tp)
    if problem:
        raise ValueError(problem)
    raw: list[list[list[int]]] = []  # per decode rank: [source, first, local_first, n]
    for rank in range(decode_tp):
        segments: list[list[int]] = []
        for local, head in enumerate(heads_of(num_kv_heads, decode_tp, rank)):
            source, first = _holder(num_kv_heads, prefill_tp, head, rank)
            last = segments[-1] if segments else None
            if last and last[0] == source and last[1] + last[3] == first:
                last[3] += 1
            else:
                segments.append([source, first, local, 1])
        raw.append(segments)
    pullers = [0] * prefill_tp
    for segments in raw:
        for source in {s[0] for s in segments}:
            pullers[source] += 1
    return tuple(tuple(Segment(s, f, lf, n, pullers[s]) for s, f, lf, n in segments)
                 for segments in raw)


def pull_plan(num_kv_heads: int, prefill_tp: int, decode_tp: int,
              decode_rank: int) -> tuple[Segment, ...]:
    """What decode TP rank ``decode_rank`` pulls, one segment per source rank (in head order).
    ValueError when the heads do not split over either TP."""
    return _plans(num_kv_heads, prefill_tp, decode_tp)[decode_rank]


def released_by(num_kv_heads: int, prefill_tp: int, decode_tp: int,
                decode_rank: int) -> tuple[int, ...]:
    """Prefill ranks that no decode rank reads from (replicas of heads read elsewhere), the
    share of them that ``decode_rank`` releases: rank r is released by decode rank r % decode_tp."""
    plans = _plans(num_kv_heads, prefill_tp, decode_tp)
    read = {s.source for plan in plans for s in plan}
    return tuple(r for r in range(prefill_tp) if r not in read and r % decode_tp == decode_rank)


def model_kv_heads(vllm_config: Any) -> tuple[int | None, int | None]:
    """The model's KV heads (all ranks; an MLA latent counts as one) and one TP rank's share;
    (None, None) when the config does not say."""
    model = getattr(vllm_config, "model_config", None)
    if model is None:
        return None, None
    if model.use_mla:
        return 1, 1
    return model.get_total_num_kv_heads(), model.get_num_kv_heads(vllm_config.parallel_config)
