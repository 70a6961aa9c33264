"""Prefix-aware, joint routing on the real stack: two prefill replicas, one decode replica."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from cluster.config import PDConfig, PoolConfig
from tests.integration.support import (
    completion_body,
    deployed,
    make_prompts,
    wait_until,
)

APP = "pdserve-routing"
PREFILL_TIMEOUT_S = 4.0
LEASE_S = 20
# Polls for KV events and engine counters give up well before a held transfer's lease ends.
EVENT_WAIT_S = 10.0
assert EVENT_WAIT_S < LEASE_S


@pytest.fixture(scope="module")
def app(engine_config):
    cfg = PDConfig(
        prefill=PoolConfig(engine=engine_config, num_replicas=2, cpu_cores="0"),
        decode=PoolConfig(engine=engine_config, cpu_cores="1"),
        router={"prefill_timeout_s": PREFILL_TIMEOUT_S, "failed_replica_s": 600},
        kv_transfer={"lease_s": LEASE_S, "timeout_s": 10},
        app_name=APP,
    )
    with deployed(cfg) as d:
        yield d.url

@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(base_url=app, timeout=120) as c:
        yield c


async def routing(client) -> dict:
    return (await client.get("/routing")).json()


async def replica_stats(role: str, replica_id: str) -> dict:
    from ray import serve

    return await serve.get_deployment_handle(role, APP).stats.remote(pin=replica_id)


async def blocks_of(client, replica_id: str) -> int:
    """How many blocks the router's KV index credits to ``replica_id``."""
    return (await routing(client))["index"]["num_blocks_by_replica"].get(replica_id, 0)


async def wait_for_blocks(client, replica_id: str, at_least: int) -> None:
    """Poll until the index credits ``replica_id`` with ``at_least`` blocks (its KV events
    reached the router)."""
    async def enough():
        return await blocks_of(client, replica_id) >= at_least

    assert await wait_until(enough, timeout_s=EVENT_WAIT_S, interval_s=0.1), \
        (replica_id, at_least, await routing(client))


async def wait_for_counter(role: str, replica_id: str, key: str, at_least: int) -> dict:
    """Poll a replica's engine counters until ``key`` reaches ``at_least``; return them."""
    async def reached():
        stats = await replica_stats(role, replica_id)
        return stats if stats[key] >= at_least else None

    stats = await wait_until(reached, timeout_s=EVENT_WAIT_S, interval_s=0.1)
    assert stats, (role, replica_id, key, at_least, await replica_stats(role, replica_id))
    return stats


async def known_replicas(client) -> dict:
    """Wait until the router sees both pools and follows every replica's KV events."""
    async def ready():
        await client.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 1})
        state = await routing(client)
        sizes = {role: len(ids) for role, ids in state["replicas"].items()}
        return state if sizes == {"prefill": 2, "decode": 1} and \
            len(state["event_fed"]) == 3 else None

    state = await wait_until(ready, timeout_s=60, interval_s=1.0)
    assert state, await routing(client)
    return state["replicas"]


async def test_index_is_fed_by_every_engine(client, engine_config, vocab_size):
    await known_replicas(client)
    prompt = make_prompts(engine_config, vocab_size, seed=21)[16]
    r = await client.post("/v1/completions", json=completion_body(engine_config, prompt))
    assert r.status_code == 200
    state = await wait_until(lambda: _grown(client), timeout_s=EVENT_WAIT_S, interval_s=0.1)
    assert state["num_events"] > 0 and state["index"]["num_blocks"] >= len(prompt) // 32


async def _grown(client):
    state = await routing(client)
    return state if state["index"]["num_blocks"] > 0 else None


async def test_shared_prefix_goes_where_it_is_cached(client, engine_config, vocab_size,
                                                     reference_outputs):
    replicas = await known_replicas(client)
    prefill_ids = sorted(replicas["prefill"])
    shared = make_prompts(engine_config, vocab_size, seed=22)[-1][: 20 * engine_config.block_size]
    assert len(shared) == 20 * engine_config.block_size
    suffixes = make_prompts(engine_config, vocab_size, seed=23)[6:9]  # 64..95 tokens each

    before = {rid: await replica_stats("prefill", rid) for rid in prefill_ids}
    indexed = {rid: await blocks_of(client, rid) for rid in prefill_ids}
    first = completion_body(engine_config, shared + suffixes[0])
    assert (await client.post("/v1/completions", json=first)).status_code == 200
    after = {rid: await replica_stats("prefill", rid) for rid in prefill_ids}
    (holder,) = [rid for rid in prefill_ids
                 if after[rid]["prompt_tokens_total"] > before[rid]["prompt_tokens_total"]]
    (other,) = set(prefill_ids) - {holder}
    # The holder's events reach the index: the shared prefix is new, so 20 more blocks.
    await wait_for_blocks(client, holder, indexed[holder] + 20)

    for suffix in suffixes[1:]:
        body = completion_body(engine_config, shared + suffix)
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == await reference_outputs(body)
    final = {rid: await replica_stats("prefill", rid) for rid in prefill_ids}
    # Both follow-ups were prefilled on the holder, which found the shared prefix in its own
    # prefix cache (vLLM's counter); the other replica computed nothing.
    hits = final[holder]["prefix_cache_hits"] - after[holder]["prefix_cache_hits"]
    assert hits >= 2 * len(shared) - engine_config.block_size, hits
    assert final[other]["prompt_tokens_total"] == after[other]["prompt_tokens_total"]


