"""Traces shaped like public production traffic (chat services, coding agents), Mooncake format.

``conversation``  chat sessions: every prompt starts with one shared 512-token block, the first
                  turn brings a long unique context (a document, pasted code), later turns add
                  the answer and a short user message after minutes of thinking; outputs are
                  short next to the prompts. Most of the prompt is new, so hit rates are low.
``tool_agent``    tool-calling loops: a popular agent prompt (tool schemas), a task, then short
                  tool calls and longer tool results a few seconds apart; prompts grow to tens of
                  thousands of tokens and are almost all cached.
``mix``           both of those plus one-shot long-document prompts behind a few instructions.

Each kind is a Poisson stream of sessions over ``duration_s``; requests after the window are cut,
as in a recorded trace. ``scaled(factor)`` stretches the window and keeps every rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from benchmarks.sim.builder import Segment, TraceBuilder
from benchmarks.sim.trace import TraceRequest


@dataclasses.dataclass(frozen=True)
class ConversationSettings:
    duration_s: float = 3600.0
    sessions_per_s: float = 2.0
    first_block_tokens: int = 512  # every prompt of the trace starts with this block
    opening_median_tokens: float = 7000.0
    opening_sigma: float = 1.0
    opening_max_tokens: int = 60000
    mean_turns: float = 2.0
    max_turns: int = 40
    user_median_tokens: float = 250.0
    output_median_tokens: float = 250.0  # lognormal, sigma 0.8: a mean of about 340
    think_median_s: float = 90.0  # lognormal, sigma 1.0: a mean of about 150 s
    decode_s_per_token: float = 0.02  # places the next turn after the answer

    def scaled(self, factor: float) -> ConversationSettings:
        return dataclasses.replace(self, duration_s=self.duration_s * factor)


@dataclasses.dataclass(frozen=True)
class ToolAgentSettings:
    duration_s: float = 3600.0
    sessions_per_s: float = 0.25
    num_agents: int = 8  # distinct agent prompts (instructions and tool schemas)
    agent_tokens: tuple[int, int] = (3000, 10000)
    task_median_tokens: float = 1000.0
    mean_steps: float = 12.0
    max_steps: int = 60
    action_median_tokens: float = 100.0  # a tool call: the output of every step but the last
    answer_median_tokens: float = 300.0
    tool_median_tokens: float = 800.0  # a tool result: lognormal, sigma 1.2
    tool_max_tokens: int = 16000
    tool_median_s: float = 3.0
    decode_s_per_token: float = 0.02

    def scaled(self, factor: float) -> ToolAgentSettings:
        return dataclasses.replace(self, duration_s=self.duration_s * factor)


@dataclasses.dataclass(frozen=True)
class MixSettings:
    duration_s: float = 1200.0
    conversation: ConversationSettings = ConversationSettings(sessions_per_s=0.6)
    tool_agent: ToolAgentSettings = ToolAgentSettings(sessions_per_s=0.15)
    documents_per_s: float = 1.0  # one-shot prompts: an instruction and a unique document
    num_instructions: int = 4
    instruction_tokens: tuple[int, int] = (1000, 4000)
    document_median_tokens: float = 10000.0
    document_output_median_tokens: float = 100.0

    def scaled(self, factor: float) -> MixSettings:
        return dataclasses.replace(self, duration_s=self.duration_s * factor)


def session_starts(g: TraceBuilder, per_s: float, duration_s: float) -> Iterator[float]:
    """Poisson arrival times of sessions in ``[0, duration_s)``."""
    t = g.rng.expovariate(per_s)
    while t < duration_s:
        yield t
        t += g.rng.expovariate(per_s)


def conversation_session(
    g: TraceBuilder, s: ConversationSettings, start: float, first_block: Segment
) -> list[TraceRequest]:
    opening = g.lognormal(s.opening_median_tokens, 1.0, 64, s.opening_max_tokens)
    history = [first_block, g.segment(opening)]
    turns = min(s.max_turns, 1 + int(g.rng.expovariate(1.0 / (s.mean_turns - 1.0))))
    out, t = [], start
    for _ in range(turns):
        output = g.lognormal(s.output_median_tokens, 0.8, 8, 4000)
        out.append(g.request(t, history, output))
        history += [g.segment(output), g.segment(g.lognormal(s.user_median_tokens, 1.0, 8, 8000))]
        t += output * s.decode_s_per_token + g.seconds(s.think_median_s, 1.0, 5.0, 3600.0)
    return out


def tool_agent_session(
    g: TraceBuilder, s: ToolAgentSettings, start: float, agent: Segment
) -> list[TraceRequest]:
    history = [agent, g.segment(g.lognormal(s.task_median_tokens, 0.8, 32, 8000))]
    steps = min(s.max_steps, 1 + int(g.rng.expovariate(1.0 / (s.mean_steps - 1.0))))
    out, t = [], start
    for step in range(steps):
        median = s.answer_median_tokens if step == steps - 1 else s.action_median_tokens
        output = g.lognormal(median, 0.7, 8, 2000)
        out.append(g.request(t, history, output))
        tool = g.lognormal(s.tool_median_tokens, 1.2, 16, s.tool_max_tokens)
        history += [g.segment(output), g.segment(tool)]
        t += output * s.decode_s_per_token + g.seconds(s.tool_median_s, 1.0, 0.2, 120.0)
    return out


def _conversations(
    g: TraceBuilder, s: ConversationSettings, duration_s: float
) -> list[TraceRequest]:
    first_block = g.segment(s.first_block_tokens)
    out = []
    for start in session_starts(g, s.sessions_per_s, duration_s):
        out.extend(conversation_session(g, s, start, first_block))
    return out


def _tool_agents(
    g: TraceBuilder, s: ToolAgentSettings, duration_s: float
) -> list[TraceRequest]:
    agents = [g.segment(g.rng.randint(*s.agent_tokens)) for _ in range(s.num_agents)]
    weights = g.zipf_weights(len(agents), 1.0)
    out = []
    for start in session_starts(g, s.sessions_per_s, duration_s):
        out.extend(tool_agent_session(g, s, start, g.rng.choices(agents, weights)[0]))
    return out


def _documents(g: TraceBuilder, s: MixSettings) -> list[TraceRequest]:
    instructions = [
        g.segment(g.rng.randint(*s.instruction_tokens)) for _ in range(s.num_instructions)
    ]
    out = []
    for t in session_starts(g, s.documents_per_s, s.duration_s):
        document = g.segment(g.lognormal(s.document_median_tokens, 0.8, 256, 100000))
        output = g.lognormal(s.document_output_median_tokens, 0.8, 8, 2000)
        out.append(g.request(t, [g.rng.choice(instructions), document], output))
    return out


def _window(requests: list[TraceRequest], duration_s: float) -> list[TraceRequest]:
    """The requests inside the recording window, in time order."""
    kept = [r for r in requests if r.timestamp_ms < duration_s * 1000.0]
    return sorted(kept, key=lambda r: r.timestamp_ms)


def conversations(s: ConversationSettings, seed: int) -> list[TraceRequest]:
    return _window(_conversations(TraceBuilder(seed), s, s.duration_s), s.duration_s)


def tool_agents(s: ToolAgentSettings, seed: int) -> list[TraceRequest]:
    return _window(_tool_agents(TraceBuilder(seed), s, s.duration_s), s.duration_s)


def mix(s: MixSettings, seed: int) -> list[TraceRequest]:
    g = TraceBuilder(seed)
    requests = _conversations(g, s.conversation, s.duration_s)
    requests += _tool_agents(g, s.tool_agent, s.duration_s)
    requests += _documents(g, s)
    return _window(requests, s.duration_s)
