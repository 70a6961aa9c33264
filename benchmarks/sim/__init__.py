"""Trace-driven simulator of the router over simulated prefill and decode replicas.

It runs the real routing code (``router.kvindex``, ``router.policies``, ``router.pairing``)
against replicas that have a finite LRU block cache publishing KV events into the index, a FIFO
prefill server priced per uncached token, and decode slots priced per output token.

- ``trace``: the Mooncake trace format (read, write, block hashes).
- ``generators``: ``generate(kind, seed, scale)``: the textbook kinds of ``synthetic``
  (``shared``, ``multiturn``, ``agent``) and the production-shaped ones of ``traffic``
  (``conversation``, ``tool_agent``, ``mix``); ``builder``: what they are built from.
- ``runner``: ``simulate(requests, setups, settings) -> SimReport``.
- ``setups``: the router setups compared (policy per pool, pairing settings).
- ``cluster``, ``replica``, ``cache``: the simulation; ``reference``: the no-routing references;
  ``report``: metrics and the printed table.

Run ``python -m benchmarks.sim --help``.
"""

from __future__ import annotations

from benchmarks.sim.generators import generate
from benchmarks.sim.runner import SimReport, SimSettings, simulate
from benchmarks.sim.trace import TraceRequest, load_trace, save_trace

__all__ = [
    "SimReport",
    "SimSettings",
    "TraceRequest",
    "generate",
    "load_trace",
    "save_trace",
    "simulate",
]
