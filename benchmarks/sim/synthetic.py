"""Synthetic traces in the Mooncake format, for three kinds of prefix reuse.

``shared``  many independent requests behind a few long system prompts (Zipf popularity);
``multiturn`` conversations that resend their growing history each turn, after a think time;
``agent``   agent sessions that start from a common context and branch (parallel tool calls).

Prompts are built from content segments (``builder``). Sizes follow the public Mooncake traces'
scale (prompts of a few thousand to a few tens of thousands of tokens, outputs of hundreds);
every knob is a field of the kind's settings.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools

from benchmarks.sim.builder import Segment, TraceBuilder
from benchmarks.sim.trace import TraceRequest


@dataclasses.dataclass(frozen=True)
class SharedPromptSettings:
    num_requests: int = 30000
    rate_per_s: float = 60.0
    num_system_prompts: int = 16
    system_tokens: tuple[int, int] = (3000, 12000)
    zipf_s: float = 1.0
    user_median_tokens: float = 600.0
    output_median_tokens: float = 200.0

    def scaled(self, factor: float) -> SharedPromptSettings:
        return dataclasses.replace(self, num_requests=max(1, round(self.num_requests * factor)))


def shared_prompts(s: SharedPromptSettings, seed: int) -> list[TraceRequest]:
    g = TraceBuilder(seed)
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

    def scaled(self, factor: float) -> MultiTurnSettings:
        n = max(1, round(self.num_conversations * factor))
        return dataclasses.replace(self, num_conversations=n)


def multi_turn(s: MultiTurnSettings, seed: int) -> list[TraceRequest]:
    g = TraceBuilder(seed)
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

    def scaled(self, factor: float) -> AgentSettings:
        return dataclasses.replace(self, num_sessions=max(1, round(self.num_sessions * factor)))


def agent_branching(s: AgentSettings, seed: int) -> list[TraceRequest]:
    g = TraceBuilder(seed)
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
    g: TraceBuilder, s: AgentSettings, start: float, root: list[Segment]
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
