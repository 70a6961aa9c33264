"""Bandwidth of the KV links between two processes on one host, against a memcpy.

``python -m benchmarks.transfer_bw [--sizes 64K,1M,256M] [--repeats 10]
[--links gloo,shm,shm-view,cross-core]``

Two spawned processes pair through a TCPStore, as the transfer endpoints do (the prefill side
as rank 0, the decode side as rank 1), and take each kind in turn. For every size, after a
warm-up, each repeat moves one uint8 CPU tensor: both processes meet at a barrier, the
receiver says (in shared memory) that it is about to receive, and ``--lead-us`` later the
sender starts. The time runs until the receiver has the bytes (one monotonic clock for both
processes), and both meet at a second barrier before the next repeat:

- ``gloo`` (``TorchDistLink`` on the CPU) and ``shm`` (``ShmLink``): from the start of
  ``send`` to the return of ``recv``;
- ``shm-view``: the endpoints' path. The sender copies its bytes into ``ShmLink.send_view``
  (as the prefill worker gathers blocks into it; untimed, like the gather before a ``send``),
  and the time runs from the end of that copy to the end of the receiver's copy out of
  ``recv_view`` (as the decode worker scatters);
- ``cross-core``: no link, a reference. The sender copies its bytes into shared memory and
  raises a flag; the time runs from the end of that copy to the end of the receiver's copy
  out: the copy any link between two cores makes, without a link's protocol;
- ``reads``: no link and no copy on the sender's side, the path of ``direct_reads``
  (``kvtransfer.reads``). The sender raises a flag; the time runs from there to the end of the
  receiver's ``process_vm_readv`` of the sender's own tensor into its own.

The receiver checks every byte: each repeat sends other bytes, so a stale or partial transfer
fails the run. The memcpy is ``dst.copy_(src)`` of the same bytes in this process. Prints one
table of medians.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

HOST = "127.0.0.1"
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M,256M"
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
LINKS = {"gloo": "kvtransfer.link:TorchDistLink", "shm": "kvtransfer.link_shm:ShmLink",
         "shm-view": "kvtransfer.link_shm:ShmLink"}
VIEWS = "shm-view"
BARE_COPY = "cross-core"  # no link: the receiver copies what the sender just wrote to shared memory
READS = "reads"  # no link: the receiver reads the sender's tensor itself (process_vm_readv)
NO_LINK = (BARE_COPY, READS)
WARMUP = 2
TIMEOUT_S = 60.0


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def format_size(num_bytes: int) -> str:
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if num_bytes >= unit and num_bytes % unit == 0:
            return f"{num_bytes // unit} {suffix}iB"
    return f"{num_bytes} B"


def make_link(kind: str, store: Any, rank: int) -> Any:
    import importlib

    import torch

    if kind not in LINKS:  # NO_LINK
        return None
    module, name = LINKS[kind].split(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(store, f"bench/{kind}", rank, torch.device("cpu"), HOST, TIMEOUT_S)


def lead(seconds: float) -> None:
    """Busy-wait (a sleep this short would overshoot)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_rank(rank: int, port: int, links: list[str], sizes: list[int], repeats: int,
             lead_s: float, threads: int, pin: bool, barrier: Any, ready: Any,
             written: Any, shared: Any, source: Any, results: Any) -> None:
    """One end: for each link and size, send (rank 0) or receive and check (rank 1)."""
    import torch
    import torch.distributed as dist

    from kvtransfer.reads import read_bytes

    torch.set_num_threads(threads)
    if pin:  # as deployed: the prefill and decode engines on cores of their own
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    try:
        store = dist.TCPStore(HOST, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=TIMEOUT_S))
        tag = 0
        for kind in links:
            link = make_link(kind, store, rank)
            for size in sizes:
                data = torch.randint(0, 256, (size,), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(size))
                received = torch.zeros(size, dtype=torch.uint8)
                bare = torch.frombuffer(shared, dtype=torch.uint8, count=size) \
                    if kind == BARE_COPY else None
                if kind == READS and rank == 0:  # where the receiver reads from
                    source[0], source[1] = os.getpid(), data.data_ptr()
                times = []
                for i in range(WARMUP + repeats):
                    data.add_(1)  # other bytes every repeat, the same on both sides
                    tag += 1
                    barrier.wait()
                    if rank == 0:
                        while ready.value != tag:  # until the receiver is about to recv
                            pass
                        lead(lead_s)
                        if kind in NO_LINK:
                            if bare is not None:
                                bare.copy_(data)
                            times.append(time.perf_counter())
                            written.value = tag
                        elif kind == VIEWS:
                            with link.send_view(size, tag) as view:
                                view.copy_(data)  # as the producer gathers into it: untimed
                                times.append(time.perf_counter())
                        else:
                            times.append(time.perf_counter())
                            link.send(data, tag)
                    else:
                        ready.value = tag
                        if kind in NO_LINK:
                            while written.value != tag:
                                pass
                            if bare is not None:
                                received.copy_(bare)
                            else:
                                read_bytes(source[0], source[1], received.data_ptr(), size)
                        elif kind == VIEWS:
                            with link.recv_view(size, tag) as view:
                                received.copy_(view)  # as the consumer scatters from it
                        else:
                            link.recv(received, tag)
                        times.append(time.perf_counter())
                    barrier.wait()  # the sender's next bytes must not compete with this recv
                    if rank == 1 and not torch.equal(received, data):
                        raise AssertionError(f"{kind}: {size} bytes differ (repeat {i})")
                results.put((rank, kind, size, times[WARMUP:]))
            if link is not None:
                link.close()
    except BaseException as e:
        barrier.abort()
        results.put((rank, "error", 0, repr(e)))
        raise


