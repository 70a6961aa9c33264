"""How long one KV pull takes when each side's engine thread runs Python.

``python -m benchmarks.pull_latency [--pulls 30] [--blocks 64] [--link gloo|shm|reads]``

A prefill process (a ``ProducerEndpoint`` holding the blocks) and a decode process (a
``ConsumerEndpoint`` pulling them into its own cache), the bench model's KV shape (8 layers,
8 KV heads of 64, bf16, 16-token blocks: 64 blocks are a 1,024-token prompt, 16 MiB); torch
runs one thread per process, as in an engine worker given one core. The endpoints' threads
live in the engine's process and share its GIL. Each row: the pull's time from ``submit`` to
its result, median and p90 over ``--pulls``, with the processes' engine threads idle, then
running Python without pause (as a vLLM worker's thread does between its tensor operations).
A transfer thread gets the GIL back after each wait (a control reply, the link, a torch call)
only when the engine's thread lets go of it: at its next tensor operation, or after Python's
switch interval (5 ms).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

NUM_LAYERS, NUM_HEADS, HEAD_SIZE, BLOCK_SIZE = 8, 8, 64, 16
HOST = "127.0.0.1"
TIMEOUT_S = 30.0


def make_caches(num_blocks: int, fill: float) -> dict[str, Any]:
    """One CPU-layout tensor per layer: [blocks, heads, block_size, 2 * head]. Torch runs one
    thread, as in an engine worker given one core."""
    import torch

    torch.set_num_threads(1)

    shape = (num_blocks, NUM_HEADS, BLOCK_SIZE, 2 * HEAD_SIZE)
    return {f"model.layers.{i}.self_attn.attn": torch.full(shape, fill + i, dtype=torch.bfloat16)
            for i in range(NUM_LAYERS)}


def link_factory(kind: str) -> Any:
    """The link of ``kind``; ``reads`` (direct reads, ``kvtransfer.reads``) keeps shm's as the
    fallback, which it does not use here."""
    from kvtransfer.link import TorchDistLink
    from kvtransfer.link_shm import same_host_link

    return TorchDistLink if kind == "gloo" else same_host_link


class Engine:
    """A thread that keeps running Python (small loops, as an engine's code between ops)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        total = 0
        while not self._stop.is_set():
            for i in range(1000):
                total += i * i


def producer_main(conn: Any, num_blocks: int, link: str, num_transfers: int) -> None:
    """The prefill process: hold ``num_transfers`` transfers of the same blocks, serve pulls."""
    from kvtransfer.blocks import KVLayout
    from kvtransfer.holds import HoldTable
    from kvtransfer.producer import ProducerEndpoint

    caches = make_caches(num_blocks, 1.0)
    layout = KVLayout.from_caches(caches, num_blocks, BLOCK_SIZE)
    holds = HoldTable()
    for i in range(num_transfers):
        holds.add(f"t-{i}", f"req-{i}", list(range(num_blocks)), 3600.0)
    endpoint = ProducerEndpoint(HOST, 0, caches, layout, holds, TIMEOUT_S,
                                link_factory=link_factory(link), direct_reads=link == "reads")
    engine = Engine()
    conn.send(endpoint.address[1])
    while (busy := conn.recv()) is not None:
        engine.stop()
        if busy:
            engine.start()
        conn.send("ok")
    engine.stop()
    endpoint.close()


def run(pulls: int, num_blocks: int, link: str) -> list[tuple[str, float, float]]:
    from kvtransfer.blocks import KVLayout
    from kvtransfer.consumer import ConsumerEndpoint
    from kvtransfer.metadata import LoadSpec
    from kvtransfer.reads import CacheRegions

    cases = (False, True)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=producer_main,
                        args=(child_conn, num_blocks, link, pulls * (len(cases) + 1)))
    child.start()
    port = conn.recv()
    caches = make_caches(num_blocks, 0.0)
    layout = KVLayout.from_caches(caches, num_blocks, BLOCK_SIZE)
    consumer = ConsumerEndpoint(HOST, 0, caches, layout, TIMEOUT_S, 2.0,
                                link_factory=link_factory(link),
                                regions=CacheRegions.of(caches, layout) if link == "reads"
                                else None)
    engine = Engine()
    transfer = 0

    def pull() -> float:
        nonlocal transfer
        spec = LoadSpec(f"t-{transfer}", f"req-{transfer}", [(HOST, port)], 0,
                        list(range(num_blocks)))
        transfer += 1
        start = time.perf_counter()
        consumer.submit(spec)
        while True:
            got = consumer.take_results()
            if got.finished or got.failed:
                if got.failed:
                    raise RuntimeError(f"pull of {spec.transfer_id} failed")
                return time.perf_counter() - start
            time.sleep(0.0002)

    rows = []
    try:
        pull()  # pair the link
        channel = next(iter(consumer._channels.values()))
        if (link == "reads") != (channel._remote is not None):
            raise RuntimeError(f"asked for {link}, but the pair reads: {channel._remote}")
        for busy in cases:
            conn.send(busy)
            conn.recv()
            engine.stop()
            if busy:
                engine.start()
            times = sorted(pull() for _ in range(pulls))
            label = "busy (running Python)" if busy else "idle"
            rows.append((label, statistics.median(times), times[int(0.9 * (len(times) - 1))]))
        sent = make_caches(1, 1.0)  # one block of what the prefill process holds
        for name, tensor in caches.items():  # the bytes really moved
            if not bool((tensor == sent[name][0]).all()):
                raise RuntimeError(f"layer {name} was not copied")
    finally:
        engine.stop()
        conn.send(None)
        child.join(30)
        consumer.close()
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pulls", type=int, default=30)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--link", choices=("gloo", "shm", "reads"), default="gloo")
    args = parser.parse_args(argv)
    rows = run(args.pulls, args.blocks, args.link)
    mib = args.blocks * NUM_LAYERS * NUM_HEADS * BLOCK_SIZE * 2 * HEAD_SIZE * 2 / (1 << 20)
    print(f"one pull of {args.blocks} blocks ({mib:g} MiB) over {args.link}; "
          f"{args.pulls} pulls per row")
    print(f"{'engine threads':<34} {'median':>9} {'p90':>9}")
    for label, median, p90 in rows:
        print(f"{label:<34} {median * 1e3:>7.2f}ms {p90 * 1e3:>7.2f}ms")


if __name__ == "__main__":
    main()
