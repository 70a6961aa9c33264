"""The router as shipped must beat the load-only baselines on every trace generator.

``cache_cost`` runs with the config model's defaults (``cluster.config.RouterConfig``), so this
guards the configuration a deployment runs: on every generator, at a small scale and fixed seeds,
its hit rate must be higher than ``least_loaded``'s and ``round_robin``'s, and its time to first
token lower at the median and at p99.
"""

from __future__ import annotations

import pytest

from benchmarks.sim.generators import KINDS, generate
from benchmarks.sim.runner import SimSettings, simulate
from benchmarks.sim.setups import SETUPS, shipped_setup
from cluster.config import RouterConfig
from router.pairing import PairingSettings

# About a thousand requests of each kind: a second or two of simulation per setup.
SCALES = {
    "shared": 0.04, "multiturn": 0.05, "agent": 0.05,
    "conversation": 0.1, "tool_agent": 0.1, "mix": 0.25,
}
SEEDS = (0, 1)


def test_every_generator_has_a_scale() -> None:
    assert set(SCALES) == set(KINDS)


def test_the_simulated_router_is_the_shipped_one() -> None:
    config = RouterConfig()
    setup = SETUPS["cache_cost"]
    assert setup == shipped_setup(config)
    assert (setup.prefill_policy, setup.decode_policy) == (
        config.prefill_policy, config.decode_policy)
    assert setup.prefill_settings == {"seed": 0, **config.policy_kwargs("prefill")}
    assert setup.decode_settings == {"seed": 0, **config.policy_kwargs("decode")}
    assert setup.pairing == PairingSettings(**config.pairing)


@pytest.mark.parametrize("kind", sorted(SCALES))
@pytest.mark.parametrize("seed", SEEDS)
def test_cache_cost_beats_the_load_only_baselines(kind: str, seed: int) -> None:
    trace = generate(kind, seed, SCALES[kind])
    report = simulate(trace, ["cache_cost", "least_loaded", "round_robin"], SimSettings())
    ours, *baselines = report.rows
    for other in baselines:
        assert ours.hit_rate > other.hit_rate, (kind, seed, ours, other)
        assert ours.ttft_p50_s < other.ttft_p50_s, (kind, seed, ours, other)
        assert ours.ttft_p99_s < other.ttft_p99_s, (kind, seed, ours, other)
