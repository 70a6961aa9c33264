"""Where the CPU goes while a benchmark runs: each core's busy share and each process's CPU time.

On a small machine the first token can wait for a core rather than for any one component:
an engine pinned to a core shares it with every process that floats over both. ``snapshot()``
before and after a workload, then ``usage()`` says how busy each core was and which processes
(grouped by their title: Ray's ``ray::ServeReplica:app:Deployment``, vLLM's
``VLLM::EngineCore``, ...) spent the CPU time, as cores' worth over the interval.

    before = snapshot(); run(); print(format_usage(usage(before, snapshot())))
"""

from __future__ import annotations

import dataclasses
import re
import time

import psutil

TOP_GROUPS = 12  # the busiest groups shown; the rest are summed into one row


@dataclasses.dataclass(frozen=True)
class Snapshot:
    at_s: float  # monotonic
    cores_busy_s: tuple[float, ...]  # per core: time not idle since boot
    processes: dict[int, tuple[str, float]]  # pid -> (group, user + system CPU seconds)


@dataclasses.dataclass(frozen=True)
class Usage:
    wall_s: float
    cores_busy: tuple[float, ...]  # per core, the share of the interval it was busy
    groups: list[tuple[str, float]]  # (group, cores' worth of CPU), busiest first


def group_of(title: str, affinity: list[int] | None) -> str:
    """A process's group: its title's first word with numbers dropped, and the cores it is
    pinned to when it is pinned to fewer than all."""
    words = title.split()
    name = re.sub(r"\d+", "", words[0] if words else "?")
    name = name.rsplit("/", 1)[-1][:60]
    if affinity is not None and len(affinity) < psutil.cpu_count():
        name += f" [cores {','.join(map(str, affinity))}]"
    return name


def snapshot() -> Snapshot:
    """Now: each core's busy time and every readable process's CPU time."""
    cores = tuple(t.user + t.nice + t.system + t.irq + t.softirq + t.steal
                  for t in psutil.cpu_times(percpu=True))
    processes = {}
    for proc in psutil.process_iter():
        try:
            with proc.oneshot():
                title = " ".join(proc.cmdline()) or proc.name()
                times = proc.cpu_times()
                affinity = proc.cpu_affinity()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        processes[proc.pid] = (group_of(title, affinity),
                               times.user + times.system)
    return Snapshot(time.monotonic(), cores, processes)


def usage(before: Snapshot, after: Snapshot) -> Usage:
    """What was spent between two snapshots. A process started in between counts from 0;
    one that ended in between is not seen (its time is in the cores' busy share only)."""
    wall_s = max(after.at_s - before.at_s, 1e-9)
    cores = tuple(max(0.0, (a - b) / wall_s)
                  for a, b in zip(after.cores_busy_s, before.cores_busy_s, strict=True))
    by_group: dict[str, float] = {}
    for pid, (group, cpu_s) in after.processes.items():
        spent = cpu_s - before.processes.get(pid, (group, 0.0))[1]
        by_group[group] = by_group.get(group, 0.0) + max(0.0, spent) / wall_s
    ranked = sorted(by_group.items(), key=lambda kv: -kv[1])
    groups = ranked[:TOP_GROUPS]
    rest = sum(v for _, v in ranked[TOP_GROUPS:])
    if rest > 0:
        groups.append(("(all others)", rest))
    return Usage(wall_s, cores, groups)


def format_usage(title: str, u: Usage) -> str:
    """A text table: each core's busy share, then each group's CPU in cores' worth."""
    lines = [f"{title} ({u.wall_s:.0f} s; CPU in cores' worth, 1.00 = one core all the time)",
             "  cores busy: " + ", ".join(f"core {i} {b:.2f}" for i, b in
                                         enumerate(u.cores_busy))]
    lines += [f"  {v:5.2f}  {group}" for group, v in u.groups if v >= 0.005]
    return "\n".join(lines)
