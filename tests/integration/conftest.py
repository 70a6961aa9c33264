"""Fixtures of the real-stack tests: the demo model and a plain vLLM engine to compare with."""

from __future__ import annotations

import os

import pytest

from cluster.config import EngineConfig


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)

# The corruption test ships a function to the prefill workers through collective_rpc.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@pytest.fixture(scope="session")
def engine_config() -> EngineConfig:
    from deploy.demo_model import ensure_demo_model

    return EngineConfig(model=str(ensure_demo_model()))


@pytest.fixture(scope="session")
def vocab_size(engine_config: EngineConfig) -> int:
    import json
    from pathlib import Path

    return json.loads((Path(engine_config.model) / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="session")
async def reference_engine(engine_config: EngineConfig):
    """One vLLM engine, no connector: the output every PD path must reproduce."""
    from cluster.engine import OpenAIEngine

    engine = await OpenAIEngine.start(engine_config, None, cpu_cores="1")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def reference_outputs(reference_engine):
    """Memoized greedy completions of the reference engine, sent one at a time."""
    cache: dict[tuple, str] = {}

    async def get(body: dict) -> str:
        key = (str(body["prompt"]), body["max_tokens"])
        if key not in cache:
            result = await reference_engine.call("completion", dict(body))
            cache[key] = result["choices"][0]["text"]
        return cache[key]

    return get
