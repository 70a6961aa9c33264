"""pdserve's vLLM worker extension (transfer health probes, warm-up) and the flags that load it."""

from __future__ import annotations

import pytest

from cluster.worker_extension import (
    EXTENSION_CLS,
    PROBE_METHOD,
    WARM_UP_METHOD,
    PDWorkerExtension,
)


class FakeWorkerSide:
    def __init__(self, reason: str | None) -> None:
        self.reason = reason

    def health(self) -> str | None:
        return self.reason


class FakeConnector:
    def __init__(self, worker_side) -> None:
        self.worker_side = worker_side


@pytest.fixture
def connector_slot(monkeypatch):
    from vllm.distributed.kv_transfer import kv_transfer_state

    def install(connector) -> None:
        monkeypatch.setattr(kv_transfer_state, "_KV_CONNECTOR_AGENT", connector)

    return install


@pytest.mark.parametrize("reason", [None, "producer thread died"])
def test_probe_returns_the_worker_sides_health(connector_slot, reason) -> None:
    connector_slot(FakeConnector(FakeWorkerSide(reason)))
    assert getattr(PDWorkerExtension(), PROBE_METHOD)() == reason


def test_probe_without_a_connector_is_a_reason(connector_slot) -> None:
    connector_slot(None)
    assert "not initialized" in PDWorkerExtension().pdserve_transfer_health()
    connector_slot(FakeConnector(None))
    assert "no worker side" in PDWorkerExtension().pdserve_transfer_health()


def test_extension_fits_vllms_worker_classes() -> None:
    """vLLM refuses an extension with an attribute its worker class already has, and resolves
    the dotted name with importlib."""
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker

    assert resolve_obj_by_qualname(EXTENSION_CLS) is PDWorkerExtension
    own = [a for a in dir(PDWorkerExtension) if not a.startswith("__")]
    assert sorted(own) == sorted([PROBE_METHOD, WARM_UP_METHOD])
    assert not any(hasattr(CPUWorker, name) for name in own)


def test_engine_flags_load_the_extension_and_bind_first_kv_events() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    from cluster.config import EngineConfig
    from cluster.engine import engine_flags, kv_transfer_config, parse_flags

    flags = engine_flags(EngineConfig(), kv_transfer_config("kv_producer", {}), kv_events=True)
    args = AsyncEngineArgs.from_cli_args(parse_flags(flags))
    assert args.worker_extension_cls == EXTENSION_CLS
    events = args.kv_events_config
    assert (events.endpoint, events.replay_endpoint) == ("tcp://*:0", "tcp://*:0")
    plain = engine_flags(EngineConfig(), None)
    assert "--worker-extension-cls" not in plain and "--kv-events-config" not in plain


def test_warm_up_compiles_what_a_logprobs_step_would() -> None:
    """After the warm-up, the sampler's logprob gathering of another batch size compiles
    nothing: the first request that asks for logprobs does not stall the engine's step."""
    import torch
    from torch._dynamo.utils import counters
    from vllm.v1.sample.sampler import Sampler

    class Config:
        def get_vocab_size(self) -> int:
            return 96

    class Worker(PDWorkerExtension):
        model_config = Config()
        device = torch.device("cpu")

    torch._dynamo.reset()
    compiled_before = counters["stats"]["unique_graphs"]
    assert Worker().pdserve_warm_up() > 0
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > compiled_before  # the warm-up compiled it
    with torch.inference_mode():  # as vLLM's model runner samples
        logprobs = torch.randn(7, 96).log_softmax(-1)
        tensors = Sampler.gather_logprobs(logprobs, 2, torch.arange(7))
    assert counters["stats"]["unique_graphs"] == compiled  # the step compiles nothing more
    expected = (logprobs >= logprobs.gather(-1, torch.arange(7)[:, None])).sum(-1)
    assert torch.equal(tensors.selected_token_ranks, expected)


def test_a_failed_warm_up_is_logged_and_the_engine_serves(caplog) -> None:
    import asyncio

    from cluster.engine import warm_up

    class Engine:
        async def collective_rpc(self, method: str) -> list[float]:
            assert method == WARM_UP_METHOD
            raise RuntimeError("no C++ compiler")

    with caplog.at_level("WARNING"):
        asyncio.run(warm_up(Engine()))
    assert "sampler warm-up failed (RuntimeError: no C++ compiler)" in caplog.text
