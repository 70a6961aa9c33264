"""Engine processes that end with the replica that started them.

A replica's vLLM engine runs in processes of its own: an EngineCore, spawned by the replica,
and its workers, spawned by the EngineCore (which end when it does, through vLLM's death pipe).
vLLM does not end an EngineCore whose parent died. On a running node Ray's raylet does, as it
cleans up after a dead worker; where the raylet goes at the same time (``ray stop --force``, a
node's processes killed together), the EngineCore would live on, holding its cores and its KV
cache memory.

``watch_parent`` is a vLLM general plugin (``vllm.general_plugins`` in pyproject.toml), so vLLM
calls it in every engine process: the frontend (the replica), the EngineCore and each worker.
``OpenAIEngine.start`` sets ``WATCH_ENV`` to the replica's pid before the engine starts, and
the processes vLLM spawns inherit it. In a spawned process that carries it (not the replica
itself), a daemon thread checks every ``POLL_S`` whether the parent is still the process that
spawned it; once it is not, the process ends: SIGTERM (vLLM's shutdown, once the engine is
built; before that vLLM only records it), then SIGKILL ``GRACE_S`` later if it is still there.

It does not run where vLLM forks its processes instead of spawning them (a child inherits the
parent's "plugins loaded" flag; pdserve's engines are spawned: in a Ray actor and on CPUs vLLM
always spawns), where ``VLLM_PLUGINS`` lists plugins without ``pdserve_engine_watch``, or in an
install made before the entry point existed (``pip install -e .`` registers it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

logger = logging.getLogger(__name__)

WATCH_ENV = "PDSERVE_ENGINE_FRONTEND_PID"
POLL_S = 0.5
GRACE_S = 10.0

_is_watching = False


def watch_parent() -> None:
    """vLLM's plugin hook: in a process a pdserve engine spawned, end with its parent."""
    global _is_watching
    parent = multiprocessing.parent_process()
    frontend = os.environ.get(WATCH_ENV)
    if _is_watching or parent is None or parent.pid is None or frontend is None \
            or frontend == str(os.getpid()):
        return  # a replica, or a process no pdserve engine spawned
    _is_watching = True
    threading.Thread(target=_watch, args=(parent.pid,), name="pdserve-parent-watch",
                     daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    logger.error("engine process %d: its parent %d is gone; ending", os.getpid(), parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)
