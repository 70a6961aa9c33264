"""``python -m benchmarks.sim``: replay a trace under several router setups, print a table."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence

from benchmarks.sim.cluster import CostModel
from benchmarks.sim.generators import KINDS, generate
from benchmarks.sim.report import LEGEND, format_table
from benchmarks.sim.runner import SimReport, SimSettings, simulate
from benchmarks.sim.setups import SETUPS
from benchmarks.sim.trace import TRACE_BLOCK_TOKENS, TraceRequest, load_trace, save_trace

DEFAULT_SETUPS = [
    "cache_cost", "sglang_cache_aware", "ray_prefix_affinity", "least_loaded", "round_robin"
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim", description=__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--trace", help="Mooncake-format JSONL trace file")
    source.add_argument(
        "--synthetic", nargs="+", choices=sorted(KINDS), help="generated trace kind(s)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="generated trace seeds")
    p.add_argument("--scale", type=float, default=1.0, help="generated trace size factor")
    p.add_argument("--save-trace", help="write the (first) synthetic trace to this file")
    p.add_argument("--prefill", type=int, default=8, help="prefill replicas")
    p.add_argument("--decode", type=int, default=8, help="decode replicas")
    p.add_argument(
        "--cache-fraction",
        type=float,
        default=0.25,
        help="fraction of the trace's distinct blocks all caches hold together",
    )
    p.add_argument(
        "--utilization",
        type=float,
        default=0.6,
        help="set the prefill speed so the prefill pool is this busy at the reference hit "
        "rate; 0 uses --prefill-tokens-per-s",
    )
    p.add_argument("--prefill-tokens-per-s", type=float, default=20000.0)
    p.add_argument("--policies", nargs="+", default=DEFAULT_SETUPS, choices=sorted(SETUPS))
    return p.parse_args(argv)


def describe(name: str, report: SimReport, elapsed_s: float) -> str:
    return (
        f"trace {name}: {report.num_requests} requests, {report.num_distinct_blocks} distinct "
        f"{TRACE_BLOCK_TOKENS}-token blocks, cache {report.capacity_blocks} blocks per replica, "
        f"prefill {report.prefill_tokens_per_s:.0f} tokens/s per replica "
        f"({elapsed_s:.0f}s to simulate)\n"
        f"hit rate ceiling (one infinite cache) {report.ceiling_hit_rate:.4f}   "
        f"reference (one LRU cache, all replicas' capacity) {report.reference_hit_rate:.4f}   "
        f"(same, half the capacity {report.half_reference_hit_rate:.4f})"
    )


def traces(args: argparse.Namespace) -> Iterator[tuple[str, list[TraceRequest]]]:
    """The trace file, or each generated kind and seed, one at a time."""
    if args.trace:
        yield args.trace, load_trace(args.trace)
        return
    for kind in args.synthetic or list(KINDS):
        for seed in args.seeds:
            yield f"{kind} (seed {seed})", generate(kind, seed, args.scale)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    costs = CostModel(prefill_s_per_token=1.0 / args.prefill_tokens_per_s)
    settings = SimSettings(
        num_prefill=args.prefill,
        num_decode=args.decode,
        cache_fraction=args.cache_fraction,
        utilization=args.utilization or None,
        costs=costs,
    )
    if args.save_trace and not args.trace:
        kind = (args.synthetic or list(KINDS))[0]
        save_trace(generate(kind, args.seeds[0], args.scale), args.save_trace)
    print(LEGEND + "\n")
    for name, requests in traces(args):
        start = time.perf_counter()
        report = simulate(requests, args.policies, settings)
        print(describe(name, report, time.perf_counter() - start))
        print(format_table(report.rows, report.reference_hit_rate))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
