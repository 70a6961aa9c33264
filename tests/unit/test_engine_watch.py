"""Engine processes end with the process that spawned them (``cluster.engine_watch``), with
real processes: a "replica" spawns an "engine", then is SIGKILLed."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import psutil
import pytest

from cluster import engine_watch
from cluster.engine_watch import WATCH_ENV, watch_parent
from tests.helpers import alive, wait_until

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX process parentage")

SHORT_GRACE_S = 0.5


def _engine(pid_file: str, ignores_sigterm: bool) -> None:
    """The grandchild, as an EngineCore: what vLLM's plugin loading runs, then idle. One that
    ignores SIGTERM stands for an engine whose shutdown does not end it."""
    if ignores_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine_watch.GRACE_S = SHORT_GRACE_S
    watch_parent()
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)


def _replica(pid_file: str, marks: bool, ignores_sigterm: bool) -> None:
    """The child, as a replica: marks its engine as pdserve's (or not), spawns it, waits."""
    if marks:
        os.environ[WATCH_ENV] = str(os.getpid())
    else:
        os.environ.pop(WATCH_ENV, None)
    watch_parent()  # vLLM loads its plugins in the replica too: it must not watch itself
    engine = mp.get_context("spawn").Process(target=_engine, args=(pid_file, ignores_sigterm))
    engine.start()
    time.sleep(120)


@pytest.mark.parametrize(("marks", "ignores_sigterm"), [(True, False), (True, True),
                                                        (False, False)],
                         ids=["sigterm", "sigkill-after-grace", "not-pdserve"])
def test_an_engine_process_ends_when_its_replica_is_killed(
    tmp_path: Path, marks: bool, ignores_sigterm: bool
) -> None:
    """SIGKILL leaves the replica no way to stop its engine: the engine sees its parent change
    and ends, by SIGTERM or, if that does not end it, by SIGKILL after the grace. An engine
    that pdserve did not start is left alone."""
    pid_file = tmp_path / "engine.pid"
    replica = mp.get_context("spawn").Process(target=_replica,
                                              args=(str(pid_file), marks, ignores_sigterm))
    replica.start()
    engine = None
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), 60, 0.05,
                   what="the engine's start")
        engine = psutil.Process(int(pid_file.read_text()))
        assert engine.ppid() == replica.pid
        os.kill(replica.pid, signal.SIGKILL)
        replica.join(10)
        limit_s = 2 * engine_watch.POLL_S + (SHORT_GRACE_S if ignores_sigterm else 0) + 2
        deadline = time.monotonic() + limit_s
        while alive(engine) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(engine) is not marks
    finally:
        replica.kill()
        if engine is not None and alive(engine):
            engine.kill()


@pytest.mark.parametrize(("parent_pid", "frontend", "watches"), [
    (None, "7", False),  # no spawning parent: a Ray worker, as a replica is
    (7, "self", False),  # the frontend that set the variable (a replica spawned by another)
    (7, None, False),  # an engine pdserve did not start
    (7, "8", True),  # an engine process the frontend 8 spawned (directly or not)
])
def test_who_watches(monkeypatch: pytest.MonkeyPatch, parent_pid: int | None,
                     frontend: str | None, watches: bool) -> None:
    class Parent:
        pid = parent_pid

    watched: list[int] = []
    monkeypatch.setattr(engine_watch.multiprocessing, "parent_process",
                        lambda: None if parent_pid is None else Parent())
    monkeypatch.setattr(engine_watch, "_watch", watched.append)  # no thread that could kill
    monkeypatch.setattr(engine_watch, "_is_watching", False)
    if frontend is None:
        monkeypatch.delenv(WATCH_ENV, raising=False)
    else:
        monkeypatch.setenv(WATCH_ENV, str(os.getpid()) if frontend == "self" else frontend)
    watch_parent()
    watch_parent()  # vLLM may load plugins more than once: one watch at most
    if watches:
        wait_until(lambda: watched, 5, what="the watch's thread")
    assert watched == ([parent_pid] if watches else [])


def test_vllm_finds_the_watch_among_its_general_plugins() -> None:
    """The package's entry point, which vLLM's ``load_general_plugins`` loads in every engine
    process (an install made without it would leave orphans again)."""
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("pdserve_engine_watch") == "cluster.engine_watch:watch_parent"
