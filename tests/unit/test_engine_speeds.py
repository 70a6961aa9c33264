"""An engine's measured decode step time and prefill speed, from vLLM's per-step statistics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.speeds import EngineSpeeds


def step(computed: int = 0, latencies: tuple[float, ...] = (), finished: tuple = ()) -> object:
    """What ``vllm.v1.metrics.stats.IterationStats`` carries that the meter reads."""
    return SimpleNamespace(
        prompt_token_stats=SimpleNamespace(computed=computed),
        inter_token_latencies_iter=list(latencies),
        finished_requests=list(finished),
    )


def finished(prompt: int, cached: int, prefill_s: float) -> object:
    return SimpleNamespace(num_prompt_tokens=prompt, num_cached_tokens=cached,
                           prefill_time=prefill_s)


def test_decode_step_time_comes_from_decode_only_steps() -> None:
    speeds = EngineSpeeds(alpha=0.5)
    assert speeds.decode_step_s == 0.0  # not measured yet
    speeds.record(step(latencies=(0.020, 0.022)))
    assert speeds.decode_step_s == pytest.approx(0.021)
    speeds.record(step(computed=512, latencies=(0.300,)))  # a step with a prefill: left out
    assert speeds.decode_step_s == pytest.approx(0.021)
    speeds.record(step(latencies=(0.031,)))
    assert speeds.decode_step_s == pytest.approx(0.026)


def test_prefill_speed_comes_from_requests_that_computed_their_prompt() -> None:
    speeds = EngineSpeeds(alpha=0.5, min_prefill_tokens=64)
    speeds.record(step(finished=(finished(1000, 0, 0.1),)))
    assert speeds.prefill_tokens_per_s == pytest.approx(10_000)
    # Loaded by KV transfer (one token computed) or mostly cached: no sample.
    speeds.record(step(finished=(finished(1000, 999, 0.5), finished(100, 60, 0.2))))
    assert speeds.prefill_tokens_per_s == pytest.approx(10_000)
    speeds.record(step(finished=(finished(2000, 1000, 0.05),)))  # 20k tokens/s
    assert speeds.prefill_tokens_per_s == pytest.approx(15_000)
