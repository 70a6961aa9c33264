"""Starting a local Ray cluster: the cores its processes run on (no Ray started here)."""

from __future__ import annotations

import os

import pydantic
import pytest

from cluster.config import PDConfig
from cluster.local import affinity, parse_cores


def test_parse_cores() -> None:
    assert parse_cores("1") == {1}
    assert parse_cores("0-2,5") == {0, 1, 2, 5}


@pytest.mark.parametrize("bad", ["", "a", "1-", "1,,2", " 1"])
def test_serving_cores_must_be_a_core_list(bad: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        PDConfig(serving_cores=bad)


def test_affinity_applies_in_the_block_and_is_restored() -> None:
    before = os.sched_getaffinity(0)
    core = min(before)
    with affinity({core}):
        assert os.sched_getaffinity(0) == {core}
    assert os.sched_getaffinity(0) == before
    with affinity(None):
        assert os.sched_getaffinity(0) == before


def test_a_replica_starts_its_engine_on_its_pools_cores_only_with_serving_cores() -> None:
    import threading

    from cluster.config import PoolConfig
    from deploy.app import _join_pool_cores

    core = min(os.sched_getaffinity(0))
    seen = {}

    def run(name: str, cfg: PDConfig) -> None:  # in a thread: only that thread moves
        _join_pool_cores(cfg, cfg.prefill)
        seen[name] = os.sched_getaffinity(0)

    for name, cfg in (("off", PDConfig(prefill=PoolConfig(cpu_cores=str(core)))),
                      ("on", PDConfig(prefill=PoolConfig(cpu_cores=str(core)),
                                      serving_cores=str(core)))):
        thread = threading.Thread(target=run, args=(name, cfg))
        thread.start()
        thread.join()
    assert seen["off"] == os.sched_getaffinity(0)
    assert seen["on"] == {core}


def test_a_failed_local_start_is_tried_once_more(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """ray.init is faked: the first start fails as it did when Ray's dashboard aborted."""
    import logging

    import ray

    calls: list[str] = []

    def init(**kwargs: object) -> None:
        calls.append("init")
        if calls.count("init") <= failures:
            raise Exception("Failed to read dashboard.err file")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from cluster.local import connect_or_start

    failures = 1
    with caplog.at_level(logging.WARNING, logger="cluster.local"):
        connect_or_start(PDConfig())
    assert calls == ["init", "shutdown", "init"]
    assert "starting it again" in caplog.text
    calls.clear()
    failures = 2
    with pytest.raises(Exception, match="dashboard.err"):
        connect_or_start(PDConfig())
    assert calls == ["init", "shutdown", "init"]