def memcpy_s(size: int, repeats: int) -> float:
    import torch

    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(WARMUP + repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def measure(links: list[str], sizes: list[int], repeats: int, lead_s: float, threads: int,
            pin: bool) -> dict[Any, float]:
    """Median seconds per transfer, keyed by (link, size)."""
    import torch.distributed as dist

    master = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=TIMEOUT_S)
    ready = ctx.Value("q", 0, lock=False)  # the tag the receiver is about to recv
    written = ctx.Value("q", 0, lock=False)  # the tag the sender wrote (no-link kinds only)
    shared = ctx.RawArray("B", max(sizes) if BARE_COPY in links else 1)
    source = ctx.RawArray("Q", 2)  # the sender's pid and tensor address (reads only)
    results = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(rank, master.port, links, sizes, repeats,
                                                lead_s, threads, pin, barrier, ready,
                                                written, shared, source, results))
             for rank in (0, 1)]
    for p in procs:
        p.start()
    times: dict[Any, list[float]] = {}
    for _ in range(2 * len(links) * len(sizes)):
        rank, kind, size, got = results.get(timeout=10 * TIMEOUT_S)
        if kind == "error":
            for p in procs:
                p.join(TIMEOUT_S)
            raise SystemExit(f"rank {rank} failed: {got}")
        times[rank, kind, size] = got
    for p in procs:
        p.join(TIMEOUT_S)
    medians = {}
    for kind in links:
        for size in sizes:
            pairs = zip(times[0, kind, size], times[1, kind, size], strict=True)
            medians[kind, size] = statistics.median(end - start for start, end in pairs)
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="comma-separated sizes, e.g. 64K,1M,256M (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10,
                        help=f"timed transfers per size and link, after {WARMUP} warm-up")
    parser.add_argument("--links", default="gloo,shm,shm-view,cross-core,reads",
                        help="link kinds: gloo, shm, shm-view, cross-core, reads (default: "
                             "%(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process, memcpy included (default: %(default)s; "
                             "two processes with more threads than cores stall each other)")
    parser.add_argument("--pin", action="store_true",
                        help="pin rank r to core r, as a deployment pins its engines")
    parser.add_argument("--lead-us", type=float, default=20.0,
                        help="how long after the receiver entered recv the sender starts "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    links = [k.strip() for k in args.links.split(",")]
    unknown = set(links) - {*LINKS, *NO_LINK}
    if unknown:
        parser.error(f"unknown links: {sorted(unknown)}")
    seconds = measure(links, sizes, args.repeats, args.lead_us * 1e-6, args.threads,
                      args.pin)
    import torch

    torch.set_num_threads(args.threads)
    header = f"{'size':>9} {'memcpy GB/s':>12}" + "".join(
        f" {kind + ' GB/s':>10} {'ratio':>6}" for kind in links)
    print(header)
    for size in sizes:
        copy_gbps = size / memcpy_s(size, args.repeats) / 1e9
        row = f"{format_size(size):>9} {copy_gbps:>12.1f}"
        for kind in links:
            gbps = size / seconds[kind, size] / 1e9
            row += f" {gbps:>10.2f} {gbps / copy_gbps:>6.0%}"
        print(row)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
