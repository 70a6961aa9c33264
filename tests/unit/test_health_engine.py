"""EngineHealth: what makes a replica's check_health raise (fake AsyncLLM, no engine)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cluster.worker_extension import PROBE_METHOD
from cluster.worker_health import EngineHealth, UnhealthyError


class FakeAsyncLLM:
    """The three AsyncLLM members EngineHealth uses; ``answers`` scripts collective_rpc."""

    def __init__(self, answers: list | None = None) -> None:
        self.errored = False
        self.check_health_error: Exception | None = None
        self.answers = list(answers or [])
        self.rpc_calls: list[tuple[str, float | None]] = []
        self.hang = asyncio.Event()  # set: a hanging probe finally answers

    async def check_health(self) -> None:
        if self.check_health_error is not None:
            raise self.check_health_error

    async def collective_rpc(self, method: str, timeout: float | None = None, args=(),
                             kwargs=None):
        self.rpc_calls.append((method, timeout))
        answer = self.answers.pop(0)
        if answer == "hang":
            await self.hang.wait()
            return [None]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make(answers=None, probe=True, **kwargs) -> tuple[FakeAsyncLLM, EngineHealth]:
    engine = FakeAsyncLLM(answers)
    kwargs.setdefault("probe_timeout_s", 0.05)
    kwargs.setdefault("probe_period_s", 0.0)
    return engine, EngineHealth(engine, probe_workers=probe, **kwargs)


async def test_healthy_engine_and_workers() -> None:
    engine, health = make([[None, None]])
    await health.check()
    assert engine.rpc_calls == [(PROBE_METHOD, 0.05)]
    assert health.summary()["healthy"] is True
    assert health.summary()["num_checks"] == 1


async def test_workers_probed_at_most_once_a_period_while_healthy() -> None:
    now = [100.0]
    engine, health = make([[None], [None], ["thread died"], ["thread died"]],
                          probe_period_s=20.0, clock=lambda: now[0])
    await health.check()
    now[0] += 19.9
    await health.check()  # answered healthy 19.9 s ago: not asked again
    assert len(engine.rpc_calls) == 1
    now[0] += 0.1
    await health.check()
    assert len(engine.rpc_calls) == 2
    now[0] += 20.0
    with pytest.raises(UnhealthyError, match="worker 0: thread died"):
        await health.check()
    now[0] += 1.0
    with pytest.raises(UnhealthyError):  # an unhealthy answer is not kept for a period
        await health.check()
    assert len(engine.rpc_calls) == 4


async def test_dead_engine_raises_without_asking_the_workers() -> None:
    engine, health = make([[None]])
    engine.errored = True
    with pytest.raises(UnhealthyError, match="engine dead"):
        await health.check()
    assert engine.rpc_calls == []
    summary = health.summary()
    assert summary["healthy"] is False and summary["engine_alive"] is False


async def test_engine_check_health_error_raises() -> None:
    engine, health = make(probe=False)
    engine.check_health_error = RuntimeError("EngineCore encountered an issue")
    with pytest.raises(UnhealthyError, match="EngineCore encountered an issue"):
        await health.check()


async def test_no_probe_without_a_connector() -> None:
    engine, health = make(probe=False)
    await health.check()
    assert engine.rpc_calls == []


async def test_dead_transfer_thread_raises_at_once_and_names_the_worker() -> None:
    engine, health = make([[None, "consumer notifier thread died"]])
    with pytest.raises(UnhealthyError, match="worker 1: consumer notifier thread died"):
        await health.check()


async def test_probe_timeouts_count_only_in_a_row() -> None:
    engine, health = make(["hang"], max_probe_failures=2)
    await health.check()  # one timeout: tolerated
    assert health.num_probe_failures == 1
    with pytest.raises(UnhealthyError, match="did not answer 2 transfer health probes"):
        await health.check()
    # Still one probe in flight: the hung one is waited on again, not duplicated.
    assert len(engine.rpc_calls) == 1
    engine.hang.set()
    await asyncio.sleep(0)
    engine.answers.append([None])
    await health.check()  # the late answer counts: healthy again, counter reset
    assert health.num_probe_failures == 0
    assert health.summary()["num_probe_failures"] == 2
    assert health.summary()["healthy"] is True


async def test_a_late_probe_is_no_failure_while_the_engine_steps(caplog) -> None:
    steps, stepping = [0], [True]

    def progress() -> int:  # the engine's step count: it moves between two reads while stepping
        steps[0] += stepping[0]
        return steps[0]

    engine, health = make(["hang"], max_probe_failures=1, progress=progress)
    with caplog.at_level(logging.WARNING, logger="cluster.worker_health"):
        await health.check()
        await health.check()  # still unanswered, still stepping: late again, not failed
    assert health.num_probe_failures == 0 and health.num_late_probes == 2
    assert health.summary()["num_late_probes"] == 2 and health.summary()["healthy"] is True
    assert sum("counted as late" in r.getMessage() for r in caplog.records) == 1
    assert len(engine.rpc_calls) == 1  # the same probe, waited on again
    # The engine stops stepping and the probe is still unanswered: that is a failure.
    stepping[0] = False
    with pytest.raises(UnhealthyError, match="did not answer 1 transfer health probes"):
        await health.check()
    engine.hang.set()
    await asyncio.sleep(0)
    engine.answers.append([None])
    await health.check()
    assert health.summary()["healthy"] is True


async def test_a_probe_late_for_too_many_checks_fails_although_the_engine_steps() -> None:
    steps = iter(range(1000))
    engine, health = make(["hang"], max_probe_failures=1, max_late_probes=2,
                          progress=lambda: next(steps))
    await health.check()
    await health.check()
    assert health.num_late_probes == 2
    with pytest.raises(UnhealthyError, match="did not answer 1 transfer health probes"):
        await health.check()


async def test_rpc_errors_count_like_timeouts() -> None:
    engine, health = make([RuntimeError("boom"), [None], RuntimeError("boom"),
                           RuntimeError("boom")], max_probe_failures=2)
    await health.check()
    await health.check()  # success resets the streak
    await health.check()
    with pytest.raises(UnhealthyError, match="did not answer 2"):
        await health.check()
    assert health.summary()["last_probe_error"] == "RuntimeError: boom"
    assert len(engine.rpc_calls) == 4


async def test_engine_dying_during_a_probe_reports_engine_dead() -> None:
    engine, health = make([RuntimeError("socket closed")])

    async def die_then_fail(method, timeout=None, args=(), kwargs=None):
        engine.errored = True
        raise RuntimeError("socket closed")

    engine.collective_rpc = die_then_fail
    with pytest.raises(UnhealthyError, match="engine dead"):
        await health.check()


async def test_reason_logged_once_and_recovery_logged(caplog) -> None:
    engine, health = make(probe=False)
    engine.errored = True
    with caplog.at_level(logging.WARNING, logger="cluster.worker_health"):
        for _ in range(5):
            with pytest.raises(UnhealthyError):
                await health.check()
        engine.errored = False
        await health.check()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("replica unhealthy" in m for m in messages) == 1
    assert sum("healthy again" in m for m in messages) == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        EngineHealth(FakeAsyncLLM(), probe_workers=True, probe_timeout_s=0)
    with pytest.raises(ValueError):
        EngineHealth(FakeAsyncLLM(), probe_workers=True, max_probe_failures=0)
    with pytest.raises(ValueError):
        EngineHealth(FakeAsyncLLM(), probe_workers=True, probe_period_s=-1)
    with pytest.raises(ValueError):
        EngineHealth(FakeAsyncLLM(), probe_workers=True, max_late_probes=-1)


def test_summary_sees_a_death_before_the_next_check() -> None:
    engine, health = make(probe=False)
    assert health.summary()["healthy"] is True
    engine.errored = True
    assert health.summary()["healthy"] is False


async def test_engine_dying_while_a_probe_waits_is_seen_within_the_poll() -> None:
    """A probe sent to an engine that dies never gets an answer: the check must not wait for
    its whole timeout."""
    engine, health = make(["hang"], probe_timeout_s=5.0)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, setattr, engine, "errored", True)
    started = loop.time()
    with pytest.raises(UnhealthyError, match="engine dead"):
        await health.check()
    assert loop.time() - started < 1.0
    assert health._probe is None  # the orphaned probe was cancelled, not kept
