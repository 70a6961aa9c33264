"""Metrics on the real stack: the app on a local Ray cluster, a mix of requests, then the node's
Prometheus endpoint must show every family the dashboard reads, tagged with role and ReplicaId,
with values that agree with the traffic and with the replicas' own counters."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import grpc
import httpx
import pytest

from cluster.scrape import scrape, total
from router.grpc_api import pdserve_pb2_grpc
from tests.integration.support import (
    MAX_TOKENS,
    completion_body,
    completion_request,
    deployed,
    one_pair_config,
    wait_until,
)

APP = "pdserve-metrics"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve.json"
# Dashboard families this traffic does not make: failures, refusals, expiries, retries.
NOT_PROVOKED = {"ray_pdserve_kv_num_failed_transfers_total",
                "ray_pdserve_kv_num_refused_holds_total",
                "ray_pdserve_kv_num_expired_holds_total",
                "ray_pdserve_router_decode_retries_total",
                "ray_pdserve_router_replica_failures_total",
                "ray_serve_num_http_error_requests_total",
                "ray_serve_num_grpc_error_requests_total"}


@pytest.fixture(scope="module")
def app(engine_config):
    """Deploy the app once for the module; yield where it serves HTTP and gRPC."""
    with deployed(one_pair_config(engine_config, APP)) as d:
        yield d


async def send_traffic(client: httpx.AsyncClient, stub, cfg, vocab_size: int) -> dict[str, int]:
    """By HTTP, 4 plain and 3 streaming single-prompt requests and one of 2 prompts (all
    disaggregated), and one asking for its prompt's logprobs (prefilled on decode); by gRPC, 2
    unary and 1 streaming single-prompt requests (disaggregated). Returns the completion
    tokens the clients received, by kind, and how many requests and engine requests of each
    path there were."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in (5, 40, 130, 300)]
    # completion tokens by kind; "single": single-prompt requests, "streams": streamed ones
    # "transferred": engine requests loaded by transfer
    received = {"plain": 0, "stream": 0, "batch": 0, "grpc": 0, "local": 0, "single": 0,
                "streams": 0, "transferred": 2}
    for prompt in prompts:
        r = await client.post("/v1/completions", json=completion_body(cfg, prompt))
        assert r.status_code == 200, r.text
        received["plain"] += r.json()["usage"]["completion_tokens"]
        received["single"] += 1
    for prompt in prompts[:3]:
        body = completion_body(cfg, prompt[::-1], stream=True,
                               stream_options={"include_usage": True})
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        received["stream"] += events[-1]["usage"]["completion_tokens"]
        received["streams"] += 1
        received["single"] += 1
    r = await client.post("/v1/completions",
                          json=completion_body(cfg, [prompts[3], prompts[1][:9]]))
    assert r.status_code == 200, r.text
    received["batch"] += r.json()["usage"]["completion_tokens"]
    r = await client.post("/v1/completions",
                          json=completion_body(cfg, prompts[0][1:], prompt_logprobs=1))
    assert r.status_code == 200, r.text
    received["local"] += r.json()["usage"]["completion_tokens"]
    for prompt in prompts[1:3]:
        answer = await stub.Completion(completion_request(cfg.name, prompt[1:]))
        received["grpc"] += answer.usage.completion_tokens
        received["single"] += 1
    request = completion_request(cfg.name, prompts[2][2:])
    request.extra.update({"stream_options": {"include_usage": True}})
    chunks = [c async for c in stub.StreamCompletion(request)]
    received["grpc"] += chunks[-1].usage.completion_tokens
    received["streams"] += 1
    received["single"] += 1
    received["transferred"] += received["single"]
    return received


async def replica_call(role: str, method: str) -> dict:
    from ray import serve

    return await getattr(serve.get_deployment_handle(role, APP), method).remote()


def expected_values(received: dict[str, int], prefill: dict, decode: dict) -> dict:
    """(metric, role) -> its value on that role's replica, from the traffic and the replicas'
    own counters (``stats()``)."""
    num_transferred = received["transferred"]
    return {
        ("ray_vllm_generation_tokens_total", "decode"): sum(
            received[k] for k in ("plain", "stream", "batch", "grpc", "local")),
        ("ray_vllm_generation_tokens_total", "prefill"): num_transferred,  # one token each
        ("ray_vllm_time_to_first_token_seconds_count", "decode"): num_transferred + 1,
        ("ray_pdserve_kv_bytes_transferred_total", "decode"): decode["num_bytes_received"],
        ("ray_pdserve_kv_bytes_transferred_total", "prefill"): prefill["num_bytes_sent"],
        ("ray_pdserve_kv_num_transfers_total", "decode"): decode["num_loads"],
        # one duration and one block count per successful load
        ("ray_pdserve_kv_xfer_time_seconds_count", "decode"): decode["num_loads"],
        ("ray_pdserve_kv_num_blocks_per_transfer_count", "decode"): decode["num_loads"],
        ("ray_pdserve_kv_num_held_blocks", "prefill"): prefill["num_held_blocks"],
    }


