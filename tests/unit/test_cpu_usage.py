"""benchmarks/cpu_usage.py: per-core busy shares and per-group CPU between two snapshots."""

from __future__ import annotations

import psutil

from benchmarks.cpu_usage import Snapshot, format_usage, group_of, snapshot, usage


def test_group_of_drops_numbers_and_names_pinned_cores() -> None:
    all_cores = list(range(psutil.cpu_count()))
    assert group_of("ray::ServeReplica:pdserve:router", all_cores) == \
        "ray::ServeReplica:pdserve:router"
    assert group_of("/usr/bin/python3.11 -m x", None) == "python."
    if len(all_cores) > 1:
        assert group_of("VLLM::Worker_PP0", [0]) == "VLLM::Worker_PP [cores 0]"


def test_usage_sums_groups_over_the_interval() -> None:
    before = Snapshot(10.0, (5.0, 7.0), {1: ("a", 1.0), 2: ("a", 2.0), 3: ("b", 0.5)})
    after = Snapshot(12.0, (6.0, 9.0), {1: ("a", 2.0), 2: ("a", 2.5), 3: ("b", 0.5),
                                        4: ("c", 0.4)})
    u = usage(before, after)
    assert u.wall_s == 2.0
    assert u.cores_busy == (0.5, 1.0)
    assert u.groups == [("a", 0.75), ("c", 0.2), ("b", 0.0)]
    text = format_usage("t", u)
    assert "core 0 0.50, core 1 1.00" in text and "0.75  a" in text
    assert "  b" not in text  # under 0.005 of a core: left out


def test_snapshot_sees_this_process_spend_cpu() -> None:
    before = snapshot()
    sum(i * i for i in range(300_000))
    after = snapshot()
    u = usage(before, after)
    assert sum(v for _, v in u.groups) > 0
    assert len(u.cores_busy) == psutil.cpu_count()
