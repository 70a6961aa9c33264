"""Metrics of a simulated run and the table the simulator prints."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from benchmarks.sim.cluster import SimOutcome


@dataclasses.dataclass(frozen=True)
class SetupMetrics:
    label: str
    hit_rate: float  # cached prompt tokens / prompt tokens
    prefill_imbalance: float  # max / mean over prefill replicas of time-averaged queued tokens
    # The same queue in seconds of work, on the most loaded prefill replica: the ratio above is
    # of small numbers when queues are short, this says how long they are.
    prefill_queue_max_s: float
    prefill_work_imbalance: float  # max / mean over prefill replicas of prefill time spent
    decode_imbalance: float  # max / mean over decode replicas of time-averaged running sequences
    local_fraction: float  # requests prefilled on their decode replica
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p99_s: float  # decode time per output token, local prefill stalls included
    transfer_tokens_per_request: float


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean > 0 else 1.0


def summarize(label: str, outcome: SimOutcome) -> SetupMetrics:
    jobs = outcome.jobs
    prompt = sum(j.request.input_length for j in jobs)
    hits = sum(j.hit_tokens for j in jobs)
    return SetupMetrics(
        label=label,
        hit_rate=hits / prompt if prompt else 0.0,
        prefill_imbalance=max_over_mean([r.queued_tokens_integral for r in outcome.prefill]),
        prefill_queue_max_s=max(
            (r.queued_tokens_integral / r.prefill_tokens_per_s / outcome.duration_s
             for r in outcome.prefill if outcome.duration_s > 0), default=0.0,
        ),
        prefill_work_imbalance=max_over_mean([r.prefill_busy_s for r in outcome.prefill]),
        decode_imbalance=max_over_mean([r.running_integral for r in outcome.decode]),
        local_fraction=sum(j.is_local for j in jobs) / len(jobs) if jobs else 0.0,
        ttft_p50_s=percentile(outcome.ttft_s, 50),
        ttft_p99_s=percentile(outcome.ttft_s, 99),
        tpot_p99_s=percentile(
            [(j.done_s - j.decode_start_s) / max(1, j.request.output_length) for j in jobs], 99
        ),
        transfer_tokens_per_request=outcome.transfer_tokens / len(jobs) if jobs else 0.0,
    )


LEGEND = (
    "hit: cached prompt tokens / prompt tokens; load max/mean over a pool's replicas of: "
    "P queue: time-averaged queued prefill tokens, P work: prefill time spent, D run: "
    "time-averaged running sequences; P wait: the most loaded prefill replica's time-averaged "
    "queued work, in seconds; local: requests prefilled on their decode replica; "
    "TPOT includes stalls from local prefills; xfer: KV tokens moved per request"
)


def format_table(rows: Sequence[SetupMetrics], reference_hit_rate: float) -> str:
    header = (
        f"{'policy':<20} {'hit':>6} {'hit/ref':>7} {'P queue':>7} {'P work':>6} {'D run':>6} "
        f"{'P wait':>9} "
        f"{'local':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p99':>9} {'xfer tok/req':>12}"
    )
    lines = [header, "-" * len(header)]
    for m in rows:
        ratio = m.hit_rate / reference_hit_rate if reference_hit_rate else 0.0
        lines.append(
            f"{m.label:<20} {m.hit_rate:>6.4f} {ratio:>7.4f} {m.prefill_imbalance:>7.2f} "
            f"{m.prefill_work_imbalance:>6.2f} {m.decode_imbalance:>6.2f} "
            f"{m.prefill_queue_max_s:>8.3f}s "
            f"{m.local_fraction:>6.1%} {m.ttft_p50_s:>8.3f}s "
            f"{m.ttft_p99_s:>8.3f}s {m.tpot_p99_s * 1000:>7.1f}ms "
            f"{m.transfer_tokens_per_request:>12.0f}"
        )
    return "\n".join(lines)
