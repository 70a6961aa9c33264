"""Synthetic traces in the Mooncake format, for three kinds of prefix reuse.

``shared``  many independent requests behind a few long system prompts (Zipf popularity);
``multiturn`` conversations that resend their growing history each turn, after a think time;
``agent``   agent sessions that start from a common context and branch (parallel tool calls).

A prompt is built from content segments; a 512-token block's id is interned from its parent's id
and the segment pieces it covers, so equal ids mean equal prefixes, as in the public traces.
Sizes follow the public Mooncake traces' scale (prompts of a few thousand to a few tens of
thousands of tokens, outputs of hundreds); every knob is a field of the kind's settings.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence

from benchmarks.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest

Segment = tuple[int, int]  # (segment id, tokens)


class BlockIds:
    """Interns 512-token blocks of segment sequences into Mooncake-style hash ids."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = {}

    def assign(self, segments: Sequence[Segment]) -> tuple[int, ...]:
        ids: list[int] = []
        parent, pieces, filled = -1, [], 0
        for seg_id, length in segments:
            pos = 0
            while pos < length:
                take = min(TRACE_BLOCK_TOKENS - filled, length - pos)
                pieces.append((seg_id, pos, pos + take))
                pos, filled = pos + take, filled + take
                if filled == TRACE_BLOCK_TOKENS:
                    parent = self._intern(parent, pieces)
                    ids.append(parent)
                    pieces, filled = [], 0
        if pieces:
            ids.append(self._intern(parent, pieces))
        return tuple(ids)

    def _intern(self, parent: int, pieces: list[tuple[int, int, int]]) -> int:
        key = (parent, tuple(pieces))
        block_id = self._ids.get(key)
        if block_id is None:
            block_id = self._ids[key] = len(self._ids)
        return block_id


