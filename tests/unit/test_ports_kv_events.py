"""KV event sockets: bound first, on the configured host only, never colliding.

Several processes on one node each build vLLM's own KV event publisher from
``cluster.ports.KV_EVENTS_CONFIG`` (what every engine gets), as the engine's scheduler does:
each binds its PUB and replay sockets on ``VLLM_HOST_IP`` with ports of its own, and reports
them; a subscriber receives from every one and every replay socket answers.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from cluster.ports import KV_EVENTS_CONFIG, endpoint_host, kv_event_endpoints

HOST = "127.0.0.1"
NUM_PROCESSES = 3


def publish_until_stopped(host: str, out, stop) -> None:
    """Child: one engine's KV event publisher; publishes a batch every 50 ms until ``stop``."""
    import os

    os.environ["VLLM_HOST_IP"] = host
    import psutil
    from vllm.config.kv_events import KVEventsConfig
    from vllm.distributed.kv_events import (
        AllBlocksCleared,
        EventPublisherFactory,
        KVEventBatch,
    )

    publisher = EventPublisherFactory.create(KVEventsConfig(**KV_EVENTS_CONFIG), 0)
    config = publisher.get_publisher_config()
    listening = [f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    out.put((config.endpoint, config.replay_endpoint, listening))
    while not stop.wait(0.05):
        publisher.publish(KVEventBatch(ts=time.time(), events=[AllBlocksCleared()]))
    publisher.shutdown()


def receive_one(ctx, endpoint: str) -> bool:
    import zmq

    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        return bool(sub.poll(10_000))
    finally:
        sub.close(linger=0)


def replay_ends(ctx, endpoint: str) -> bool:
    """Ask for a replay from sequence 0; True when the end marker comes back."""
    import zmq

    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", (0).to_bytes(8, "big")])
        while sock.poll(10_000):
            frames = sock.recv_multipart()
            if int.from_bytes(frames[-2], "big", signed=True) == -1:
                return True
        return False
    finally:
        sock.close(linger=0)


def test_publishers_in_several_processes_bind_their_own_ports_on_the_host_only() -> None:
    import zmq

    ctx_mp = mp.get_context("spawn")
    out, stop = ctx_mp.Queue(), ctx_mp.Event()
    procs = [ctx_mp.Process(target=publish_until_stopped, args=(HOST, out, stop), daemon=True)
             for _ in range(NUM_PROCESSES)]
    for p in procs:
        p.start()
    try:
        reports = [out.get(timeout=120) for _ in procs]
        endpoints = [e for pub, replay, _ in reports for e in (pub, replay)]
        assert len(set(endpoints)) == 2 * NUM_PROCESSES, endpoints
        assert all(endpoint_host(e) == HOST for e in endpoints), endpoints
        for pub, replay, listening in reports:
            ports = {pub.rsplit(":", 1)[1], replay.rsplit(":", 1)[1]}
            assert sorted(listening) == sorted(f"{HOST}:{p}" for p in ports), listening
        ctx = zmq.Context()
        try:
            assert all(receive_one(ctx, pub) for pub, _, _ in reports)
            assert all(replay_ends(ctx, replay) for _, replay, _ in reports)
        finally:
            ctx.term()
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


class FakeSources:
    def __init__(self, sources) -> None:
        self.engine_core = self
        self._sources = sources

    def get_kv_event_sources(self):
        return self._sources


class Source:
    def __init__(self, endpoint, replay_endpoint) -> None:
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint


def test_kv_event_endpoints_reads_what_the_engine_reports() -> None:
    engine = FakeSources({0: Source("tcp://10.1.2.3:4000", "tcp://10.1.2.3:4001")})
    assert kv_event_endpoints(engine, "10.1.2.3") == ("tcp://10.1.2.3:4000",
                                                      "tcp://10.1.2.3:4001")


@pytest.mark.parametrize("sources, match", [
    ({}, "reported no KV event endpoints"),
    ({0: Source("tcp://10.9.9.9:4000", "tcp://10.1.2.3:4001")}, "not on 10.1.2.3"),
    ({0: Source("tcp://10.1.2.3:4000", None)}, "not on 10.1.2.3"),
])
def test_kv_event_endpoints_refuses_missing_or_foreign_endpoints(sources, match) -> None:
    with pytest.raises(RuntimeError, match=match):
        kv_event_endpoints(FakeSources(sources), "10.1.2.3")


def test_endpoint_host() -> None:
    assert endpoint_host("tcp://10.0.0.1:5557") == "10.0.0.1"
    assert endpoint_host("tcp://[::1]:5557") == "::1"
