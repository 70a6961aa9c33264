"""Every trace generator by name: ``generate(kind, seed, scale)``.

``shared``, ``multiturn`` and ``agent`` (``synthetic``) are the three textbook kinds of prefix
reuse; ``conversation``, ``tool_agent`` and ``mix`` (``traffic``) have the shapes of public
production traces. ``scale`` shrinks or grows a trace (sessions or window) at the same rates,
so that a unit test can run every kind in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.sim import synthetic, traffic
from benchmarks.sim.trace import TraceRequest

# kind -> (default settings, generator taking (settings, seed))
KINDS: dict[str, tuple[Any, Callable[[Any, int], list[TraceRequest]]]] = {
    "shared": (synthetic.SharedPromptSettings(), synthetic.shared_prompts),
    "multiturn": (synthetic.MultiTurnSettings(), synthetic.multi_turn),
    "agent": (synthetic.AgentSettings(), synthetic.agent_branching),
    "conversation": (traffic.ConversationSettings(), traffic.conversations),
    "tool_agent": (traffic.ToolAgentSettings(), traffic.tool_agents),
    "mix": (traffic.MixSettings(), traffic.mix),
}


def generate(kind: str, seed: int = 0, scale: float = 1.0) -> list[TraceRequest]:
    """A trace of one kind with its default settings, ``scale`` times its default size."""
    try:
        settings, make = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(KINDS)}") from None
    if scale != 1.0:
        settings = settings.scaled(scale)
    return make(settings, seed)