async def test_decode_prefills_locally_when_it_holds_the_prompt(client, engine_config,
                                                                vocab_size, reference_outputs):
    """A prompt the decode replica already holds but for a few tokens is not sent to prefill."""
    replicas = await known_replicas(client)
    (decode_id,) = replicas["decode"]
    prompt = make_prompts(engine_config, vocab_size, seed=24)[12]  # 11 blocks + 3 tokens
    body = completion_body(engine_config, prompt)
    indexed = await blocks_of(client, decode_id)
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    # The decode replica's events reach the index: it holds the prompt's 11 full blocks.
    await wait_for_blocks(client, decode_id, indexed + len(prompt) // engine_config.block_size)
    before = await replica_stats("decode", decode_id)
    state_before = await routing(client)
    extended = completion_body(engine_config, prompt + [5, 6, 7, 8])
    r = await client.post("/v1/completions", json=extended)
    assert r.json()["choices"][0]["text"] == await reference_outputs(extended)
    after = await replica_stats("decode", decode_id)
    assert (await routing(client))["num_local_prefills"] == state_before["num_local_prefills"] + 1
    assert after["num_loads"] == before["num_loads"]  # nothing moved
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    assert 0 < computed <= engine_config.block_size + 4


async def test_cold_prompts_at_a_steady_rate_all_go_to_prefill(client, engine_config,
                                                               vocab_size):
    """Cold prompts arriving at a steady rate, several in flight at once, while the prefill
    pool is far from saturated: none is prefilled on the decode replica (its sequences keep
    their inter-token latency); each is computed by a prefill replica and transferred."""
    import asyncio
    import random

    replicas = await known_replicas(client)
    (decode_id,) = replicas["decode"]
    rng = random.Random(26)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(rng.randrange(100, 900))]
               for _ in range(16)]
    decode_before = await replica_stats("decode", decode_id)
    local_before = (await routing(client))["local_prefills"]

    async def send(i: int, prompt: list[int]) -> int:
        await asyncio.sleep(i * 0.25)  # 4 requests per second
        r = await client.post("/v1/completions", json=completion_body(engine_config, prompt))
        return r.status_code

    statuses = await asyncio.gather(*(send(i, p) for i, p in enumerate(prompts)))
    assert statuses == [200] * len(prompts)
    assert (await routing(client))["local_prefills"] == local_before
    after = await replica_stats("decode", decode_id)
    assert after["num_loads"] - decode_before["num_loads"] == len(prompts)
    assert after["prompt_tokens_computed"] - decode_before["prompt_tokens_computed"] \
        <= len(prompts)  # the last token of each, nothing more


async def test_stalled_prefill_replicas_do_not_fail_requests(client, engine_config, vocab_size,
                                                             reference_outputs):
    """Freeze one prefill replica, then both: every request still gets the reference answer,
    prefilled on the other prefill replica (directly, or retried there after the frozen one
    timed out) or, with none left, on the decode replica."""
    replicas = await known_replicas(client)
    (decode_id,) = replicas["decode"]
    pids = {rid: (await replica_stats("prefill", rid))["pid"] for rid in replicas["prefill"]}
    frozen, live = sorted(pids)
    prompts = make_prompts(engine_config, vocab_size, seed=25)
    stopped = []
    try:
        os.kill(pids[frozen], signal.SIGSTOP)
        stopped.append(frozen)
        for prompt in prompts[10:12]:
            before = await replica_stats("prefill", live)
            local_before = (await routing(client))["num_local_prefills"]
            await assert_reference_answer(client, engine_config, prompt, reference_outputs)
            # Routed to the live prefill replica, which computed the whole prompt.
            await wait_for_counter("prefill", live, "prompt_tokens_total",
                                   before["prompt_tokens_total"] + len(prompt))
            assert (await routing(client))["num_local_prefills"] == local_before

        os.kill(pids[live], signal.SIGSTOP)
        stopped.append(live)
        for prompt in prompts[12:14]:  # not yet cached on the decode replica
            before = await replica_stats("decode", decode_id)
            local_before = (await routing(client))["num_local_prefills"]
            await assert_reference_answer(client, engine_config, prompt, reference_outputs)
            # No prefill replica left: the decode replica computed the prompt itself.
            await wait_for_counter("decode", decode_id, "prompt_tokens_computed",
                                   before["prompt_tokens_computed"] + len(prompt))
            assert (await routing(client))["num_local_prefills"] == local_before + 1
    finally:
        for rid in stopped:
            os.kill(pids[rid], signal.SIGCONT)


async def assert_reference_answer(client, engine_config, prompt, reference_outputs) -> None:
    body = completion_body(engine_config, prompt)
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == await reference_outputs(body)