class _Gen:
    """Shared helpers: seeded draws, fresh segment ids, request assembly."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.blocks = BlockIds()
        self._segments = itertools.count()

    def segment(self, tokens: int) -> Segment:
        return (next(self._segments), tokens)

    def lognormal(self, median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, self.rng.lognormvariate(math.log(median), sigma))))

    def zipf_weights(self, n: int, s: float) -> list[float]:
        return [1.0 / (k + 1) ** s for k in range(n)]

    def request(self, t_s: float, segments: Sequence[Segment], output: int) -> TraceRequest:
        return TraceRequest(
            timestamp_ms=round(t_s * 1000.0, 3),
            input_length=sum(length for _, length in segments),
            output_length=output,
            hash_ids=self.blocks.assign(segments),
        )


@dataclasses.dataclass(frozen=True)
class SharedPromptSettings:
    num_requests: int = 30000
    rate_per_s: float = 60.0
    num_system_prompts: int = 16
    system_tokens: tuple[int, int] = (3000, 12000)
    zipf_s: float = 1.0
    user_median_tokens: float = 600.0
    output_median_tokens: float = 200.0


def shared_prompts(s: SharedPromptSettings, seed: int) -> list[TraceRequest]:
    g = _Gen(seed)
    systems = [g.segment(g.rng.randint(*s.system_tokens)) for _ in range(s.num_system_prompts)]
    weights = g.zipf_weights(len(systems), s.zipf_s)
    t, out = 0.0, []
    for _ in range(s.num_requests):
        t += g.rng.expovariate(s.rate_per_s)
        system = g.rng.choices(systems, weights)[0]
        user = g.segment(g.lognormal(s.user_median_tokens, 0.8, 32, 8000))
        output = g.lognormal(s.output_median_tokens, 0.7, 16, 2000)
        out.append(g.request(t, [system, user], output))
    return out


@dataclasses.dataclass(frozen=True)
class MultiTurnSettings:
    num_conversations: int = 6000
    rate_per_s: float = 10.0  # new conversations
    mean_turns: float = 5.0
    max_turns: int = 20
    mean_think_s: float = 30.0
    decode_s_per_token: float = 0.02  # to place the next turn after the answer
    num_system_prompts: int = 8
    system_tokens: tuple[int, int] = (1000, 3000)
    user_median_tokens: float = 250.0
    output_median_tokens: float = 350.0


def multi_turn(s: MultiTurnSettings, seed: int) -> list[TraceRequest]:
    g = _Gen(seed)
    systems = [g.segment(g.rng.randint(*s.system_tokens)) for _ in range(s.num_system_prompts)]
    weights = g.zipf_weights(len(systems), 1.0)
    out: list[TraceRequest] = []
    start = 0.0
    for _ in range(s.num_conversations):
        start += g.rng.expovariate(s.rate_per_s)
        history = [g.rng.choices(systems, weights)[0]]
        turns = min(s.max_turns, 1 + int(g.rng.expovariate(1.0 / (s.mean_turns - 1))))
        t = start
        for _ in range(turns):
            history.append(g.segment(g.lognormal(s.user_median_tokens, 0.9, 16, 4000)))
            output = g.lognormal(s.output_median_tokens, 0.7, 16, 2000)
            out.append(g.request(t, history, output))
            history.append(g.segment(output))
            t += output * s.decode_s_per_token + g.rng.expovariate(1.0 / s.mean_think_s)
    return sorted(out, key=lambda r: r.timestamp_ms)


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    num_sessions: int = 1500
    rate_per_s: float = 2.5  # new sessions
    num_contexts: int = 6
    context_tokens: tuple[int, int] = (8000, 24000)
    task_median_tokens: float = 500.0
    mean_steps: float = 6.0
    fork_probability: float = 0.2
    max_fork_width: int = 3
    max_requests_per_session: int = 40
    tool_median_tokens: float = 800.0
    action_median_tokens: float = 150.0
    mean_tool_s: float = 3.0
    decode_s_per_token: float = 0.02


def agent_branching(s: AgentSettings, seed: int) -> list[TraceRequest]:
    g = _Gen(seed)
    contexts = [g.segment(g.rng.randint(*s.context_tokens)) for _ in range(s.num_contexts)]
    weights = g.zipf_weights(len(contexts), 0.8)
    out: list[TraceRequest] = []
    start = 0.0
    for _ in range(s.num_sessions):
        start += g.rng.expovariate(s.rate_per_s)
        task = g.segment(g.lognormal(s.task_median_tokens, 0.8, 32, 4000))
        root = [g.rng.choices(contexts, weights)[0], task]
        out.extend(_agent_session(g, s, start, root))
    return sorted(out, key=lambda r: r.timestamp_ms)


def _agent_session(
    g: _Gen, s: AgentSettings, start: float, root: list[Segment]
) -> list[TraceRequest]:
    """One session: branches run step by step; a step may fork into parallel branches."""
    requests: list[TraceRequest] = []
    order = itertools.count()
    branches = [(start, next(order), 0, root)]  # (time, tie-break, steps done, history)
    while branches and len(requests) < s.max_requests_per_session:
        t, _, steps, history = heapq.heappop(branches)
        action = g.lognormal(s.action_median_tokens, 0.7, 16, 1500)
        requests.append(g.request(t, history, action))
        if g.rng.random() < 1.0 / s.mean_steps and steps > 0:
            continue  # this branch is done
        width = 1
        if g.rng.random() < s.fork_probability:
            width = g.rng.randint(2, s.max_fork_width)
        base = [*history, g.segment(action)]
        for _ in range(width):
            tool = g.segment(g.lognormal(s.tool_median_tokens, 1.0, 16, 8000))
            done = t + action * s.decode_s_per_token + g.rng.expovariate(1.0 / s.mean_tool_s)
            heapq.heappush(branches, (done, next(order), steps + 1, [*base, tool]))
    return requests


KINDS: dict[str, Callable[[int], list[TraceRequest]]] = {
    "shared": lambda seed: shared_prompts(SharedPromptSettings(), seed),
    "multiturn": lambda seed: multi_turn(MultiTurnSettings(), seed),
    "agent": lambda seed: agent_branching(AgentSettings(), seed),
}


def generate(kind: str, seed: int = 0) -> list[TraceRequest]:
    """A synthetic trace of one kind with its default settings."""
    try:
        make = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(KINDS)}") from None
    return make(seed)