TRANSFER_PHASES = ("route", "prefill_queue", "prefill_compute", "prefill_hops", "decode")


async def test_metrics_follow_the_traffic(app, engine_config, vocab_size, capsys):
    async with httpx.AsyncClient(base_url=app.url, timeout=120) as client, \
            grpc.aio.insecure_channel(app.grpc_target) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        received = await send_traffic(client, stub, engine_config, vocab_size)
        routing = (await client.get("/routing")).json()
    assert received["plain"] == 4 * MAX_TOKENS and received["batch"] == 2 * MAX_TOKENS
    assert received["grpc"] == 3 * MAX_TOKENS and received["local"] == MAX_TOKENS
    replica = {role: next(iter(routing["replicas"][role])) for role in ("prefill", "decode")}
    decode_stats = await replica_call("decode", "stats")
    assert decode_stats["num_loads"] == received["transferred"]
    assert decode_stats["num_failed_loads"] == 0
    router_expected = {
        ("ray_pdserve_router_e2e_request_latency_seconds_count", "disaggregated"):
            received["single"] + 1,
        ("ray_pdserve_router_e2e_request_latency_seconds_count", "prefilled_on_decode"): 1,
        ("ray_pdserve_router_time_to_first_token_seconds_count", "disaggregated"):
            received["streams"],
    }
    samples: list = []
    bad: list = []
    expected: dict = {}

    async def settled() -> bool:
        nonlocal samples, bad, expected
        expected = expected_values(received, await replica_call("prefill", "stats"),
                                   await replica_call("decode", "stats"))
        samples = await asyncio.to_thread(scrape)
        bad = [(name, role, got, want) for (name, role), want in expected.items()
               if (got := total(samples, name, role=role, ReplicaId=replica[role])) != want]
        bad += [(name, path, got, want) for (name, path), want in router_expected.items()
                if (got := total(samples, name, path=path)) != want]
        # Each stream's first token split by phase, the prefill engine's own times included.
        bad += [("ttft_phase", phase, got, received["streams"]) for phase in TRANSFER_PHASES
                if (got := total(samples, "ray_pdserve_router_ttft_phase_seconds_count",
                                 phase=phase)) != received["streams"]]
        # Every family the dashboard reads exists, but those this traffic cannot make.
        bad += sorted(used - NOT_PROVOKED - {name for name, _, _ in samples})
        return not bad

    used = set(re.findall(r"\bray_\w+", DASHBOARD.read_text()))
    await wait_until(settled, timeout_s=120, interval_s=3)  # Ray exports every few seconds
    assert not bad, bad
    # vLLM's engine metrics carry role and the Serve replica's id.
    for name in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting",
                 "ray_vllm_kv_cache_usage_perc", "ray_vllm_prefix_cache_queries_total",
                 "ray_vllm_request_queue_time_seconds_count",
                 "ray_vllm_prompt_tokens_by_source_total"):
        for role in ("prefill", "decode"):
            assert total(samples, name, role=role, ReplicaId=replica[role]) is not None, \
                (name, role)
    assert total(samples, "ray_vllm_prompt_tokens_by_source_total", role="decode",
                 source="external_kv_transfer") > 0
    # One pair set up: with no link where decode reads the blocks itself (the default, on one
    # host); over a link where it could not, which the decode side counts as a fallback.
    links = {event: total(samples, "ray_pdserve_kv_num_links_total", role=role, event=event)
             or 0 for role, event in (("prefill", "opened"), ("prefill", "direct_reads"),
                                      ("decode", "read_fallback"))}
    assert links["opened"] + links["direct_reads"] >= 1, links
    assert links["read_fallback"] >= links["opened"], links
    assert total(samples, "ray_pdserve_router_local_prefills_total",
                 reason="prompt_logprobs") == 1
    # Both engines publish int block hashes: indexed through the compiled key maps.
    assert total(samples, "ray_pdserve_router_replicas", mode="event_fed") == 2
    assert total(samples, "ray_pdserve_router_replicas", mode="dict_keyed") == 0
    assert total(samples, "ray_pdserve_router_inter_token_latency_seconds_count",
                 path="disaggregated") > 0
    for deployment in ("prefill", "decode"):
        assert total(samples, "ray_serve_deployment_replica_healthy", application=APP,
                     deployment=deployment) == 1
    with capsys.disabled():
        print("\nscraped (equal to the expected values):",
              {f"{name}{{{label}}}": value for (name, label), value in
               {**expected, **router_expected}.items()})
