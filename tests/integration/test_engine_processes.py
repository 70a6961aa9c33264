"""A real vLLM engine's processes end with the process that started it, even when nothing is
left to stop them (cluster.engine_watch): no Ray here, so no raylet cleans up after it."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from typing import Any

import psutil

from tests.helpers import alive, wait_until

STARTUP_S = 240  # the engine's start, on a busy 2-core machine
ENDED_S = 30  # the watch's poll, vLLM's SIGTERM shutdown, the workers' death pipe


def _replica(model: str, conn: Any) -> None:
    """A stand-in for a replica process: start an engine as pdserve does, report its process
    tree, then wait to be killed."""
    from cluster.config import EngineConfig
    from cluster.engine import OpenAIEngine

    async def main() -> None:
        await OpenAIEngine.start(EngineConfig(model=model), None, cpu_cores="1")
        conn.send([p.pid for p in psutil.Process().children(recursive=True)])
        await asyncio.sleep(3600)

    asyncio.run(main())


def _engine_processes(pids: list[int]) -> list[psutil.Process]:
    processes = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if "VLLM::" in " ".join([process.name(), *process.cmdline()]):
                processes.append(process)
        except psutil.NoSuchProcess:
            pass
    return processes


def test_engine_processes_end_when_their_replica_is_sigkilled(engine_config, capsys) -> None:
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe()
    replica = ctx.Process(target=_replica, args=(engine_config.model, sender))
    replica.start()
    sender.close()  # a replica that dies before it answers ends the wait
    engine: list[psutil.Process] = []
    try:
        assert receiver.poll(STARTUP_S), "the engine did not start"
        engine = _engine_processes(receiver.recv())
        names = sorted(" ".join(p.cmdline()).split()[0] for p in engine)
        assert any("EngineCore" in n for n in names) and any("Worker" in n for n in names), names
        killed_at = time.monotonic()
        os.kill(replica.pid, signal.SIGKILL)
        replica.join(10)
        wait_until(lambda: not any(alive(p) for p in engine),
                   killed_at + ENDED_S - time.monotonic(), 0.2,
                   what=f"the end of engine processes {[p.pid for p in engine]}")
        with capsys.disabled():
            print(f"\nSIGKILL of a process holding an engine: its {len(engine)} engine "
                  f"processes had ended {time.monotonic() - killed_at:.1f} s later")
    finally:
        if not engine and replica.is_alive():  # it failed before it answered
            engine = _engine_processes([p.pid for p in
                                        psutil.Process(replica.pid).children(recursive=True)])
        replica.kill()
        for process in engine:
            if alive(process):
                process.kill()
