"""Is a replica's engine alive, and are its KV transfer threads?

Two halves, in two processes:

- In every worker, pdserve's vLLM worker extension (``cluster.worker_extension``) answers
  ``pdserve_transfer_health``: None when the worker's transfer threads are alive, else why not.
- ``EngineHealth`` runs in the replica, next to the ``AsyncLLM``. ``check()`` raises
  ``UnhealthyError`` when the engine is dead (its EngineCore exited, for example SIGKILLed by the
  OOM killer: vLLM's monitor thread sees the process sentinel even while idle and sets
  ``errored``), when a worker reports a dead transfer thread, or when the workers have not
  answered ``max_probe_failures`` probes in a row. A probe that times out while the engine
  kept stepping (``progress``, its count of engine steps, moved) is not a failure: the workers
  ran those steps, so they are alive, and the answer is only late (a busy machine, or a long
  step ahead of it in the EngineCore's loop). It stays in flight and is counted as late, at
  most ``max_late_probes`` checks in a row; after that, its timeouts are failures again. Ray
  Serve calls the replica's ``check_health``, which calls ``check()``; after three failed checks
  it replaces the replica.

Each new reason is logged once; ``summary()`` tells what the last check found.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from cluster.worker_extension import PROBE_METHOD

logger = logging.getLogger(__name__)


class UnhealthyError(RuntimeError):
    """The replica cannot serve: Ray Serve should replace it."""


PROBE_PERIOD_S = 20.0  # at most one worker probe this often while the workers answer healthy
DEATH_POLL_S = 0.1  # how often a check waiting for the workers looks whether the engine died
ENGINE_DEAD = "engine dead: its EngineCore process exited or failed (EngineDeadError)"


class EngineHealth:
    """Health checks of one ``AsyncLLM`` (``errored``, ``check_health``, ``collective_rpc``).

    With ``probe_workers`` (the engine runs our KV connector) a check also asks each worker
    for its transfer threads, unless the workers answered healthy less than
    ``probe_period_s`` ago; one probe is in flight at a time, and a check waits at most
    ``probe_timeout_s`` for it. Probes are spaced out because each one costs a worker a
    core: a message on vLLM's worker queue (``shm_broadcast.MessageQueue``) makes the worker
    spin (``sched_yield``) for ``busy_loop_s``, 1 s, after it, idle or not.
    """

    def __init__(self, engine: Any, probe_workers: bool, probe_timeout_s: float = 5.0,
                 max_probe_failures: int = 2, probe_period_s: float = PROBE_PERIOD_S,
                 clock: Any = time.monotonic,
                 progress: Callable[[], int] | None = None, max_late_probes: int = 6) -> None:
        if probe_timeout_s <= 0 or max_probe_failures < 1 or probe_period_s < 0 \
                or max_late_probes < 0:
            raise ValueError("probe_timeout_s must be > 0, max_probe_failures >= 1, and "
                             "probe_period_s and max_late_probes >= 0")
        self._engine = engine
        self._probe_workers = probe_workers
        self._probe_timeout_s = probe_timeout_s
        self._max_probe_failures = max_probe_failures
        self._probe_period_s = probe_period_s
        self._clock = clock
        self._progress = progress
        self._progress_at_probe: int | None = None  # progress() when the probe was sent
        self._max_late_probes = max_late_probes
        self._late_in_row = 0  # checks that found the probe in flight late, in a row
        self._healthy_probe_at: float | None = None  # when workers last answered all healthy
        self._probe: asyncio.Task | None = None
        self.reason: str | None = None
        self.num_checks = 0
        self.num_probe_failures = 0  # consecutive
        self.num_probe_failures_total = 0
        self.num_late_probes = 0  # timed out while the engine stepped: not failures
        self.last_check_time: float | None = None
        self.last_probe_error: str | None = None
        self._logged: str | None = None

    @property
    def is_engine_dead(self) -> bool:
        return bool(self._engine.errored)

    async def check(self) -> None:
        """Raise ``UnhealthyError`` when the replica cannot serve; return when it can."""
        reason = await self._find_problem()
        self._record(reason)
        if reason is not None:
            raise UnhealthyError(reason)

    def summary(self) -> dict[str, Any]:
        """What the last check found (and whether the engine is dead right now)."""
        dead = self.is_engine_dead
        reason = ENGINE_DEAD if dead and self.reason is None else self.reason
        return {"healthy": reason is None, "reason": reason, "engine_alive": not dead,
                "num_checks": self.num_checks,
                "consecutive_probe_failures": self.num_probe_failures,
                "num_probe_failures": self.num_probe_failures_total,
                "num_late_probes": self.num_late_probes,
                "last_probe_error": self.last_probe_error,
                "last_check_s_ago": None if self.last_check_time is None
                else round(time.monotonic() - self.last_check_time, 3)}

    async def _find_problem(self) -> str | None:
        if self.is_engine_dead:
            return ENGINE_DEAD
        try:
            await self._engine.check_health()
        except Exception as e:
            return f"engine dead: {type(e).__name__}: {e}"
        if not self._probe_workers or self._recently_probed():
            return None
        return await self._probe_once()

    def _recently_probed(self) -> bool:
        """Whether the workers answered healthy within ``probe_period_s`` (and no probe is in
        flight: a hung one is waited on at every check)."""
        return self._probe is None and self._healthy_probe_at is not None and \
            self._clock() - self._healthy_probe_at < self._probe_period_s

    async def _probe_once(self) -> str | None:
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._engine.collective_rpc(
                PROBE_METHOD, timeout=self._probe_timeout_s))
            self._progress_at_probe = self._steps()
        probe = self._probe
        deadline = time.monotonic() + self._probe_timeout_s
        # A probe sent to an engine that dies never gets an answer: watch for the death.
        while not probe.done() and not self.is_engine_dead and time.monotonic() < deadline:
            await asyncio.wait({probe}, timeout=min(DEATH_POLL_S, deadline - time.monotonic()))
        if not probe.done() and not self.is_engine_dead:
            # One more turn of the loop: an answer (or a step) that came while this loop was
            # held up elsewhere is read now, not taken for a timeout.
            await asyncio.wait({probe}, timeout=DEATH_POLL_S)
        if not probe.done():
            if self.is_engine_dead:
                probe.cancel()
                self._probe = None
                return ENGINE_DEAD
            if self._stepped_since_probe() and self._late_in_row < self._max_late_probes:
                return self._probe_late()  # still in flight: waited on next time
            return self._probe_failed(TimeoutError())  # still in flight: waited on next time
        self._probe = None
        self._late_in_row = 0
        if probe.cancelled() or probe.exception() is not None:
            error = probe.exception() if not probe.cancelled() else RuntimeError("cancelled")
            return ENGINE_DEAD if self.is_engine_dead else self._probe_failed(error)
        self.num_probe_failures = 0
        dead = [f"worker {i}: {answer}" for i, answer in enumerate(probe.result()) if answer]
        if dead:
            return "KV transfer thread dead: " + "; ".join(dead)
        self._healthy_probe_at = self._clock()
        return None

    def _steps(self) -> int | None:
        return None if self._progress is None else self._progress()

    def _stepped_since_probe(self) -> bool:
        steps = self._steps()
        return steps is not None and self._progress_at_probe is not None and \
            steps != self._progress_at_probe

    def _probe_late(self) -> None:
        self.num_late_probes += 1
        self._late_in_row += 1
        self._progress_at_probe = self._steps()  # the next wait needs steps of its own
        if self.num_late_probes == 1:
            logger.warning("workers answered no transfer health probe within %.1f s while the "
                           "engine kept stepping: counted as late, not failed (num_late_probes "
                           "in the health summary)", self._probe_timeout_s)

    def _probe_failed(self, error: BaseException) -> str | None:
        self.num_probe_failures += 1
        self.num_probe_failures_total += 1
        self.last_probe_error = f"no answer within {self._probe_timeout_s:.1f} s" \
            if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
        if self.num_probe_failures == 1:
            logger.warning("workers did not answer a transfer health probe (%s); unhealthy "
                           "after %d in a row", self.last_probe_error, self._max_probe_failures)
        if self.num_probe_failures < self._max_probe_failures:
            return None
        return f"workers did not answer {self._max_probe_failures} transfer health probes " \
            "in a row"

    def _record(self, reason: str | None) -> None:
        self.num_checks += 1
        self.last_check_time = time.monotonic()
        if reason is not None and reason != self._logged:
            logger.error("replica unhealthy: %s", reason)
            self._logged = reason
        elif reason is None and self.reason is not None:
            logger.warning("replica healthy again (was: %s)", self.reason)
            self._logged = None
        self.reason = reason
