"""What exporting metrics costs: the router's decision and a request's end-to-end latency, with
metrics on and off (``PDConfig.enable_metrics``), measured in one run.

``python -m benchmarks.metrics_overhead [--blocks 262144] [--queries 2000] [--e2e-requests 60]
[--skip-e2e]``

Decision: ``RoutingCoordinator``s in one Ray-connected process, one exporting its metrics through
Ray (decision latency histogram, decision counter, index gauges) and two not, over the same KV
index contents (``--blocks`` blocks on 16 replicas, built as in ``benchmarks.router_cost``) and
the same 8192-token prompts. Each prompt is routed by all three in rotating order, so drift on
this noisy machine hits them alike; one decision is ``context`` (hashing), ``choose`` and
``done``. The two without metrics give a control row: how far apart two identical setups land,
the noise floor of the on/off ratio. A last row times the metric calls of one decision alone.

End to end: two apps side by side on the same two cores (each one prefill replica on core 0 and
one decode replica on core 1, the demo model), one with metrics on, one off. Each of the
``--e2e-requests`` completions (random prompts of 64 to 800 tokens, 16 output tokens) goes to
both, one at a time, in alternating order, after two warm-ups. With metrics on, the engines
export vLLM's and the transfer's metrics and the router its own.

Prints one table of p50, p99 and mean with the on/off ratio.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from benchmarks.router_cost import (
    BLOCK_SIZE,
    make_documents,
    make_events,
    make_queries,
    percentiles,
)

NUM_REPLICAS = 16


def summary(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean) in milliseconds."""
    p50, p99 = percentiles(samples)
    return p50 * 1e3, p99 * 1e3, statistics.fmean(samples) * 1e3


def coordinators(num_blocks: int, rng: random.Random, exports: Sequence[bool]
                 ) -> tuple[list[Any], list]:
    """One coordinator per ``exports`` flag (metrics on or off), over the same index contents;
    and the documents indexed."""
    from router.coordinator import CoordinatorSettings, RoutingCoordinator

    docs = make_documents(rng, num_blocks)
    events = make_events(rng, docs, NUM_REPLICAS)
    built = []
    for enabled in exports:
        c = RoutingCoordinator(CoordinatorSettings(block_size=BLOCK_SIZE, enable_metrics=enabled))
        assert c.metrics.is_enabled == enabled
        for replica, event in events:
            c.index.apply(replica, event)
        half = NUM_REPLICAS // 2
        c.observe("prefill", {f"replica-{i}": {"num_running": i % 3} for i in range(half)})
        c.observe("decode", {f"replica-{i}": {"num_running": i % 3}
                             for i in range(half, NUM_REPLICAS)})
        built.append(c)
    return built, docs


def decide(coordinator: Any, prompt: Sequence[int]) -> float:
    """One routing decision as the ingress makes it; its wall time in seconds."""
    start = time.perf_counter()
    ctx = coordinator.context(uuid.uuid4().hex, prompt)
    choice = coordinator.choose(ctx)
    used = [choice.decode.replica_id] if choice else []
    coordinator.done(ctx, used)
    return time.perf_counter() - start


def decision_rows(num_blocks: int, num_queries: int, seed: int) -> list[Row]:
    """Metrics on against off; a control of off against off (two coordinators alike: the
    noise floor of this comparison); and the metric calls one decision makes, alone."""
    from router.metrics import RouterMetrics

    rng = random.Random(seed)
    (on, off, control), docs = coordinators(num_blocks, rng, (True, False, False))
    queries = make_queries(rng, docs, num_queries)
    times: dict[Any, list[float]] = {on: [], off: [], control: []}
    for i, prompt in enumerate(queries):
        order = (on, off, control)[i % 3:] + (on, off, control)[:i % 3]
        for coordinator in order:
            times[coordinator].append(decide(coordinator, prompt))
    for coordinator in times:
        coordinator.events.close()
    calls = {enabled: [] for enabled in (True, False)}
    for _ in range(num_queries):
        for enabled, metrics in ((True, on.metrics), (False, RouterMetrics(False))):
            start = time.perf_counter()
            metrics.decision_latency(0.002)  # what choose() records
            metrics.decision("transfer")
            calls[enabled].append(time.perf_counter() - start)
    return [("router decision (context, choose, done)", times[on], times[off]),
            ("  control: off against off", times[control], times[off]),
            ("  its metric calls alone", calls[True], calls[False])]


def e2e_rows(num_requests: int, seed: int) -> list[Row]:
    """Two apps side by side, metrics on and off; each request goes to both, in turn."""
    import httpx
    from ray import serve

    from cluster.config import DEMO_MODEL_DIR, PDConfig
    from cluster.local import connect_or_start
    from deploy.app import build_app_from_config
    from deploy.demo_model import ensure_demo_model

    ensure_demo_model(DEMO_MODEL_DIR)
    apps = {enabled: PDConfig(prefill={"cpu_cores": "0"}, decode={"cpu_cores": "1"},
                              enable_metrics=enabled, app_name=f"metrics-{name}",
                              route_prefix=f"/{name}")
            for enabled, name in ((True, "on"), (False, "off"))}
    # Room for both apps' replicas: two of each pool.
    connect_or_start(PDConfig(prefill={"num_replicas": 2}, decode={"num_replicas": 2}))
    serve.start(http_options={"host": "127.0.0.1", "port": E2E_PORT})
    for cfg in apps.values():
        serve.run(build_app_from_config(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(64, 800))]
               for _ in range(num_requests + WARMUPS)]
    times: dict[bool, list[float]] = {True: [], False: []}
    with httpx.Client(base_url=f"http://127.0.0.1:{E2E_PORT}", timeout=120) as client:
        for i, prompt in enumerate(prompts):
            for enabled in (True, False) if i % 2 == 0 else (False, True):
                cfg = apps[enabled]
                body = {"model": cfg.model_name, "prompt": prompt, "max_tokens": 16,
                        "temperature": 0, "ignore_eos": True}
                start = time.perf_counter()
                r = client.post(f"{cfg.route_prefix}/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                if i >= WARMUPS:
                    times[enabled].append(elapsed)
    serve.shutdown()
    return [("end to end, one request at a time", times[True], times[False])]


E2E_PORT = 8011
WARMUPS = 2
Row = tuple[str, list[float], list[float]]


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'measure':<42} {'n':>5}  {'on p50':>8} {'off p50':>8} {'ratio':>6}  "
          f"{'on p99':>8} {'off p99':>8} {'ratio':>6}  {'on mean':>8} {'off mean':>8} "
          f"{'ratio':>6}   (ms)")
    for name, on, off in rows:
        a, b = summary(on), summary(off)
        cells = "  ".join(f"{x:8.3f} {y:8.3f} {x / y:6.3f}" for x, y in zip(a, b, strict=True))
        print(f"{name:<42} {len(on):>5}  {cells}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=262_144)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--e2e-requests", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args(argv)

    import ray

    # A Ray-connected process: only there do the router's metrics export (RouterMetrics).
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    rows = decision_rows(args.blocks, args.queries, args.seed)
    ray.shutdown()
    if not args.skip_e2e:
        rows += e2e_rows(args.e2e_requests, args.seed)
    print_table(rows)


if __name__ == "__main__":
    main()
